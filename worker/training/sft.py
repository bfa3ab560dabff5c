"""Supervised fine-tuning: trl's SFTTrainer on afina's records (`input_ids` and `labels`)."""

from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from afina.core.job_config import JobConfig


def sft_trainer(
    model: Any,
    tokenizer: Any,
    config: JobConfig,
    arguments: dict[str, Any],
    train_set: Dataset,
    eval_set: Dataset | None,
) -> SFTTrainer:
    training = config.training
    padding_free = bool(training.padding_free) and not training.packing  # packing: trl's own
    args = SFTConfig(
        **arguments,
        use_liger_kernel=bool(training.liger_kernels),
        # Records are cut to max_seq_length already; trl refuses a length it would not enforce.
        max_length=None if padding_free else training.max_seq_length,
        packing=training.packing,
        padding_free=padding_free,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
