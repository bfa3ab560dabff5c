"""Object ids in OpenAI's style: a type prefix and random characters (`file-...`)."""

import re
import secrets

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# What any afina id looks like; checked before an id from a URL reaches the database.
ID_PATTERN = r"^[a-z]+-[A-Za-z0-9]{1,58}$"
_ID = re.compile(ID_PATTERN)


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def checkpoint_name(job_id: str, step: int) -> str:
    """A checkpoint's model name (`ftjob-...:ckpt-step-N`): what serving, training further,
    downloads and exports take."""
    return f"{job_id}:ckpt-step-{step}"


def looks_like_id(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "-") and _ID.match(value) is not None
