"""Attention for padding-free batches: each example attends to itself only.

A padding-free batch is one row: the batch's examples end to end, with `position_ids` that
start again at 0 for each (trl's `padding_free` collator, which also gives the boundaries as
`cu_seq_lens_q`). flash-attention's varlen kernels take such a row as it is. SDPA does not:
transformers would build a block-diagonal mask over the whole row (memory and work in the
square of the row's length, and a mask keeps SDPA off its fused causal kernels). So afina
registers `packed_sdpa`: SDPA run causally on each example's span of the row, which is exact
and does the work of the examples alone. Anything else (a padded batch with its attention
mask, a cache while generating) goes to transformers' own SDPA.
"""

from itertools import pairwise
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PACKED_SDPA = "packed_sdpa"


def _spans(length: int, kwargs: dict[str, Any]) -> list[list[tuple[int, int]]] | None:
    """Each row's examples as (start, end), from the collator's boundaries or where the
    position ids start again; None when there is nothing to split by."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is not None:
        return [list(pairwise(bounds.tolist()))]
    positions = kwargs.get("position_ids")
    if positions is None:
        return None
    rows = []
    for row in positions.reshape(-1, positions.shape[-1]):
        starts = [0, *(torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1).tolist(), length]
        rows.append(list(pairwise(starts)))
    return rows


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    length = query.shape[2]
    spans = None
    if attention_mask is None and key.shape[2] == length:
        spans = _spans(length, kwargs)
    if spans is None or len(spans) != query.shape[0]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = [
        torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    query[row : row + 1, :, start:end],
                    key[row : row + 1, :, start:end],
                    value[row : row + 1, :, start:end],
                    dropout_p=dropout,
                    scale=scaling,
                    is_causal=True,
                )
                for start, end in row_spans
            ],
            dim=2,
        )
        for row, row_spans in enumerate(spans)
    ]
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _packed_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask when the batch has no padding: `packed_sdpa_attention` splits the row itself."""
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)
