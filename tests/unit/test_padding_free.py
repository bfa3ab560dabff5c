"""A padding-free batch (the examples end to end in one row, as afina's trainer builds it)
trains as the same examples padded: the same loss, to 1e-4 in float32 on the CPU, because
attention stays inside each example."""

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from afina.core.job_config import ConfigRequest, LoraSettings, resolve_config
from afina.core.records import IGNORE_INDEX
from afina.worker.training.attention import PACKED_SDPA
from afina.worker.training.fast_path import resolve_engine
from afina.worker.training.model import load_model

LENGTHS = (37, 5, 120, 64, 1)


def records() -> list[dict[str, list[int]]]:
    """Examples of mixed lengths, each with a prompt that carries no loss."""
    generator = random.Random(0)
    examples = []
    for length in LENGTHS:
        ids = [generator.randrange(6, 500) for _ in range(length)]
        prompt = length // 3
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def loss(model, *, padding_free: bool) -> torch.Tensor:
    batch = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=padding_free)(records())
    with torch.no_grad():
        return model(**batch, use_cache=False).loss


def trained_model(demo_model: Path, attention: str):
    """The model as afina trains it (4-bit base, LoRA on every linear layer), its LoRA B
    weights made non-zero so that the adapters count, in eval mode (no dropout)."""
    torch.manual_seed(0)
    model = load_model(
        str(demo_model),
        quantization=resolve_config(
            ConfigRequest(), num_examples=1, model_max_length=512
        ).quantization,
        lora=LoraSettings(),
        attention=attention,
        trust_remote_code=False,
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model.eval()


def test_sdpa_resolves_to_attention_split_per_example(demo_model):
    config = resolve_config(ConfigRequest(), num_examples=1, model_max_length=512)
    resolved, attention = resolve_engine(config, AutoConfig.from_pretrained(demo_model))
    assert attention == PACKED_SDPA
    assert resolved.training.attention == "sdpa"
    assert resolved.training.padding_free is True


@pytest.mark.parametrize("attention", [PACKED_SDPA, "sdpa", "eager"])
def test_a_padding_free_batch_has_the_loss_of_the_same_examples_padded(demo_model, attention):
    """`packed_sdpa` splits the row per example; transformers' sdpa and eager build a
    block-diagonal mask from the position ids."""
    model = trained_model(demo_model, attention)
    padded = loss(model, padding_free=False)
    assert loss(model, padding_free=True).item() == pytest.approx(padded.item(), abs=1e-4)


def test_the_comparison_sees_attention_across_examples(demo_model):
    """The same row with positions that never start again: each example attends to the ones
    before it, and the loss is another."""
    model = trained_model(demo_model, PACKED_SDPA)
    batch = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=True)(records())
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        leaky = model(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            position_ids=torch.arange(length)[None],
            use_cache=False,
        ).loss
    assert abs(leaky.item() - loss(model, padding_free=False).item()) > 1e-3
