"""Direct preference optimisation: trl's DPOTrainer on afina's preference records
(`prompt_ids`, `chosen_ids`, `rejected_ids`, see `core.records`).

The reference model is the one training starts from, with no second copy of the base: a new
adapter starts at zero, so the reference is the base with the adapter switched off; a job that
continues a fine-tuned model keeps a frozen copy of that adapter's LoRA weights (what trl does
for a peft model it is given), so the reference is the fine-tuned model it started from.
"""

from typing import Any

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from afina.core.job_config import JobConfig

REFERENCE_ADAPTER = "ref"  # what trl names the frozen copy of a pretrained adapter


class TokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on records afina tokenized itself (its templates, its loss spans): trl's
    own preparation, which renders and tokenizes text columns, is skipped."""

    def _prepare_dataset(self, dataset: Dataset, *_: Any, **__: Any) -> Dataset:
        return dataset


def dpo_trainer(
    model: Any,
    tokenizer: Any,
    config: JobConfig,
    arguments: dict[str, Any],
    train_set: Dataset,
    eval_set: Dataset | None,
    *,
    continued: bool,
) -> DPOTrainer:
    assert config.hyperparameters.beta is not None
    args = DPOConfig(
        **arguments,
        beta=config.hyperparameters.beta,
        max_length=None,  # records are cut to max_seq_length already
        # Off for every dpo job (`core.job_config.DPO_REFUSED`): read, not assumed, here.
        padding_free=bool(config.training.padding_free),
        use_liger_kernel=bool(config.training.liger_kernels),
    )
    trainer = TokenizedDPOTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    if not continued and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)  # a copy of a zero adapter is the base
    return trainer
