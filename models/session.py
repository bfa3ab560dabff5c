"""Engine and session factory, the same on SQLite (embedded) and PostgreSQL (production)."""

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

# How long a thread waits for a pooled connection before its request gets a 503: with the
# pool sized to the threads that use it (see `make_engine`), only a database that stopped
# answering makes a thread wait at all.
POOL_TIMEOUT_SECONDS = 10


def make_engine(url: str, *, threads: int | None = None) -> Engine:
    """An engine for `url`. `threads`: how many threads may use it at once; its pool then
    keeps a connection for each and a few more, so that no thread ever waits on another for
    a connection (the API's threads and its pool are sized together)."""
    parsed = make_url(url)
    pool: dict[str, Any] = {}
    if threads is not None:
        pool = {"pool_size": threads + 4, "max_overflow": 4, "pool_timeout": POOL_TIMEOUT_SECONDS}
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **pool)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
    event.listen(engine, "connect", _configure_sqlite)
    return engine


def _configure_sqlite(connection: Any, _record: Any) -> None:
    """WAL lets the API read while the worker writes; SQLite enforces foreign keys only
    when asked to."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
