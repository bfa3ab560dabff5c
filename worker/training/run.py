"""One QLoRA training run, from dataset files to a saved peft adapter: supervised
(`training.sft`) or preference tuning (`training.dpo`), then, with a validation file, the
generations of `training.evaluation`. Knows nothing of Celery or the database: progress goes
to a `Reporter`."""

import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.compute as pc
import torch
from datasets import Dataset, disable_progress_bars
from transformers import AutoConfig, PretrainedConfig, PrinterCallback, Trainer, set_seed
from transformers.utils import logging as hf_logging

from afina.core.base_models import max_length
from afina.core.datasets import read_examples
from afina.core.estimate import ModelShape
from afina.core.job_config import DEFAULT_MAX_SEQ_LENGTH, JobConfig, fit_to_model
from afina.core.model_loading import compute_dtype
from afina.core.records import RecordError, RecordStats, to_records
from afina.worker.training import tokenized
from afina.worker.training.dpo import dpo_trainer
from afina.worker.training.errors import TrainingFailure
from afina.worker.training.evaluation import sample_prompts, write_generations
from afina.worker.training.fast_path import resolve_checkpointing, resolve_engine
from afina.worker.training.model import (
    keep_adapter_in_float32,
    load_model,
    load_training_tokenizer,
)
from afina.worker.training.progress import ProgressCallback, Reporter
from afina.worker.training.sft import sft_trainer

logger = logging.getLogger(__name__)

# Ratios of the run, in the Trainer's "float below 1" form: ~50 metric points, ~10
# evaluations and a checkpoint every quarter unless the request sets eval/save steps.
LOGGING_RATIO = 0.02
EVAL_RATIO = 0.1
SAVE_RATIO = 0.25
# What a run's checkpoints report as its accuracy: the share of next tokens predicted right,
# and for DPO the share of pairs whose preferred answer the model rewards more.
ACCURACY = {"supervised": "mean_token_accuracy", "dpo": "rewards/accuracies"}


@dataclass(frozen=True)
class TrainingRun:
    model: str
    config: JobConfig
    seed: int
    training_data: Callable[[], BinaryIO]  # opens the dataset, each time it is read
    validation_data: Callable[[], BinaryIO] | None
    workdir: Path
    max_line_bytes: int
    trust_remote_code: bool = False
    resume_from: Path | None = None  # a trainer checkpoint of an earlier run of this job
    tokenized_from: Path | None = None  # the datasets an earlier run of this job tokenized
    adapter_from: Path | None = None  # the adapter of the fine-tuned model it continues
    # A distributed run (`worker.training.distributed`): the trainer's output folder its ranks
    # share (each writes its RNG state into the checkpoint), and whether this rank follows
    # (trains, and leaves the adapter and the evaluation to rank 0).
    trainer_dir: Path | None = None
    follower: bool = False


@dataclass(frozen=True)
class TrainingOutcome:
    config: JobConfig
    adapter_dir: Path | None  # None: stopped early (cancelled)
    steps: int
    trained_tokens: int
    parameters: int | None = None  # the base's, as the estimate counts them
    tokens_per_second: float | None = None  # measured over the run
    generations: Path | None = None  # JSON lines: the end-of-run answers to validation prompts


def _model_config(run: TrainingRun) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(run.model, trust_remote_code=run.trust_remote_code)
    except Exception as error:
        raise TrainingFailure(
            "model_load_failed", f"cannot load model {run.model!r}: {error}", "model"
        ) from error


def _resolve_length(run: TrainingRun, model_config: dict[str, Any]) -> JobConfig:
    # A model that declares no context length takes what was asked, or the default.
    limit = max_length(model_config) or run.config.training.max_seq_length or DEFAULT_MAX_SEQ_LENGTH
    try:
        return fit_to_model(run.config, limit)
    except ValueError as error:
        raise TrainingFailure(
            "invalid_max_seq_length", str(error), "training.max_seq_length"
        ) from error


