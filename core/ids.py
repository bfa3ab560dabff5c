"""Object ids in OpenAI's style: a type prefix and random characters (`file-...`)."""

import secrets

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "-" + "".join(secrets.choice(_ALPHABET) for _ in range(length))
