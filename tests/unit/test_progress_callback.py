"""The trainer callback's decisions, driven with the Trainer's own state and control objects:
what a run does on the step where it learns it must stop, and what it says of epochs."""

from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState

from afina.worker.training.progress import ProgressCallback


class FakeReporter:
    def __init__(self, *, running: bool = True, shutting_down: bool = False) -> None:
        self.running = running
        self.shutting_down = shutting_down
        self.events: list[str] = []

    def event(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        self.events.append(message)

    def metric(self, step: int, values: dict[str, float | None]) -> None: ...

    def progress(
        self, steps_done: int, total_steps: int, epoch: float, estimated_finish: datetime | None
    ) -> bool:
        return self.running

    def save_before_stopping(self) -> bool:
        return self.shutting_down

    def checkpoint(self, step: int, directory: str, metrics: dict[str, float | None]) -> None: ...


ARGS = SimpleNamespace(num_train_epochs=3, max_steps=60, output_dir="/unused")


def step_end(reporter: FakeReporter, control: TrainerControl) -> ProgressCallback:
    callback = ProgressCallback(reporter)
    state = TrainerState(global_step=20, max_steps=60, epoch=1.5)
    callback.on_step_end(ARGS, state, control)
    return callback


def save_and_eval_step() -> TrainerControl:
    """The Trainer's control on a step that is due for a checkpoint and an evaluation."""
    return TrainerControl(should_save=True, should_evaluate=True)


def test_a_running_job_leaves_the_trainer_s_plans_alone():
    control = save_and_eval_step()
    callback = step_end(FakeReporter(), control)
    assert not callback.stopped_early
    assert (control.should_training_stop, control.should_save, control.should_evaluate) == (
        False,
        True,
        True,
    )


def test_a_cancelled_run_stops_at_once_without_saving_or_evaluating():
    control = save_and_eval_step()
    callback = step_end(FakeReporter(running=False), control)
    assert callback.stopped_early
    assert control.should_training_stop
    assert not control.should_save  # a cancelled (or taken back) run keeps nothing
    assert not control.should_evaluate


@pytest.mark.parametrize("due", [True, False])
def test_a_stopping_worker_saves_the_step_it_stops_at(due):
    control = TrainerControl(should_save=due)
    callback = step_end(FakeReporter(running=False, shutting_down=True), control)
    assert callback.stopped_early
    assert control.should_training_stop
    assert control.should_save  # the job resumes from exactly here
    assert not control.should_evaluate


def test_an_epoch_is_counted_against_the_epochs_the_run_will_make():
    reporter = FakeReporter()
    callback = ProgressCallback(reporter)
    # max_steps=60 over 4-step epochs: 15 epochs, whatever n_epochs (3) asked for.
    state = TrainerState(global_step=16, max_steps=60, epoch=4.0, num_train_epochs=15)
    callback.on_epoch_end(ARGS, state, TrainerControl())
    assert reporter.events == ["Epoch 4 of 15 done at step 16"]


class RecordingReporter(FakeReporter):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float | None]]] = []
        self.checkpoints: list[tuple[int, dict[str, float | None]]] = []

    def metric(self, step: int, values: dict[str, float | None]) -> None:
        self.metrics.append((step, values))

    def checkpoint(self, step: int, directory: str, metrics: dict[str, float | None]) -> None:
        self.checkpoints.append((step, metrics))


DPO_TRAIN_LOG = {
    "loss": 0.6,
    "learning_rate": 1e-3,
    "grad_norm": 0.5,
    "mean_token_accuracy": 0.4,
    "rewards/chosen": 0.2,
    "rewards/rejected": -0.1,
    "rewards/accuracies": 0.75,
    "rewards/margins": 0.3,
    "logps/chosen": -12.0,
}
DPO_EVAL_LOG = {"eval_loss": 0.5, "eval_mean_token_accuracy": 0.5, "eval_rewards/accuracies": 1.0}


def test_trl_s_dpo_logs_become_the_documented_metric_names_and_checkpoint_metrics():
    reporter = RecordingReporter()
    callback = ProgressCallback(reporter, accuracy="rewards/accuracies")
    args = SimpleNamespace(**vars(ARGS), eval_strategy="steps")
    state = TrainerState(global_step=60, max_steps=60, epoch=3.0)
    callback.on_log(args, state, TrainerControl(), logs=DPO_TRAIN_LOG)
    control = TrainerControl()
    callback.on_step_end(args, state, control)
    # The last step is the final model: it is saved, and evaluated on the whole set first.
    assert (control.should_save, control.should_evaluate) == (True, True)
    callback.on_log(args, state, TrainerControl(), logs=DPO_EVAL_LOG)
    callback.on_save(args, state, TrainerControl())
    (_, train), (_, evaluated) = reporter.metrics
    assert {name: train[name] for name in train if name.startswith("rewards")} == {
        "rewards_chosen": 0.2,
        "rewards_rejected": -0.1,
        "rewards_accuracies": 0.75,
        "rewards_margins": 0.3,
    }
    assert train["mean_token_accuracy"] == 0.4
    assert evaluated == {
        "eval_loss": 0.5,
        "eval_mean_token_accuracy": 0.5,
        "eval_rewards_accuracies": 1.0,
    }
    # OpenAI's checkpoint metrics, DPO's accuracy being its reward accuracy.
    assert reporter.checkpoints == [
        (
            60,
            {
                "step": 60,
                "train_loss": 0.6,
                "valid_loss": 0.5,
                "train_mean_token_accuracy": 0.75,
                "valid_mean_token_accuracy": 1.0,
                "full_valid_loss": 0.5,
                "full_valid_mean_token_accuracy": 1.0,
            },
        )
    ]


def test_a_checkpoint_before_the_end_has_no_full_validation_metrics():
    reporter = RecordingReporter()
    callback = ProgressCallback(reporter)
    args = SimpleNamespace(**vars(ARGS), eval_strategy="no")
    state = TrainerState(global_step=20, max_steps=60, epoch=1.0)
    callback.on_log(args, state, TrainerControl(), logs={"loss": 2.0, "mean_token_accuracy": 0.3})
    control = TrainerControl()
    callback.on_step_end(args, state, control)
    assert (control.should_save, control.should_evaluate) == (False, False)
    callback.on_save(args, state, TrainerControl())
    assert reporter.checkpoints == [
        (
            20,
            {
                "step": 20,
                "train_loss": 2.0,
                "valid_loss": None,
                "train_mean_token_accuracy": 0.3,
                "valid_mean_token_accuracy": None,
            },
        )
    ]