def _dataset(
    open_data: Callable[[], BinaryIO],
    tokenizer: Any,
    config: JobConfig,
    run: TrainingRun,
    name: str,
    reporter: Reporter,
) -> tuple[Dataset, RecordStats, bool]:
    """The dataset's records and their stats, and whether an earlier run tokenized them.
    A dataset tokenized here is handed to the reporter to keep."""
    kept = tokenized.load(run.tokenized_from / name) if run.tokenized_from else None
    if kept is not None:
        return *kept, True
    stats = RecordStats()
    max_seq_length = config.training.max_seq_length
    assert max_seq_length is not None

    def records() -> Iterator[dict[str, list[int]]]:
        with open_data() as stream:
            yield from to_records(
                read_examples(stream, max_line_bytes=run.max_line_bytes),
                tokenizer,
                loss_on=config.training.loss_on,
                max_length=max_seq_length,
                stats=stats,
            )

    cache = run.workdir / "datasets" / name
    shutil.rmtree(cache, ignore_errors=True)  # a fresh build, so `stats` counts every example
    param = "training_file" if name == "train" else "validation_file"
    try:
        dataset = Dataset.from_generator(records, cache_dir=str(cache))
    except Exception as error:
        if stats.examples and stats.dropped == stats.examples:  # datasets refuses no rows
            raise TrainingFailure(
                "no_trainable_examples",
                f"none of the {stats.examples} examples has a token to learn from within "
                f"max_seq_length={max_seq_length}: raise training.max_seq_length",
                param,
            ) from error
        # datasets wraps what the generator raised; a bad line or template is the user's.
        cause = error if isinstance(error, RecordError) else error.__cause__ or error.__context__
        if isinstance(cause, RecordError | ValueError):
            raise TrainingFailure("invalid_training_example", str(cause), param) from error
        raise
    reporter.tokenized(name, tokenized.save(dataset, stats, run.workdir / "tokenized" / name))
    return dataset, stats, False


