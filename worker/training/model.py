"""The model to train: the quantized base, frozen, with trainable LoRA adapters on top: new
ones, or those of a fine-tuned model that training continues."""

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from afina.core.job_config import LoraSettings, QuantizationSettings
from afina.core.model_loading import ModelLoadError, load_base_model, load_tokenizer
from afina.worker.training.dropout import use_lora_dropout
from afina.worker.training.errors import TrainingFailure


def load_training_tokenizer(model: str, *, trust_remote_code: bool) -> Any:
    try:
        return load_tokenizer(model, trust_remote_code=trust_remote_code)
    except ModelLoadError as error:
        raise TrainingFailure("model_load_failed", str(error), "model") from error


def load_model(
    model: str,
    *,
    quantization: QuantizationSettings,
    lora: LoraSettings,
    attention: str,
    trust_remote_code: bool,
    adapter_from: Path | None = None,
) -> Any:
    """The peft model: `lora` adds new adapters, or `adapter_from` (a saved peft adapter,
    whose settings the job took) goes on training. Gradient checkpointing is the Trainer's to
    switch on, from its arguments: the run decides it once the model is loaded
    (`training.checkpointing`)."""
    try:
        base = load_base_model(
            model,
            quantization=quantization,
            trust_remote_code=trust_remote_code,
            attention=attention,
        )
    except ModelLoadError as error:
        raise TrainingFailure("model_load_failed", str(error), "model") from error
    if quantization.bits is not None:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        if adapter_from is not None:
            peft_model = PeftModel.from_pretrained(base, str(adapter_from), is_trainable=True)
        else:
            peft_model = get_peft_model(base, config)
    except ValueError as error:  # e.g. target_modules naming no layer of this model
        raise TrainingFailure(
            "invalid_lora_config", f"cannot add LoRA to {model!r}: {error}", "lora.target_modules"
        ) from error
    if not torch.cuda.is_available():
        use_lora_dropout(peft_model)
    return peft_model


def keep_adapter_in_float32(model: Any) -> None:
    """Put the trainable LoRA weights back in float32 after trl's SFTTrainer has cast them to
    bfloat16 (it does so for every quantized model).

    A resumed run loads its adapter with peft's `load_adapter`, which upcasts to float32: a run
    trained in bfloat16 would then go on in float32 after a resume, and no longer repeat the
    uninterrupted run. float32 weights are also what plain AdamW updates without losing small
    steps, and what the CPU computes fastest (it has no fast bfloat16 matmul); on a GPU the
    Trainer's bf16 autocast still runs the matmuls in bfloat16.
    """
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
