"""A training file's examples as token counts, counted as the run will count them: the
model's tokenizer over each example after its format's template (`core.records`), cut to
`max_seq_length`, examples left with no token to learn from dropped (`RecordError` for one
the template cannot render); a preference pair counts both its rows, padded to the longer.
The tokenizer is read from local files only (a local model, or a hub model this machine has
downloaded); without one the counts are estimated from the file's characters."""

from collections.abc import Callable
from typing import Any, BinaryIO

from afina.core.datasets import read_examples
from afina.core.job_config import JobConfig
from afina.core.records import RecordStats, sequence_tokens, to_records
from afina.jobs.planning import Dataset
from afina.models import File

# (file id, model, loss_on, max_seq_length) -> counts: files never change, and a user asks
# for an estimate, then creates the job.
_counted: dict[tuple[str, str, str, int], tuple[int, ...]] = {}
_KEEP = 32
_tokenizers: dict[tuple[str, bool], Any] = {}  # loaded ones only: a model may come later


def _tokenizer(model: str, trust_remote_code: bool) -> Any | None:
    from afina.core.model_loading import ModelLoadError, load_tokenizer  # torch: only if asked

    key = (model, trust_remote_code)
    if key not in _tokenizers:
        try:
            loaded = load_tokenizer(model, trust_remote_code=trust_remote_code, offline=True)
        except ModelLoadError:
            return None
        if len(_tokenizers) >= 4:
            _tokenizers.pop(next(iter(_tokenizers)))
        _tokenizers[key] = loaded
    return _tokenizers[key]


def _remember(key: tuple[str, str, str, int], lengths: tuple[int, ...]) -> None:
    if len(_counted) >= _KEEP:
        _counted.pop(next(iter(_counted)))
    _counted[key] = lengths


def dataset_tokens(
    file: File,
    open_data: Callable[[], BinaryIO],
    model: str,
    config: JobConfig,
    *,
    max_line_bytes: int,
    trust_remote_code: bool,
) -> Dataset:
    max_seq_length = config.training.max_seq_length
    assert max_seq_length is not None
    key = (file.id, model, config.training.loss_on, max_seq_length)
    if key in _counted:
        return Dataset(_counted[key], counted=True)
    tokenizer = _tokenizer(model, trust_remote_code)
    if tokenizer is None:
        each = max(1, min(max_seq_length, file.estimated_tokens // max(1, file.num_examples)))
        return Dataset((each,) * file.num_examples, counted=False)
    with open_data() as stream:
        records = to_records(
            read_examples(stream, max_line_bytes=max_line_bytes),
            tokenizer,
            loss_on=config.training.loss_on,
            max_length=max_seq_length,
            stats=RecordStats(),
        )
        lengths = tuple(sequence_tokens(record) for record in records)
    _remember(key, lengths)
    return Dataset(lengths, counted=True)