def _trainer_arguments(run: TrainingRun, config: JobConfig, evaluate: bool) -> dict[str, Any]:
    """The TrainingArguments every method shares."""
    training, hyper = config.training, config.hyperparameters
    cuda = torch.cuda.is_available()
    dtype = compute_dtype(config.quantization.compute_dtype)
    return {
        "output_dir": str(run.trainer_dir or run.workdir / "trainer"),
        "num_train_epochs": hyper.n_epochs,
        "max_steps": training.max_steps or -1,
        "per_device_train_batch_size": hyper.batch_size,
        "per_device_eval_batch_size": hyper.batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler,
        "warmup_steps": training.warmup_ratio,
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "optim": "paged_adamw_32bit" if cuda else "adamw_torch",
        "bf16": cuda and dtype == torch.bfloat16,
        "fp16": cuda and dtype == torch.float16,
        "use_cpu": not cuda,
        "activation_checkpointing": bool(training.gradient_checkpointing),
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "logging_strategy": "steps",
        "logging_steps": LOGGING_RATIO,
        "logging_first_step": True,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": training.eval_steps or EVAL_RATIO,
        "save_strategy": "steps",
        "save_steps": training.save_steps or SAVE_RATIO,
        "save_total_limit": 1,
        "include_num_input_tokens_seen": "non_padding",
        "seed": run.seed,
        "data_seed": run.seed,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def _lengths(dataset: Dataset) -> list[int]:
    """Each record's tokens as the trainer runs them (`core.records.sequence_tokens`), read
    from the Arrow columns without building the lists."""
    data = dataset.data
    if "prompt_ids" not in dataset.column_names:
        return pc.list_value_length(data.column("input_ids")).to_pylist()
    prompt, chosen, rejected = (
        pc.list_value_length(data.column(name))
        for name in ("prompt_ids", "chosen_ids", "rejected_ids")
    )
    return pc.multiply(pc.add(prompt, pc.max_element_wise(chosen, rejected)), 2).to_pylist()


def _report_engine(reporter: Reporter, config: JobConfig, attention: str) -> None:
    training = config.training
    choices = {
        "attention": attention,
        "padding_free": training.padding_free,
        "gradient_checkpointing": training.gradient_checkpointing,
        "liger_kernels": training.liger_kernels,
    }
    reporter.event(
        f"Training with {attention} attention, "
        f"{'padding-free' if training.padding_free else 'padded'} batches, gradient "
        f"checkpointing {'on' if training.gradient_checkpointing else 'off'}, Liger kernels "
        f"{'on' if training.liger_kernels else 'off'}",
        data=choices,
    )


def train(run: TrainingRun, reporter: Reporter) -> TrainingOutcome:
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    set_seed(run.seed)  # before LoRA's random init, not only before the training loop
    model_config = _model_config(run)
    config, attention = resolve_engine(_resolve_length(run, model_config.to_dict()), model_config)
    tokenizer = load_training_tokenizer(run.model, trust_remote_code=run.trust_remote_code)
    train_set, stats, reused = _dataset(
        run.training_data, tokenizer, config, run, "train", reporter
    )
    eval_set = None
    if run.validation_data is not None:
        eval_set, _, _ = _dataset(run.validation_data, tokenizer, config, run, "eval", reporter)
    done = "Reused the" if reused else "Tokenized"
    reporter.event(
        f"{done} {stats.examples} training examples: {stats.tokens} tokens, "
        f"{stats.truncated} cut to {config.training.max_seq_length} tokens, "
        f"{stats.dropped} dropped with nothing left to learn"
        + (", tokenized by an earlier run" if reused else ""),
        data={**asdict(stats), "reused": reused},
    )
    model = load_model(
        run.model,
        quantization=config.quantization,
        lora=config.lora,
        attention=attention,
        trust_remote_code=run.trust_remote_code,
        adapter_from=run.adapter_from,
    )
    trainable, total = model.get_nb_trainable_parameters()
    reporter.event(
        f"Loaded {run.model}: {trainable:,} trainable LoRA parameters of {total:,}",
        data={"trainable_parameters": trainable, "parameters": total},
    )
    config = resolve_checkpointing(config, model_config, _lengths(train_set), trainable)
    reporter.configured(config)
    _report_engine(reporter, config, attention)
    callback = ProgressCallback(reporter, accuracy=ACCURACY[config.method])
    arguments = _trainer_arguments(run, config, evaluate=eval_set is not None)
    trainer: Trainer
    if config.method == "dpo":
        trainer = dpo_trainer(
            model,
            tokenizer,
            config,
            arguments,
            train_set,
            eval_set,
            continued=run.adapter_from is not None,
        )
    else:
        trainer = sft_trainer(model, tokenizer, config, arguments, train_set, eval_set)
    trainer.add_callback(callback)
    trainer.remove_callback(PrinterCallback)  # progress goes to the job, not to stdout
    keep_adapter_in_float32(model)
    trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    state = trainer.state
    if callback.stopped_early or run.follower:
        return TrainingOutcome(config, None, state.global_step, state.num_input_tokens_seen)
    adapter_dir = run.workdir / "adapter"
    model.save_pretrained(adapter_dir, selected_adapters=["default"])
    tokenizer.save_pretrained(adapter_dir)
    shape = ModelShape.of(model_config.get_text_config().to_dict())
    return TrainingOutcome(
        config,
        adapter_dir,
        state.global_step,
        state.num_input_tokens_seen,
        parameters=shape.parameters if shape else None,
        tokens_per_second=callback.tokens_per_second,
        generations=_generations(run, config, model, tokenizer, reporter),
    )


def _generations(
    run: TrainingRun, config: JobConfig, model: Any, tokenizer: Any, reporter: Reporter
) -> Path | None:
    """With a validation file, the fine-tuned and the base model's answers to its prompts."""
    samples = config.evaluation.samples
    if run.validation_data is None or samples == 0:
        return None
    prompts = sample_prompts(
        run.validation_data, tokenizer, samples, max_line_bytes=run.max_line_bytes
    )
    if not prompts:
        reporter.event("Evaluation skipped: the validation file has no prompts (plain text)")
        return None
    path = run.workdir / "generations.jsonl"
    seconds = write_generations(model, tokenizer, prompts, config.evaluation, path)
    reporter.event(
        f"Evaluation: the fine-tuned and the base model answered {len(prompts)} validation "
        f"prompts in {seconds:.1f} s",
        data={"samples": len(prompts), "seconds": seconds},
    )
    return path
