"""When a run turns gradient checkpointing on: only when the largest batch's activations
would not fit in the memory left, or when the job asks for it."""

import pytest
from transformers import GPT2Config, LlamaConfig

from afina.core.estimate import ModelShape, tokens_per_step
from afina.core.job_config import ConfigRequest, resolve_config
from afina.worker.training import fast_path
from afina.worker.training.checkpointing import needs_checkpointing

GIB = 2**30
# The benchmark's small model, and Llama-3-8B's shape.
SMALL = LlamaConfig(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)
EIGHT_B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
)


def shape(model_config) -> ModelShape | None:
    """The shape as the worker reads it, from the loaded config's names."""
    return ModelShape.of(model_config.to_dict())


def test_a_batch_holds_the_longest_examples_end_to_end_or_padded_to_the_longest():
    lengths = [100, 900, 300, 50, 700]
    assert tokens_per_step(lengths, 2, padding_free=True) == 1600
    assert tokens_per_step(lengths, 2, padding_free=False) == 1800
    assert tokens_per_step([10], 4, padding_free=False) == 40


def test_a_small_model_on_a_cpu_trains_without_checkpointing():
    kwargs = {"tokens_per_step": 4 * 1024, "dtype_bytes": 4, "trainable_parameters": 10**6}
    assert not needs_checkpointing(shape(SMALL), **kwargs, free_bytes=8 * GIB)


def test_a_large_batch_of_a_large_model_on_a_small_gpu_needs_it():
    kwargs = {"tokens_per_step": 8 * 4096, "dtype_bytes": 2, "trainable_parameters": 42 * 10**6}
    assert needs_checkpointing(shape(EIGHT_B), **kwargs, free_bytes=18 * GIB)  # a 24 GiB GPU
    assert not needs_checkpointing(shape(EIGHT_B), **kwargs, free_bytes=2000 * GIB)


def test_other_architectures_are_read_by_their_own_names_and_an_unknown_shape_checkpoints():
    kwargs = {"tokens_per_step": 4096, "dtype_bytes": 2, "trainable_parameters": 10**6}
    assert not needs_checkpointing(shape(GPT2Config()), **kwargs, free_bytes=80 * GIB)
    assert needs_checkpointing(shape(GPT2Config()), **kwargs, free_bytes=1 * GIB)
    assert ModelShape.of({"model_type": "custom"}) is None
    assert needs_checkpointing(None, **kwargs, free_bytes=2000 * GIB)


def config(**training: object):
    request = ConfigRequest.model_validate({"training": training})
    return resolve_config(request, num_examples=100, model_max_length=2048)


@pytest.mark.parametrize("asked", [True, False])
def test_a_job_that_says_gets_what_it_says(asked, monkeypatch):
    monkeypatch.setattr(fast_path, "free_memory", lambda: 0)
    resolved = fast_path.resolve_checkpointing(
        config(gradient_checkpointing=asked), SMALL, [2048] * 8, 10**6
    )
    assert resolved.training.gradient_checkpointing is asked


@pytest.mark.parametrize(("free", "decided"), [(64 * GIB, False), (64 * 2**20, True)])
def test_auto_is_decided_from_the_memory_left(free, decided, monkeypatch):
    monkeypatch.setattr(fast_path, "free_memory", lambda: free)
    resolved = fast_path.resolve_checkpointing(config(), SMALL, [2048] * 8, 10**6)
    assert resolved.training.gradient_checkpointing is decided
