"""Which base models a job may name, and what afina can learn about one without torch.

A base model is a Hugging Face id (`org/name`, downloaded by the worker) or an absolute path
to a local directory holding a model. `AFINA_ALLOWED_MODELS` holds glob patterns matched
against the id or the normalised path.

What a refusal says names the model as the caller sent it, never the path it resolves to,
and it says the same of a path that does not exist as of one that is no model directory or
cannot be entered: a caller learns nothing of the server's file system beyond the models it
may use.
"""

import json
import os
import re
from fnmatch import fnmatchcase
from pathlib import Path

# ASCII only: Python's `\w` would also take letters that merely look like Latin ones.
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9_.-]{1,96})?$"
MAX_CONFIG_BYTES = 1024 * 1024
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ModelRefused(ValueError):
    """The model a request names cannot be used; the message says why."""


def is_hub_id(model: str) -> bool:
    if re.fullmatch(HUB_ID_PATTERN, model) is None:
        return False
    return all(part not in (".", "..") for part in model.split("/"))


def is_local(model: str) -> bool:
    return model.startswith("/")


def normalise(model: str) -> str:
    """A local path made canonical (`.`/`..` segments, repeated slashes and symlinks
    resolved), so that an allow-list pattern cannot be walked out of; a hub id unchanged."""
    if any(not character.isprintable() for character in model):
        raise ModelRefused("model must not contain control characters")
    if not is_local(model):
        return model
    try:
        return os.path.realpath(model)
    except OSError:  # a link it may not follow (`/proc/1/root`), a name too long
        raise not_a_model_directory(model) from None


def not_a_model_directory(shown: str) -> ModelRefused:
    return ModelRefused(
        f"model {shown!r} is not a model directory this service can read "
        "(a directory holding config.json)"
    )


def check_allowed(model: str, patterns: list[str], shown: str | None = None) -> None:
    """Refuse `model` unless a pattern matches it; the message names it as `shown` (what
    the caller sent)."""
    if not any(fnmatchcase(model, pattern) for pattern in patterns):
        raise ModelRefused(
            f"model {shown if shown is not None else model!r} is not allowed here: "
            "AFINA_ALLOWED_MODELS permits " + ", ".join(repr(pattern) for pattern in patterns)
        )


def read_local_config(path: str, shown: str | None = None) -> dict[str, object]:
    """The `config.json` of a local model directory; ModelRefused if there is none. Messages
    name the model as `shown` (what the caller sent)."""
    shown = path if shown is None else shown
    directory = Path(path)
    config_file = directory / "config.json"
    try:  # a name too long, a directory the service may not enter: OSError, even to look
        is_model = directory.is_dir() and config_file.is_file()
    except OSError:
        is_model = False
    if not is_model:  # not a FIFO or a device either: reading one could hang
        raise not_a_model_directory(shown)
    problem = f"cannot read the config.json of model {shown!r}"
    try:
        if config_file.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelRefused(f"{problem}: it is over {MAX_CONFIG_BYTES} bytes")
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelRefused(f"{problem}: {error.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ModelRefused(f"{problem}: {error}") from None
    if not isinstance(config, dict):
        raise ModelRefused(f"{problem}: it is not a JSON object")
    return config


def cached_hub_config(model_id: str) -> dict[str, object] | None:
    """The `config.json` of a hub model this machine has downloaded; None if it has not
    (nothing is fetched)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(path, str):
        return None
    try:
        with open(path, "rb") as config_file:
            loaded = json.loads(config_file.read(MAX_CONFIG_BYTES))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def max_length(config: dict[str, object]) -> int | None:
    """The context length a model config declares, if any."""
    sources = [config]
    if isinstance(config.get("text_config"), dict):
        sources.insert(0, config["text_config"])  # type: ignore[arg-type]
    for source in sources:
        for key in _LENGTH_KEYS:
            value = source.get(key)
            if type(value) is int and value > 0:
                return value
    return None
