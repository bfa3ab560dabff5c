"""afina's LoRA dropout on the CPU: the dropout of peft's `nn.Dropout` (each element dropped
with probability p, the others scaled by 1 / (1 - p)), from masks that cost less to draw."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from afina.worker.training.dropout import LoraDropout, use_lora_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_it_drops_a_share_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    dropout = LoraDropout(p)
    x = torch.ones(1000, 1001)  # an odd size: the last 64-bit draw is cut
    y = dropout(x)
    kept = y != 0
    assert (1 - kept.float().mean().item()) == pytest.approx(p, abs=2e-3)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)), rtol=1e-4)
    assert y.mean().item() == pytest.approx(1.0, abs=5e-3)  # unbiased, as nn.Dropout


def test_its_gradient_is_the_mask_and_the_scale():
    dropout = LoraDropout(0.1)
    x = torch.randn(64, 32, requires_grad=True)
    y = dropout(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.where(y != 0, dropout.scale, 0.0))


def test_the_same_seed_draws_the_same_masks_and_eval_mode_keeps_everything():
    dropout = LoraDropout(0.05)
    x = torch.randn(50, 70)
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)
    assert torch.equal(dropout.eval()(x), x)


def test_it_replaces_each_lora_dropout_of_a_peft_model():
    base = nn.Sequential()
    base.add_module("q", nn.Linear(8, 8))
    base.add_module("v", nn.Linear(8, 8))
    model = get_peft_model(base, LoraConfig(r=2, lora_dropout=0.05, target_modules=["q", "v"]))
    assert use_lora_dropout(model) == 2
    dropouts = [m for m in model.modules() if isinstance(m, LoraDropout)]
    assert len(dropouts) == 2
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
