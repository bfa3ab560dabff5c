"""The files a succeeded job leaves its owner, in OpenAI's shape (purpose
`fine-tune-results`, read with `GET /v1/files/{id}/content`): the step metrics as CSV, and,
after an evaluation, the generations as JSON lines.

Each blob is written before its row, in the transaction that marks the job succeeded: should
that transaction not commit, `discard` removes the blobs, so a row never lacks its blob.
"""

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from afina.core.ids import new_id
from afina.core.storage import ArtifactStorage, file_key
from afina.models import RESULTS_PURPOSE, File, Job, JobMetric

# CSV column -> JobMetric attribute: OpenAI's columns first, under their names.
METRIC_COLUMNS = {
    "step": "step",
    "train_loss": "loss",
    "train_mean_token_accuracy": "mean_token_accuracy",
    "valid_loss": "eval_loss",
    "valid_mean_token_accuracy": "eval_mean_token_accuracy",
    "epoch": "epoch",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "tokens_per_second": "tokens_per_second",
}
# A DPO job's accuracy is its reward accuracy, in the CSV as on its checkpoints
# (`worker.training.progress`); trl's token accuracy of the preferred answers stays beside it.
DPO_COLUMNS = {
    "train_mean_token_accuracy": "rewards_accuracies",
    "valid_mean_token_accuracy": "eval_rewards_accuracies",
    "train_token_accuracy": "mean_token_accuracy",
    "valid_token_accuracy": "eval_mean_token_accuracy",
    "rewards_chosen": "rewards_chosen",
    "rewards_rejected": "rewards_rejected",
    "rewards_accuracies": "rewards_accuracies",
    "rewards_margins": "rewards_margins",
}


def _metrics_csv(points: Iterable[JobMetric], columns: dict[str, str]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for point in points:
        values = (getattr(point, attribute) for attribute in columns.values())
        writer.writerow("" if value is None else value for value in values)
    return text.getvalue().encode()


def _stored(
    storage: ArtifactStorage, job: Job, name: str, content: bytes, file_format: str, rows: int
) -> File:
    row = File(
        id=new_id("file"),
        project=job.project,
        filename=f"{job.id}-{name}",
        purpose=RESULTS_PURPOSE,
        bytes=len(content),
        format=file_format,
        num_examples=rows,
        estimated_tokens=0,
    )
    with storage.atomic_write(file_key(row.id)) as out:
        out.write(content)
    return row


def store(
    storage: ArtifactStorage, session: Session, job: Job, method: str, generations: Path | None
) -> list[File]:
    """Write the job's result files and add their rows to `session`."""
    columns = METRIC_COLUMNS | (DPO_COLUMNS if method == "dpo" else {})
    points = session.scalars(
        select(JobMetric).where(JobMetric.job_id == job.id).order_by(JobMetric.step)
    ).all()
    files = [
        _stored(storage, job, "metrics.csv", _metrics_csv(points, columns), "csv", len(points))
    ]
    try:
        if generations is not None:
            content = generations.read_bytes()
            lines = content.count(b"\n")
            files.append(_stored(storage, job, "generations.jsonl", content, "jsonl", lines))
    except BaseException:
        discard(storage, files)
        raise
    session.add_all(files)
    return files


def discard(storage: ArtifactStorage, files: Iterable[File]) -> None:
    for row in files:
        storage.delete(file_key(row.id))
