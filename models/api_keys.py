from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from afina.models.base import Base, CreatedAt


class ApiKey(CreatedAt, Base):
    """A key made with `afina keys create`. Only its SHA-256 is kept: the key itself is
    shown once, when it is made; `prefix` (its first characters) tells keys apart in lists."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    revoked_at: Mapped[datetime | None]
