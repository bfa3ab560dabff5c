"""The fast path's choices for one run, which depend on the worker's device and packages, so
the worker makes them (the API stores "auto"): the attention implementation, whether batches
go padding-free, Liger's kernels, and gradient checkpointing. Each "auto" of the job's config
is replaced by what the run uses, and the job shows that config."""

import torch
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import is_flash_attn_2_available, is_liger_kernel_available

from afina.core.estimate import ModelShape, tokens_per_step
from afina.core.job_config import JobConfig
from afina.core.model_loading import compute_dtype
from afina.worker.device import free_memory
from afina.worker.training.attention import PACKED_SDPA
from afina.worker.training.checkpointing import needs_checkpointing


def _model_class(model_config: PretrainedConfig) -> type | None:
    """The transformers class that will load the model; None for one that brings its own code."""
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:
        return None


def _flash_attention_fits(config: JobConfig, model_class: type | None) -> bool:
    return (
        torch.cuda.is_available()
        and is_flash_attn_2_available()
        and torch.cuda.get_device_capability()[0] >= 8  # flash-attention 2: Ampere and later
        and compute_dtype(config.quantization.compute_dtype) in (torch.bfloat16, torch.float16)
        and bool(getattr(model_class, "_supports_flash_attn", False))
    )


def _liger_supports(model_config: PretrainedConfig) -> bool:
    if not (torch.cuda.is_available() and is_liger_kernel_available()):
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return model_config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def _sliding_window(model_config: PretrainedConfig) -> bool:
    """Whether some layer attends within a window: its mask is more than causal."""
    layer_types = getattr(model_config, "layer_types", None) or []
    return bool(getattr(model_config, "sliding_window", None)) and (
        not layer_types or any(kind != "full_attention" for kind in layer_types)
    )


def resolve_engine(config: JobConfig, model_config: PretrainedConfig) -> tuple[JobConfig, str]:
    """The config with attention, padding_free and liger_kernels resolved, and the attention
    implementation to load the model with.

    Padding-free batches need attention that stays inside each example: flash-attention's
    varlen kernels, `packed_sdpa`, or transformers' own block-diagonal mask (sdpa and eager,
    for models built on its attention interface). A model outside that interface (its own
    code) trains on padded batches."""
    training = config.training
    model_class = _model_class(model_config)
    attention = training.attention
    if attention == "auto":
        attention = "flash_attention_2" if _flash_attention_fits(config, model_class) else "sdpa"
    interface = bool(getattr(model_class, "_supports_attention_backend", False))
    padding_free = training.padding_free and (attention == "flash_attention_2" or interface)
    load = attention
    if attention == "sdpa" and padding_free and not _sliding_window(model_config):
        load = PACKED_SDPA
    liger = training.liger_kernels
    if liger == "auto":
        liger = _liger_supports(model_config)
    resolved = training.model_copy(
        update={"attention": attention, "padding_free": padding_free, "liger_kernels": liger}
    )
    return config.model_copy(update={"training": resolved}), load


def resolve_checkpointing(
    config: JobConfig, model_config: PretrainedConfig, lengths: list[int], trainable: int
) -> JobConfig:
    """The config with gradient_checkpointing decided: as asked, or for "auto" from the
    largest batch's activations and the memory left once the model is loaded."""
    training = config.training
    if training.gradient_checkpointing != "auto":
        return config
    dtype = compute_dtype(config.quantization.compute_dtype)
    batch_size = config.hyperparameters.batch_size
    if training.packing:  # rows filled to max_seq_length
        tokens = batch_size * (training.max_seq_length or max(lengths, default=0))
    else:
        tokens = tokens_per_step(lengths, batch_size, padding_free=bool(training.padding_free))
    decided = needs_checkpointing(
        ModelShape.of(model_config.get_text_config().to_dict()),
        tokens_per_step=tokens,
        dtype_bytes=torch.finfo(dtype).bits // 8,
        trainable_parameters=trainable,
        free_bytes=free_memory(),
    )
    resolved = training.model_copy(update={"gradient_checkpointing": decided})
    return config.model_copy(update={"training": resolved})
