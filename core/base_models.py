"""Which base models a job may name, and what afina can learn about one without torch.

A base model is a Hugging Face id (`org/name`, downloaded by the worker) or an absolute path
to a local directory holding a model. `AFINA_ALLOWED_MODELS` holds glob patterns matched
against the id or the normalised path.
"""

import json
import os
import re
from fnmatch import fnmatchcase
from pathlib import Path

HUB_ID_PATTERN = r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$"
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
    """A local path with `.`/`..` segments and repeated slashes folded, so that an
    allow-list pattern cannot be walked out of; a hub id unchanged."""
    return os.path.normpath(model) if is_local(model) else model


def check_allowed(model: str, patterns: list[str]) -> None:
    if not any(fnmatchcase(model, pattern) for pattern in patterns):
        raise ModelRefused(
            f"model {model!r} is not allowed here: AFINA_ALLOWED_MODELS permits "
            + ", ".join(repr(pattern) for pattern in patterns)
        )


def read_local_config(path: str) -> dict[str, object]:
    """The `config.json` of a local model directory; ModelRefused if there is none."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not Path(path).is_dir():
            raise ModelRefused(f"model directory {path!r} does not exist") from None
        raise ModelRefused(f"{path!r} holds no model: config.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelRefused(f"cannot read {config_file}: {error}") from None
    if not isinstance(config, dict):
        raise ModelRefused(f"{config_file} is not a JSON object")
    return config


def max_length(config: dict[str, object]) -> int | None:
    """The context length a model config declares, if any."""
    sources = [config]
    if isinstance(config.get("text_config"), dict):
        sources.insert(0, config["text_config"])  # type: ignore[arg-type]
    for source in sources:
        for key in _LENGTH_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None
