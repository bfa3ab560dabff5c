"""A job that asks for several GPUs (`resources.gpus: N`): the worker's task process starts
N ranks with torchrun on this node, waits for them, and records how the run ended as it does
for a run of one process (`job_runner.finish`).

The task process keeps the job's heartbeat and fetches the run's inputs once; rank 0 writes
the job's progress, metrics and checkpoints through a `JobRecorder` of the same run (so the
run's fencing holds), and hands its outcome back in a file; a rank that fails writes its
error and exits, and torchrun stops the others. A worker that is stopping asks the ranks to
stop through a file in the run's folder: they save a checkpoint at the next step, and the
job is queued again, as for one process. On a node without GPUs the ranks are CPU processes
(gloo): the same code path, which is how it is tested."""

import json
import logging
import pickle
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.distributed as dist

from afina.core.settings import get_settings
from afina.jobs.run import Run
from afina.models import Job
from afina.services.root import Services
from afina.worker.job_runner import Inputs, WorkerContext, as_failure, training_run, workdir
from afina.worker.process import shutdown_requested
from afina.worker.run_recorder import JobRecorder
from afina.worker.training.distributed import RankReporter, start_rank
from afina.worker.training.errors import TrainingFailure
from afina.worker.training.run import TrainingOutcome, train

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
STOP_FILE = "stop"
OUTCOME_FILE = "outcome.pickle"
ERROR_FILE = ".error.pickle"  # `rank-{n}.error.pickle`: what made rank n fail


def train_on_ranks(
    context: WorkerContext, job: Job, recorder: JobRecorder, inputs: Inputs, ranks: int
) -> TrainingOutcome:
    """Train the job on `ranks` processes; rank 0's outcome."""
    folder = workdir(context, recorder.run)
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "inputs.json"
    spec.write_text(json.dumps({k: str(v) if v else None for k, v in asdict(inputs).items()}))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}", "-m", "afina.worker.ranks",
        job.id, recorder.run.run_id, str(folder),
    ]  # fmt: skip
    recorder.event(f"Training on {ranks} ranks (distributed data parallel)", data={"ranks": ranks})
    log = folder / "ranks.log"
    with log.open("wb") as output:
        # Our own interpreter and module; the arguments are ids and a path of ours.
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)  # noqa: S603
        while process.poll() is None:
            if shutdown_requested.is_set():
                (folder / STOP_FILE).touch()
            time.sleep(POLL_SECONDS)
    outcome = folder / OUTCOME_FILE
    if outcome.exists():
        # Written by rank 0 of this run, in the run's own folder.
        ended: dict[str, Any] = pickle.loads(outcome.read_bytes())  # noqa: S301
        recorder.steps_done, recorder.pausing = ended["steps_done"], ended["pausing"]
        return ended["outcome"]
    failed = sorted(folder.glob(f"*{ERROR_FILE}"), key=lambda path: path.stat().st_mtime)
    if failed:  # the first rank that failed says why (the others stopped for it)
        raise pickle.loads(failed[0].read_bytes())  # noqa: S301 (a rank of this run wrote it)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    raise TrainingFailure(
        "training_error",
        f"a rank of the distributed run stopped (exit {process.returncode}): {tail[0][:300]}",
    )


def _rank_main(job_id: str, run_id: str, folder: Path) -> None:
    rank, device = start_rank()
    services = Services(get_settings())
    context = WorkerContext(services.settings, services.session_factory, services.storage)
    paths = json.loads((folder / "inputs.json").read_text())
    inputs = Inputs(**{k: Path(v) if v else None for k, v in paths.items()})
    with context.session_factory() as session:
        job = session.get_one(Job, job_id)
    recorder = (
        JobRecorder(context.session_factory, context.storage, Run(job_id, run_id))
        if rank == 0
        else None
    )
    reporter = RankReporter(recorder, (folder / STOP_FILE).exists, device)
    run = training_run(
        context,
        job,
        inputs,
        folder / f"rank-{rank}",
        trainer_dir=folder / "trainer",
        follower=rank > 0,
    )
    try:
        outcome = train(run, reporter)
    except Exception as error:
        # Written for the task, and a failing exit, so that torchrun stops the other ranks
        # at once rather than leave them waiting for this one in a collective.
        logger.exception("rank %d of job %s failed", rank, job_id)
        try:  # the error as itself, for the task to name (out of memory, a full disk ...)
            kept = pickle.dumps(error)
        except Exception:
            kept = pickle.dumps(as_failure(error, job))
        (folder / f"rank-{rank}{ERROR_FILE}").write_bytes(kept)
        sys.exit(1)
    if recorder is not None:
        ended = {"outcome": outcome, "steps_done": recorder.steps_done, "pausing": recorder.pausing}
        (folder / OUTCOME_FILE).write_bytes(pickle.dumps(ended))
    dist.destroy_process_group()
    services.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    _rank_main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
