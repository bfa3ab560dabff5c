"""The thread that stamps a running job's (or export's) heartbeat: one with an old stamp has
lost its worker (`jobs.reconciler`)."""

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from sqlalchemy.orm import Session, sessionmaker

from afina.core.disk import is_disk_full
from afina.jobs import lifecycle
from afina.jobs.run import Run

logger = logging.getLogger(__name__)


class Heartbeat:
    """Calls `stamp` (an UPDATE that stamps the heartbeat, True while the run still holds
    what it runs) every `interval` seconds, in a transaction of its own."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        stamp: Callable[[Session], bool],
        name: str,
        interval: float,
    ) -> None:
        self.session_factory = session_factory
        self.stamp = stamp
        self.name = name
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True)

    @classmethod
    def of_run(
        cls, session_factory: sessionmaker[Session], run: Run, interval: float
    ) -> "Heartbeat":
        """The heartbeat of a job's run."""
        return cls(
            session_factory, lambda session: lifecycle.heartbeat(session, run), run.job_id, interval
        )

    def beat(self) -> bool:
        """Stamp the heartbeat; False when the run no longer holds it."""
        with self.session_factory.begin() as session:
            return self.stamp(session)

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except Exception as error:
                if is_disk_full(error):  # one line a beat, not a traceback
                    logger.warning("heartbeat of %s failed: the disk is full", self.name)
                else:
                    logger.exception("heartbeat of %s failed; trying again", self.name)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stopped.set()
        self.thread.join()
