"""The generation metrics of real generations on the tiny demo model, through the inference
engine (its thread, batching, model cache and decoding) with two adapters of random LoRA
weights: requests by outcome, tokens, time to first token, time per output token, batch
sizes and the adapter cache's hits, misses and evictions. No training and no worker: the
demo model alone."""

import asyncio
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM

from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage
from afina.serving.engine import InferenceEngine
from afina.serving.protocol import (
    AdapterSpec,
    BaseModelSpec,
    GeneratedText,
    ModelSpec,
    Prompt,
    SamplingParams,
)

PROMPT = Prompt(text="Is the sky blue?")
# Greedy, and to the token limit unless a stop string comes first.
PARAMS = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)

COUNTED = {
    "stop": ("afina_generation_requests_total", {"outcome": "stop"}),
    "length": ("afina_generation_requests_total", {"outcome": "length"}),
    "tokens": ("afina_generation_tokens_total", {}),
    "first": ("afina_generation_time_to_first_token_seconds_count", {}),
    "first_seconds": ("afina_generation_time_to_first_token_seconds_sum", {}),
    "next": ("afina_generation_time_per_output_token_seconds_count", {}),
    "batches": ("afina_generation_batch_size_count", {}),
    "rows": ("afina_generation_batch_size_sum", {}),
    "hits": ("afina_adapter_cache_hits_total", {}),
    "misses": ("afina_adapter_cache_misses_total", {}),
    "evictions": ("afina_adapter_cache_evictions_total", {}),
}


def counted() -> dict[str, float]:
    return {key: REGISTRY.get_sample_value(*sample) or 0.0 for key, sample in COUNTED.items()}


@pytest.fixture(scope="module")
def storage(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ArtifactStorage:
    """Adapters `one` and `two` with random LoRA weights."""
    root = tmp_path_factory.mktemp("artifacts")
    for name, seed in (("one", 1), ("two", 2)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(demo_model)
        config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(root / name)
    return ArtifactStorage(str(root))


def test_generations_on_the_demo_model_are_measured(demo_model, storage, tmp_path):
    # One adapter loaded at a time: the second evicts the first.
    settings = Settings(
        _env_file=None, data_dir=tmp_path, api_keys=[], max_loaded_adapters=1, batch_window_ms=100
    )
    engine = InferenceEngine(settings, storage)
    base = BaseModelSpec(str(demo_model))
    plain = ModelSpec("base", base)
    one, two = (ModelSpec(name, base, AdapterSpec(name, name)) for name in ("one", "two"))

    def generate(*models: ModelSpec) -> list[GeneratedText]:
        """One batch: submitted together, within the batch window."""

        async def together() -> list[GeneratedText]:
            streams = [engine.submit(model, PROMPT, PARAMS) for model in models]
            return [await asyncio.wait_for(stream.completion(), 120) for stream in streams]

        return asyncio.run(together())

    before = counted()
    try:
        answers = [
            *generate(plain, one),  # adapter one: a miss
            *generate(one),  # a hit
            *generate(two),  # a miss, and one is evicted
        ]
    finally:
        engine.close()
    gained = {key: value - before[key] for key, value in counted().items()}

    tokens = [answer.usage.completion_tokens for answer in answers]
    assert all(1 <= n <= 4 for n in tokens)
    assert gained["stop"] + gained["length"] == 4
    assert gained["length"] == sum(answer.finish_reason == "length" for answer in answers)
    assert gained["tokens"] == sum(tokens)
    assert gained["first"] == 4  # one first token a request
    assert gained["next"] == sum(tokens) - 4  # and the time before each of the others
    assert (gained["batches"], gained["rows"]) == (3, 4)
    assert (gained["hits"], gained["misses"], gained["evictions"]) == (1, 2, 1)
    # the times are real ones: these requests' first tokens came after them (the total is the
    # process's: what these requests added)
    assert gained["first_seconds"] > 0
