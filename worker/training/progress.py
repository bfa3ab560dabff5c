"""The trainer callback that reports a run as it goes: a metric point per logging step
(loss, eval_loss, learning rate, grad norm, tokens/s, token accuracy, DPO's rewards),
progress and ETA per step, events at milestones (the last one with the run's throughput and
peak memory), each checkpoint with OpenAI's checkpoint metrics, and a stop at the next step
once the job is cancelled (or, with a checkpoint to resume from, once the worker shuts down).

The last step always saves a checkpoint and, with a validation set, evaluates first: that
checkpoint is the final model, and its `full_valid_loss` the loss on the whole validation set
at the end."""

import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from afina.core.job_config import JobConfig
from afina.worker.training.memory import peak_memory, reset_peak_memory


class Reporter(Protocol):
    """Where a run's progress goes (the job's rows in the database)."""

    def event(self, message: str, *, data: dict[str, Any] | None = None) -> None: ...

    def configured(self, config: JobConfig) -> None:
        """Record the config the run trains with: each "auto" decided."""
        ...

    def tokenized(self, name: str, directory: Path) -> None:
        """Keep a dataset the run tokenized (`training.tokenized`), for later runs of the job."""
        ...

    def metric(self, step: int, values: dict[str, float | None]) -> None: ...

    def progress(
        self, steps_done: int, total_steps: int, epoch: float, estimated_finish: datetime | None
    ) -> bool:
        """Record progress; False once the run must stop (cancelled, worker stopping)."""
        ...

    def save_before_stopping(self) -> bool:
        """Whether a run told to stop saves a checkpoint first, to be resumed later."""
        ...

    def checkpoint(self, step: int, directory: str, metrics: dict[str, float | None]) -> None: ...


# trl's names for what it logs beside the loss -> afina's metric series (`JobMetric`).
TRAIN_METRICS = {
    "mean_token_accuracy": "mean_token_accuracy",
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/accuracies": "rewards_accuracies",
    "rewards/margins": "rewards_margins",
}
EVAL_METRICS = {
    "eval_mean_token_accuracy": "eval_mean_token_accuracy",
    "eval_rewards/accuracies": "eval_rewards_accuracies",
}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


