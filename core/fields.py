def field_path(location: tuple[int | str, ...] | list[int | str]) -> str:
    """`("messages", 1, "content")` -> `messages[1].content`: how errors name a field."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path
