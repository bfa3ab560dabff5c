"""LoRA dropout that draws its masks for less on a CPU.

peft puts an `nn.Dropout` before each LoRA layer, and on a CPU drawing its masks is a large
share of a LoRA step (with LoRA on all linear layers of a small model, a sixth of the forward
and backward): `bernoulli_` draws one random number per element. `LoraDropout` draws 64
random bits and cuts them into four 16-bit lanes, one per element, and drops an element when
its lane falls under p * 2^16: the same dropout, with the drop probability rounded to a
multiple of 2^-16 (0.05 becomes 0.0500031) and the kept elements scaled by 1 / (1 - that).
It draws from torch's default generator, so a seeded run, or one resumed with its RNG state,
draws the same masks. On a GPU, `nn.Dropout`'s fused kernel is cheaper still: it stays.
"""

from typing import Any

import torch
from torch import nn

_LANES = 1 << 16
_LOWEST = -(1 << 15)


class LoraDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.threshold = _LOWEST + round(p * _LANES)  # lanes below it drop their element
        self.scale = 1.0 / (1.0 - round(p * _LANES) / _LANES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        count = x.numel()
        words = torch.empty((count + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(1 << 63), (1 << 63) - 1)  # the whole range: every bit random
        lanes = words.view(torch.int16)[:count].view(x.shape)
        # One float mask holding the scale too: the product's backward is one multiply.
        return x * (lanes >= self.threshold).to(x.dtype).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={1.0 - 1.0 / self.scale:.7f}"


def use_lora_dropout(model: Any) -> int:
    """Swap every `nn.Dropout` peft put before a LoRA layer for a `LoraDropout` of the same
    p; the number swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                dropouts[name] = LoraDropout(dropout.p)
                swapped += 1
    return swapped