class ProgressCallback(TrainerCallback):
    def __init__(self, reporter: Reporter, accuracy: str = "mean_token_accuracy") -> None:
        self.reporter = reporter
        self.accuracy = accuracy  # the logged value checkpoints report as accuracy
        self.started = 0.0
        self.cpu_started = 0.0
        self.first_step = 0
        self.last_loss: float | None = None
        self.last_accuracy: float | None = None
        self.last_eval_loss: float | None = None
        self.last_eval_accuracy: float | None = None
        self.eval_step: int | None = None
        self.tokens_at_start = self.tokens_at_last_log = 0
        self.time_at_last_log = 0.0
        self.stopped_early = False
        self.tokens_per_second: float | None = None  # measured over the run, once it ends

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        reset_peak_memory()
        self.started = self.time_at_last_log = time.monotonic()
        self.cpu_started = time.process_time()
        self.first_step = state.global_step
        self.tokens_at_start = self.tokens_at_last_log = state.num_input_tokens_seen
        self.reporter.progress(state.global_step, state.max_steps, state.epoch or 0.0, None)
        span = "" if args.max_steps > 0 else f" over {args.num_train_epochs:g} epoch(s)"
        begun = (
            f"Training resumed at step {state.global_step} of {state.max_steps}"
            if state.global_step
            else f"Training started: {state.max_steps} steps{span}"
        )
        self.reporter.event(
            f"{begun}, logging every {state.logging_steps} step(s)",
            data={"total_steps": state.max_steps, "step": state.global_step},
        )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        logs = logs or {}
        step = state.global_step
        if "loss" in logs:
            now = time.monotonic()
            tokens = state.num_input_tokens_seen - self.tokens_at_last_log
            elapsed = now - self.time_at_last_log
            self.tokens_at_last_log, self.time_at_last_log = state.num_input_tokens_seen, now
            self.last_loss = _finite(logs["loss"])
            self.last_accuracy = _finite(logs.get(self.accuracy))
            self.reporter.metric(
                step,
                {
                    "epoch": _finite(logs.get("epoch", state.epoch)),
                    "loss": self.last_loss,
                    "learning_rate": _finite(logs.get("learning_rate")),
                    "grad_norm": _finite(logs.get("grad_norm")),
                    "tokens_per_second": tokens / elapsed if elapsed > 0 else None,
                    **{ours: _finite(logs.get(name)) for name, ours in TRAIN_METRICS.items()},
                },
            )
        if "eval_loss" in logs:
            self.last_eval_loss = _finite(logs["eval_loss"])
            self.last_eval_accuracy = _finite(logs.get(f"eval_{self.accuracy}"))
            self.eval_step = step
            self.reporter.metric(
                step,
                {
                    "eval_loss": self.last_eval_loss,
                    **{ours: _finite(logs.get(name)) for name, ours in EVAL_METRICS.items()},
                },
            )
            self.reporter.event(
                f"Step {step}: eval_loss {logs['eval_loss']:.4f}",
                data={"step": step, "eval_loss": self.last_eval_loss},
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        done = state.global_step - self.first_step
        remaining = state.max_steps - state.global_step
        finish = None
        if done > 0:
            per_step = (time.monotonic() - self.started) / done
            finish = datetime.now(UTC) + timedelta(seconds=per_step * remaining)
        if not self.reporter.progress(
            state.global_step, state.max_steps, state.epoch or 0.0, finish
        ):
            self.stopped_early = True
            control.should_training_stop = True
            # The Trainer saves right after this step when asked: `on_save` then keeps it. A
            # run cancelled (or taken back) on a save or eval step neither saves nor evaluates:
            # it keeps nothing, and stops at once.
            control.should_save = self.reporter.save_before_stopping()
            control.should_evaluate = False
        elif state.global_step >= state.max_steps:  # the final model, as a checkpoint too
            control.should_save = True
            control.should_evaluate = args.eval_strategy != "no"

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        epoch = round(state.epoch or 0)
        if self.stopped_early or epoch < 1 or abs((state.epoch or 0) - epoch) > 1e-6:
            return  # cut short (cancel, max_steps): not a finished epoch
        self.reporter.event(
            f"Epoch {epoch} of {state.num_train_epochs:g} done at step {state.global_step}",
            data={"step": state.global_step, "epoch": state.epoch},
        )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        step = state.global_step
        metrics = {
            "step": step,
            "train_loss": self.last_loss,
            "valid_loss": self.last_eval_loss,
            "train_mean_token_accuracy": self.last_accuracy,
            "valid_mean_token_accuracy": self.last_eval_accuracy,
        }
        if step >= state.max_steps and self.eval_step == step and not self.stopped_early:
            metrics |= {
                "full_valid_loss": self.last_eval_loss,
                "full_valid_mean_token_accuracy": self.last_eval_accuracy,
            }
        self.reporter.checkpoint(step, f"{args.output_dir}/checkpoint-{step}", metrics)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        seconds = time.monotonic() - self.started
        cpu_seconds = time.process_time() - self.cpu_started
        tokens = state.num_input_tokens_seen - self.tokens_at_start
        tokens_per_second = tokens / seconds if seconds > 0 else 0.0
        self.tokens_per_second = tokens_per_second or None
        memory, measure = peak_memory()
        self.reporter.event(
            f"Training done: {state.global_step - self.first_step} steps in {seconds:.1f} s, "
            f"{tokens_per_second:.0f} tokens/s, peak memory {memory / 2**30:.2f} GiB",
            data={
                "steps": state.global_step - self.first_step,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,  # all threads: less noisy than seconds on a busy CPU
                "tokens": tokens,
                "tokens_per_second": tokens_per_second,
                "peak_memory_bytes": memory,
                "peak_memory": measure,
            },
        )
