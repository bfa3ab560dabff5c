"""The memory and compute estimate, from `config.json` alone, against published figures."""

import json

import pytest

from afina.core.base_models import read_local_config
from afina.core.estimate import (
    GIB,
    ModelShape,
    base_weight_bytes,
    flops_model_seconds,
    memory,
    peak_flops,
)

# config.json as published on the hub (the sizes; the rest of each file changes nothing here)
CONFIGS = {
    "Llama-2-7B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "Llama-3-8B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "Mistral-7B": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "Qwen2.5-0.5B": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "LLaMA-65B": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 22016,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "vocab_size": 32000,
    },
}
# The parameter counts the model cards give (Qwen's adds 27,648 attention biases).
PUBLISHED_PARAMETERS = {
    "Llama-2-7B": 6_738_415_616,
    "Llama-3-8B": 8_030_261_248,
    "Mistral-7B": 7_241_732_096,
    "Qwen2.5-0.5B": 494_032_768,
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, ModelShape]:
    """Each model read as the API reads it: a directory that holds only config.json."""
    found = {}
    for name, config in CONFIGS.items():
        directory = tmp_path_factory.mktemp(name)
        (directory / "config.json").write_text(json.dumps(config))
        shape = ModelShape.of(read_local_config(str(directory)))
        assert shape is not None
        found[name] = shape
    return found


def qlora(shape: ModelShape, *, tokens: int, checkpointing: bool, r: int = 16):
    return memory(
        shape,
        bits=4,
        double_quant=True,
        dtype_bytes=2,
        lora_r=r,
        target_modules="all-linear",
        tokens_per_step=tokens,
        checkpointing=checkpointing,
    )


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_the_parameter_count_is_the_model_cards(shapes, name):
    assert shapes[name].parameters == pytest.approx(PUBLISHED_PARAMETERS[name], rel=1e-4)


def test_llama_2_7b_half_precision_weights_and_full_fine_tuning_match_hf_calculator(shapes):
    """Hugging Face's model memory calculator: float16 weights 12.37 GiB; training with Adam
    four times that (weights, gradients, two moments), 49.48 GiB."""
    shape = shapes["Llama-2-7B"]
    weights = base_weight_bytes(shape, bits=None, double_quant=False, dtype_bytes=2)
    assert weights / GIB == pytest.approx(12.37, rel=0.03)
    adam = weights + 3 * 2 * shape.parameters
    assert adam / GIB == pytest.approx(49.48, rel=0.03)


def test_4_bit_weights_take_a_quarter_of_half_precision_plus_the_unquantized_rest(shapes):
    shape = shapes["Llama-2-7B"]
    half = base_weight_bytes(shape, bits=None, double_quant=False, dtype_bytes=2)
    single = base_weight_bytes(shape, bits=4, double_quant=False, dtype_bytes=2)
    double = base_weight_bytes(shape, bits=4, double_quant=True, dtype_bytes=2)
    rest = 2 * (shape.embedding_parameters + shape.head_parameters + shape.norm_parameters)
    # QLoRA paper: 0.5 bit a weight of constants, 0.127 with double quantization
    assert (single - rest) * 8 / shape.linear_parameters == pytest.approx(4.5, rel=1e-3)
    assert (double - rest) * 8 / shape.linear_parameters == pytest.approx(4.127, rel=1e-3)
    assert double < single < half / 3


@pytest.mark.parametrize(
    ("name", "checkpointing"),
    [("Llama-2-7B", False), ("Mistral-7B", False), ("Llama-3-8B", True)],
)
def test_qlora_of_a_7b_model_at_short_sequences_takes_single_digit_gib(shapes, name, checkpointing):
    estimate = qlora(shapes[name], tokens=512, checkpointing=checkpointing)
    assert 4 * GIB < estimate.total < 10 * GIB
    assert estimate.total == sum(
        getattr(estimate, part)
        for part in (
            "base_weights",
            "lora_parameters",
            "gradients_and_optimizer",
            "activations",
            "logits",
        )
    )


def test_a_65b_model_fits_one_48_gb_gpu_with_checkpointing(shapes):
    """The QLoRA paper's claim, with afina's defaults (r=16 on every linear layer)."""
    estimate = qlora(shapes["LLaMA-65B"], tokens=512, checkpointing=True)
    assert estimate.total < 48e9
    assert qlora(shapes["LLaMA-65B"], tokens=512, checkpointing=False).total > 48e9


def test_checkpointing_trades_activations_for_compute(shapes):
    shape = shapes["Llama-3-8B"]
    on = qlora(shape, tokens=4096, checkpointing=True)
    off = qlora(shape, tokens=4096, checkpointing=False)
    assert on.activations == off.activations_with_checkpointing < off.activations / 10
    assert on.logits == off.logits == 4096 * 3 * 4 * 128256
    lora = shape.lora_parameters(16, "all-linear")
    with_flops = shape.training_flops([4096], lora_parameters=lora, checkpointing=True)
    without = shape.training_flops([4096], lora_parameters=lora, checkpointing=False)
    assert with_flops == pytest.approx(1.5 * without, rel=0.05)


def test_activations_and_logits_grow_with_the_tokens_of_a_step(shapes):
    shape = shapes["Qwen2.5-0.5B"]
    one, four = (
        qlora(shape, tokens=1024, checkpointing=False),
        qlora(shape, tokens=4096, checkpointing=False),
    )
    assert four.activations == 4 * one.activations
    assert four.logits == 4 * one.logits
    assert four.base_weights == one.base_weights


def test_lora_targets_count_only_the_named_projections(shapes):
    shape = shapes["Llama-2-7B"]
    attention_only = shape.lora_parameters(8, ["q_proj", "model.layers.0.self_attn.v_proj"])
    assert attention_only == 32 * 8 * (2 * 4096 + 2 * 4096)
    assert shape.lora_parameters(16, "all-linear") == 39_976_960  # peft's count for r=16


def test_a_config_without_the_models_sizes_has_no_shape():
    assert ModelShape.of({"model_type": "llama", "hidden_size": 64}) is None
    gpt2 = ModelShape.of({"n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_head": 12})
    assert gpt2 is not None
    assert (gpt2.intermediate, gpt2.kv_heads, gpt2.head_dim) == (4 * 768, 12, 64)


def test_the_flops_model_knows_gpus_by_name_and_counts_cpu_cores():
    assert peak_flops("cuda", "NVIDIA H100 PCIe", 16) == 756e12
    assert peak_flops("cuda", "NVIDIA H100 80GB HBM3", 16) == 989e12
    assert peak_flops("cuda", "NVIDIA L40S", 16) == 362e12  # not taken for an L4
    assert peak_flops("cuda", "Some Future GPU", 16) == 65e12
    assert peak_flops("cpu", "", 4) == 2 * peak_flops("cpu", "", 2)


def test_a_7b_qlora_epoch_takes_minutes_on_a_gpu_and_far_longer_on_a_cpu(shapes):
    shape = shapes["Llama-2-7B"]
    lora = shape.lora_parameters(16, "all-linear")
    flops = shape.training_flops([512] * 2000, lora_parameters=lora, checkpointing=False)
    gpu = flops_model_seconds(flops, device_kind="cuda", device_name="A100", cores=16, bits=4)
    cpu = flops_model_seconds(flops, device_kind="cpu", device_name="", cores=16, bits=4)
    assert 60 < gpu < 3600  # a million tokens: about 1,800 tokens a second
    assert cpu > 100 * gpu
