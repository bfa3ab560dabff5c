"""Loading a base model (quantized with bitsandbytes as a job asks) and its tokenizer: what
training and serving share, so an adapter is served on the base it was trained on."""

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from afina.core.chat_format import ensure_chat_template
from afina.core.job_config import QuantizationSettings


class ModelLoadError(Exception):
    """The model or tokenizer cannot be loaded; the message says which and why."""


def compute_dtype(setting: str) -> torch.dtype:
    """The dtype LoRA computes in: bfloat16 on GPUs that have it, float16 on older ones,
    float32 on CPU (bitsandbytes' CPU kernels and autocast want it)."""
    if setting != "auto":
        return getattr(torch, setting)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(source: str, *, trust_remote_code: bool, offline: bool = False) -> Any:
    """The tokenizer as training uses it: a pad token (EOS if it has none) and a chat
    template (ChatML if it has none). `offline`: from local files only, never the hub."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=offline
        )
    except Exception as error:
        raise ModelLoadError(f"cannot load the tokenizer of {source!r}: {error}") from error
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


def load_base_model(
    model: str,
    *,
    quantization: QuantizationSettings,
    trust_remote_code: bool,
    attention: str | None = None,
) -> Any:
    """The base model, quantized as asked, on the GPU when there is one, with the attention
    implementation named (transformers' default when None). A CUDA out-of-memory error
    passes through as itself."""
    dtype = compute_dtype(quantization.compute_dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if quantization.bits is not None:
        kwargs["quantization_config"] = _quantization_config(quantization, dtype)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:
        raise ModelLoadError(f"cannot load model {model!r}: {error}") from error
