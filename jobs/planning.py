"""The plan afina would run for a job: the batch size and gradient checkpointing it picks,
the memory and time the run takes (`core.estimate`), and which registered workers can run
it. `POST /v1/fine_tuning/jobs/estimate` answers with it, and job creation refuses a job
that fits no live worker.

- `batch_size: "auto"` is the largest batch, up to `AUTO_BATCH_LIMIT` and the number of
  examples, that fits the smallest worker able to take the job at all;
- `gradient_checkpointing: "auto"` is on only when the run would not fit without it;
- a worker can take a run whose total is at most `FIT_SHARE` of its memory (the rest is the
  runtime's: the CUDA context, the allocator's slack), `CPU_RESIDENT_FACTOR` times the total
  on a CPU worker;
- the time is the tokens trained over the throughput that worker measured on a model of
  that size, else the FLOPs model (`core.estimate.flops_model_seconds`);
- the job goes to the queue of the smallest worker class that fits it: the first training
  queue of that smallest worker (`queue`), unless the request named one (`resources.queue`:
  the plan is then made on the workers that take that queue alone).
A worker's compute dtype follows the job's setting; "auto" is bfloat16 on a GPU and float32
on a CPU, as the worker picks it.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from afina.core.estimate import (
    Memory,
    ModelShape,
    flops_model_seconds,
    memory,
    size,
    tokens_per_step,
)
from afina.core.job_config import DEFAULT_BATCH_SIZE, JobConfig
from afina.jobs.queue import TRAIN_QUEUE
from afina.jobs.workers import queues_of, size_key, taking
from afina.models import Worker

AUTO_BATCH_LIMIT = DEFAULT_BATCH_SIZE
FIT_SHARE = 0.9
# On a CPU a run's peak resident set is about twice what the estimate counts (the loss's
# transient copies, and memory glibc's allocator keeps once freed): bench/estimate_memory.py
# measured 1.7-2.4 times. A CPU worker is checked against the estimate times this.
CPU_RESIDENT_FACTOR = 2.5
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Dataset:
    """The training file as the run sees it: each example's tokens, cut to the run's
    `max_seq_length`; `counted` is False when they are estimated from its characters (the
    model's tokenizer is not on this server)."""

    lengths: Sequence[int]
    counted: bool


class PlannedSettings(BaseModel):
    """What the run will use for the settings a body may leave "auto"."""

    batch_size: int
    gradient_checkpointing: bool
    max_seq_length: int


class Fits(BaseModel):
    checked: bool  # False with no live worker: nothing to check against
    workers: list[str]
    reason: str | None = None
    param: str | None = None  # the setting to change when it fits none


class Plan(BaseModel):
    object: Literal["fine_tuning.job.estimate"] = "fine_tuning.job.estimate"
    memory: Memory
    trainable_parameters: int
    parameters: int
    tokens: int
    tokens_counted: bool
    examples: int
    steps: int
    estimated_seconds: float | None
    estimated_from: Literal["measured_throughput", "flops_model"] | None
    settings: PlannedSettings
    fits: Fits
    queue: str | None = Field(
        description="The training queue the job is sent to: resources.queue, or the first "
        "queue of the smallest worker that fits it (its worker class); train with no worker "
        "to check against; null when it fits none."
    )


@dataclass(frozen=True)
class _Choice:
    batch_size: int
    checkpointing: bool


def _dtype_bytes(config: JobConfig, device_kind: str) -> int:
    setting = config.quantization.compute_dtype
    if setting == "auto":
        return 2 if device_kind == "cuda" else 4
    return _DTYPE_BYTES[setting]


def _memory(
    shape: ModelShape, config: JobConfig, data: Dataset, device_kind: str, choice: _Choice
) -> Memory:
    training = config.training
    assert training.max_seq_length is not None
    if training.packing:
        tokens = choice.batch_size * training.max_seq_length
    else:
        padding_free = bool(training.padding_free)
        tokens = tokens_per_step(list(data.lengths), choice.batch_size, padding_free=padding_free)
    return memory(
        shape,
        bits=config.quantization.bits,
        double_quant=config.quantization.double_quant,
        dtype_bytes=_dtype_bytes(config, device_kind),
        lora_r=config.lora.r,
        target_modules=config.lora.target_modules,
        tokens_per_step=tokens,
        checkpointing=choice.checkpointing,
    )


def _choices(config: JobConfig, data: Dataset, *, auto_batch: bool) -> list[_Choice]:
    """What the run may use, best first: larger batches, then checkpointing off."""
    asked = config.training.gradient_checkpointing
    checkpointing = [False, True] if asked == "auto" else [bool(asked)]
    largest = max(1, min(AUTO_BATCH_LIMIT, len(data.lengths)))
    batches = range(largest, 0, -1) if auto_batch else [config.hyperparameters.batch_size]
    return [_Choice(batch, ckpt) for batch in batches for ckpt in checkpointing]


def _needed(total: int, worker: Worker) -> float:
    return total * (CPU_RESIDENT_FACTOR if worker.device_kind == "cpu" else 1)


def _fits(total: int, worker: Worker) -> bool:
    return _needed(total, worker) <= FIT_SHARE * worker.memory_total


def _steps(config: JobConfig, data: Dataset, batch_size: int) -> int:
    """Optimizer steps: each takes `batch_size` rows on each rank, accumulated."""
    training = config.training
    assert training.max_seq_length is not None
    rows = len(data.lengths)
    if training.packing:
        rows = math.ceil(sum(data.lengths) / training.max_seq_length)
    global_batch = batch_size * config.resources.gpus
    per_epoch = math.ceil(math.ceil(rows / global_batch) / training.gradient_accumulation_steps)
    steps = per_epoch * config.hyperparameters.n_epochs
    return min(steps, training.max_steps) if training.max_steps else steps


def _remedy(
    shape: ModelShape, config: JobConfig, data: Dataset, worker: Worker, choice: _Choice
) -> str:
    """The setting to change so that the run fits `worker` (the largest one)."""
    training = config.training
    if not choice.checkpointing and _fits(
        _memory(shape, config, data, worker.device_kind, _Choice(choice.batch_size, True)).total,
        worker,
    ):
        return "training.gradient_checkpointing"
    if choice.batch_size > 1:
        return "hyperparameters.batch_size"
    if config.quantization.bits != 4:
        return "quantization.bits"
    if training.max_seq_length and training.max_seq_length > 256:
        return "training.max_seq_length"
    return "model"


def route(target: Worker | None, named: str | None, *, checked: bool) -> str | None:
    """The training queue of a job planned on `target`, the smallest worker that fits it
    (None: it fits none, or there was none to check, `checked` False): the queue the request
    named, else `target`'s first (its worker class's); `TRAIN_QUEUE` with nothing checked."""
    if checked and target is None:
        return None
    if named is not None:
        return named
    if target is None:
        return TRAIN_QUEUE
    return next(iter(queues_of(target)), TRAIN_QUEUE)


def plan(
    shape: ModelShape,
    config: JobConfig,
    data: Dataset,
    workers: Sequence[Worker],
    *,
    auto_batch: bool,
    queue: str | None = None,
) -> Plan:
    """The plan for `config` (resolved, with `auto_batch` saying the batch size was "auto")
    on the live `workers`, smallest memory first: with `queue` (the one the request named),
    those that take it."""
    if queue is not None:
        workers = taking(workers, queue)
    ranks = config.resources.gpus
    most_ranks = max((worker.max_ranks for worker in workers), default=0)
    workers = [worker for worker in workers if worker.max_ranks >= ranks]
    choices = _choices(config, data, auto_batch=auto_batch)
    chosen, target = None, None
    for worker in workers:
        chosen = next(
            (
                choice
                for choice in choices
                if _fits(_memory(shape, config, data, worker.device_kind, choice).total, worker)
            ),
            None,
        )
        if chosen is not None:
            target = worker
            break
    fits = Fits(checked=bool(workers) or most_ranks > 0, workers=[])
    if not workers and fits.checked:  # none has as many GPUs as the job asks for
        chosen = choices[0]
        fits.reason = (
            f"asks for {ranks} GPUs of one node, and the live workers' nodes have at most "
            f"{most_ranks}"
        )
        fits.param = "resources.gpus"
    elif not workers:  # nothing to fit: the settings as asked, or the defaults
        chosen = choices[0]
    elif chosen is None:  # fits none: shown as the least the run could take on the largest
        chosen, largest = choices[-1], workers[-1]
        needed = _needed(_memory(shape, config, data, largest.device_kind, chosen).total, largest)
        on = f" on queue {queue}" if queue is not None else ""
        fits.reason = (
            f"needs {size(needed)}, the largest worker{on} ({largest.device_name}) has "
            f"{size(largest.memory_total)} and a run may use {FIT_SHARE:.0%} of it"
        )
        fits.param = _remedy(shape, config, data, largest, chosen)
    shown_on = target or (workers[-1] if workers else None)  # none: a GPU is assumed
    estimate = _memory(shape, config, data, shown_on.device_kind if shown_on else "cuda", chosen)
    if target is not None:
        fits.workers = [
            worker.id
            for worker in workers
            if _fits(_memory(shape, config, data, worker.device_kind, chosen).total, worker)
        ]
    assert config.training.max_seq_length is not None
    tokens = sum(data.lengths)
    trained = tokens * config.hyperparameters.n_epochs
    seconds, source = _seconds(shape, config, data, target, trained, chosen.checkpointing)
    return Plan(
        memory=estimate,
        trainable_parameters=shape.lora_parameters(config.lora.r, config.lora.target_modules),
        parameters=shape.parameters,
        tokens=tokens,
        tokens_counted=data.counted,
        examples=len(data.lengths),
        steps=_steps(config, data, chosen.batch_size),
        estimated_seconds=seconds,
        estimated_from=source,
        settings=PlannedSettings(
            batch_size=chosen.batch_size,
            gradient_checkpointing=chosen.checkpointing,
            max_seq_length=config.training.max_seq_length,
        ),
        fits=fits,
        queue=route(target, queue, checked=fits.checked),
    )


def _seconds(
    shape: ModelShape,
    config: JobConfig,
    data: Dataset,
    worker: Worker | None,
    trained_tokens: int,
    checkpointing: bool,
) -> tuple[float | None, Literal["measured_throughput", "flops_model"] | None]:
    if worker is None:
        return None, None
    bits = config.quantization.bits
    measured = worker.throughput.get(size_key(shape.parameters, bits))
    if measured:
        return trained_tokens / measured, "measured_throughput"
    flops = config.hyperparameters.n_epochs * shape.training_flops(
        data.lengths,
        lora_parameters=shape.lora_parameters(config.lora.r, config.lora.target_modules),
        checkpointing=checkpointing,
    )
    seconds = flops_model_seconds(
        flops,
        device_kind=worker.device_kind,
        device_name=worker.device_name,
        cores=worker.cpu_cores,
        bits=bits,
    )
    return seconds, "flops_model"


def applied(
    config: JobConfig, settings: PlannedSettings, *, batch_size: bool, checkpointing: bool
) -> JobConfig:
    """`config` with what the plan picked for the settings that were "auto"."""
    hyperparameters, training = config.hyperparameters, config.training
    if batch_size:
        hyperparameters = hyperparameters.model_copy(update={"batch_size": settings.batch_size})
    if checkpointing:
        training = training.model_copy(
            update={"gradient_checkpointing": settings.gradient_checkpointing}
        )
    return config.model_copy(update={"hyperparameters": hyperparameters, "training": training})
