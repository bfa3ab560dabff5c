"""The error a failed job shows: `{code, message, param}` that a user can act on."""

from dataclasses import asdict, dataclass


@dataclass
class TrainingFailure(Exception):
    code: str
    message: str
    param: str | None = None

    def __str__(self) -> str:
        return self.message

    def as_error(self) -> dict[str, str | None]:
        return asdict(self)


def first_line(error: BaseException) -> str:
    """The error's message for a user: its first line, at most 300 characters."""
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
