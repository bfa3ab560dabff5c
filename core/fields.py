"""How errors name a field, and how they quote a value a client sent."""

# The most of a client's value that an error quotes.
SHOWN_CHARS = 80


def shown(value: str) -> str:
    """A value from a request or a file, quoted for an error: at most `SHOWN_CHARS` of its
    characters, so that an error never echoes a large value whole."""
    return repr(value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "...")


def field_path(location: tuple[int | str, ...] | list[int | str]) -> str:
    """`("messages", 1, "content")` -> `messages[1].content`: how errors name a field."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path
