"""Whether a run needs gradient checkpointing.

Checkpointing keeps only each layer's input and runs the layer's forward pass again during
the backward pass: about a quarter more compute per token, for activations a few layers'
worth instead of all of them. So a run uses it only when its activations would not fit in the
memory the device has left once the model is loaded.

The estimate counts, per token and layer, what the backward pass of LoRA on a frozen base
keeps: the tensors around attention and the SwiGLU MLP, and each LoRA layer's dropped-out
input, plus the logits and their gradient in float32 (what cross-entropy upcasts to). It
leans high on purpose; a run that the estimate lets through without checkpointing and that
runs out of memory fails with `out_of_memory`, which names the setting.
"""

import re
from pathlib import Path
from typing import Any

import torch

# The share of the free memory that the activations and the optimizer may take.
HEADROOM = 0.7
_MEMINFO = Path("/proc/meminfo")


def activation_bytes(model_config: Any, tokens: int, *, dtype_bytes: int) -> int | None:
    """Bytes a forward pass over `tokens` tokens keeps for its backward pass, without
    checkpointing; None for a model whose config does not give its shape. `model_config` is
    the text model's `PretrainedConfig` (its attribute names map to every architecture's)."""
    hidden = getattr(model_config, "hidden_size", None)
    layers = getattr(model_config, "num_hidden_layers", None)
    vocabulary = getattr(model_config, "vocab_size", None)
    if not (hidden and layers and vocabulary):
        return None
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    heads = getattr(model_config, "num_attention_heads", None) or 1
    kv = hidden * (getattr(model_config, "num_key_value_heads", None) or heads) // heads
    # norms, q, k, v, attention output and residuals; gate, up, their product; LoRA inputs
    per_layer = 7 * hidden + 2 * kv + 3 * intermediate + (5 * hidden + intermediate)
    logits = 3 * 4 * vocabulary
    return tokens * (layers * per_layer * dtype_bytes + logits)


def free_memory() -> int:
    """Bytes the run may still use: free GPU memory, or the memory the OS calls available
    (0 when it does not say: the run then checkpoints)."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", _MEMINFO.read_text(), re.MULTILINE)
    except OSError:
        found = None
    return int(found.group(1)) * 1024 if found else 0


def needs_checkpointing(
    model_config: Any,
    *,
    tokens_per_step: int,
    dtype_bytes: int,
    trainable_parameters: int,
    free_bytes: int,
) -> bool:
    """True when the activations of the largest batch, with the LoRA weights' gradients and
    AdamW state (float32: weight, gradient, two moments), would not fit in `free_bytes`, or
    when the model's shape is unknown."""
    activations = activation_bytes(model_config, tokens_per_step, dtype_bytes=dtype_bytes)
    if activations is None:
        return True
    return 16 * trainable_parameters + activations > HEADROOM * free_bytes


def tokens_per_step(lengths: list[int], batch_size: int, *, padding_free: bool) -> int:
    """The most tokens one batch of these examples can hold: the longest ones end to end when
    padding-free, else `batch_size` rows as long as the longest."""
    longest = sorted(lengths, reverse=True)[:batch_size]
    if padding_free:
        return sum(longest)
    return batch_size * (longest[0] if longest else 0)
