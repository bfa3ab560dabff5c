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


def _keep(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> Any:
    """Put `value` in `cache`, the oldest entry out past `limit`; safe on the API's request
    threads, which may evict the same entry at once."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache), None), None)
    cache[key] = value
    return value


def _tokenizer(model: str, trust_remote_code: bool) -> Any | None:
    from afina.core.model_loading import ModelLoadError, load_tokenizer  # torch: only if asked

    key = (model, trust_remote_code)
    if (loaded := _tokenizers.get(key)) is not None:
        return loaded
    try:
        loaded = load_tokenizer(model, trust_remote_code=trust_remote_code, offline=True)
    except ModelLoadError:
        return None
    return _keep(_tokenizers, key, loaded, 4)


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
    if (known := _counted.get(key)) is not None:
        return Dataset(known, counted=True)
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
    _keep(_counted, key, lengths, _KEEP)
    return Dataset(lengths, counted=True)
