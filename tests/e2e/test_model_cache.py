"""The engine's model cache on the demo model: an adapter whose files cannot be loaded
leaves the base as it was, whether it came first or after others."""

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from afina.core.storage import ArtifactStorage
from afina.serving.model_cache import ModelCache
from afina.serving.protocol import AdapterSpec, BaseModelSpec, InferenceError


@pytest.fixture(scope="module")
def storage(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ArtifactStorage:
    """Adapters `good` and `other` with random LoRA weights, and `corrupt`: good's config
    with weights cut short."""
    root = tmp_path_factory.mktemp("artifacts")
    for name, seed in (("good", 1), ("other", 2)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(demo_model)
        config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(root / name)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_bytes((root / "good/adapter_config.json").read_bytes())
    weights = (root / "good/adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(weights[:100])
    return ArtifactStorage(str(root))


def load(cache: ModelCache, base, key: str) -> str | int:
    try:
        return cache.adapter(base, AdapterSpec(key, key))[0]
    except InferenceError as error:
        return error.status_code


def test_a_corrupt_adapter_leaves_the_base_as_it_was(storage, demo_model, tmp_path):
    cache = ModelCache(
        storage=storage,
        cache_dir=tmp_path,
        max_bases=1,
        max_adapters=2,
        trust_remote_code=False,
    )
    base = cache.base(BaseModelSpec(str(demo_model)))
    assert load(cache, base, "corrupt") == 500
    assert not isinstance(base.model, PeftModel)  # no stray LoRA layers left in the base
    assert not hasattr(base.model, "peft_config")

    good = load(cache, base, "good")
    assert load(cache, base, "corrupt") == 500
    other = load(cache, base, "other")
    assert sorted(base.model.peft_config) == sorted([good, other])
    assert cache.loaded_adapters == ("good", "other")
    cache.close()
