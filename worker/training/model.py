"""Loading the base model (quantized with bitsandbytes) and its tokenizer, and adding LoRA."""

from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from afina.core.job_config import LoraSettings, QuantizationSettings
from afina.worker.training.errors import TrainingFailure
from afina.worker.training.records import ensure_chat_template


def compute_dtype(setting: str) -> torch.dtype:
    """The dtype LoRA computes in: bfloat16 on GPUs that have it, float16 on older ones,
    float32 on CPU (bitsandbytes' CPU kernels and autocast want it)."""
    if setting != "auto":
        return getattr(torch, setting)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(model: str, *, trust_remote_code: bool) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise TrainingFailure(
            "model_load_failed", f"cannot load the tokenizer of {model!r}: {error}", "model"
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    return tokenizer


def _quantization_config(settings: QuantizationSettings, dtype: torch.dtype) -> Any:
    if settings.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_model(
    model: str,
    *,
    quantization: QuantizationSettings,
    lora: LoraSettings,
    gradient_checkpointing: bool,
    trust_remote_code: bool,
) -> Any:
    """The base model, quantized as asked, frozen, with trainable LoRA adapters on top."""
    dtype = compute_dtype(quantization.compute_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if quantization.bits is not None:
        kwargs["quantization_config"] = _quantization_config(quantization, dtype)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:
        raise TrainingFailure(
            "model_load_failed", f"cannot load model {model!r}: {error}", "model"
        ) from error
    if quantization.bits is not None:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(base, config)
    except ValueError as error:  # e.g. target_modules naming no layer of this model
        raise TrainingFailure(
            "invalid_lora_config", f"cannot add LoRA to {model!r}: {error}", "lora.target_modules"
        ) from error
