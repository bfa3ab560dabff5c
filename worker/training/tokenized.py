"""A job's tokenized datasets, kept so that a resumed run of the job does not tokenize its
files again: each as `{name}/dataset` (Arrow, `Dataset.save_to_disk`) and `{name}/stats.json`
(what tokenizing cut and dropped, for the run's events). They depend only on what the job
fixes (its files, model tokenizer, max_seq_length and loss_on), so every run of it can use
them."""

import json
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset

from afina.core.records import RecordStats


def save(dataset: Dataset, stats: RecordStats, directory: Path) -> Path:
    dataset.save_to_disk(str(directory / "dataset"))
    (directory / "stats.json").write_text(json.dumps(asdict(stats)))
    return directory


def load(directory: Path) -> tuple[Dataset, RecordStats] | None:
    """The dataset kept in `directory`, or None when there is none (whole)."""
    stats = directory / "stats.json"
    if not stats.is_file():
        return None
    dataset = Dataset.load_from_disk(str(directory / "dataset"))
    return dataset, RecordStats(**json.loads(stats.read_text()))
