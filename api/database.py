"""The threads the API reads the database on.

A read route's database work runs on one of these threads, in one call (`reading`), on
SQLAlchemy Core: each thread keeps a connection of its own, in autocommit (every statement
sees what is committed when it runs), so a read costs no session, no pool checkout, no
transaction and no rollback; a connection that fails is dropped and made anew on the
thread's next read. The pool is sized for these
threads and anyio's (`make_engine(threads=...)`), so no thread ever waits for a connection,
and a request never holds one while it waits for a thread or while its answer is serialized.
asyncio's executor also costs about half of what a hop through anyio's thread pool does,
which matters on the routes clients poll.
"""

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

T = TypeVar("T")
P = ParamSpec("P")


class DatabaseThreads:
    def __init__(self, engine: Engine, threads: int) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="afina-db")
        self._local = threading.local()
        self._connections: list[Connection] = []

    async def call(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`function(*args, **kwargs)` on one of the threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))

    async def reading(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` on one of the threads, with that thread's connection; `work`
        only reads, and returns what the request answers, built from what it read."""
        return await self.call(self._read, work)

    def _read(self, work: Callable[[Connection], T]) -> T:
        connection = getattr(self._local, "connection", None)
        if connection is None or connection.invalidated or connection.closed:
            connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._local.connection = connection
            self._connections.append(connection)
        try:
            return work(connection)
        except DBAPIError:
            self._local.connection = None
            self._connections.remove(connection)
            connection.invalidate()
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for connection in self._connections:
            connection.close()
