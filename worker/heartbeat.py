"""The thread that stamps a running job's heartbeat: a `running` job with an old stamp has
lost its worker (`jobs.reconciler`)."""

import logging
import threading
from types import TracebackType

from sqlalchemy.orm import Session, sessionmaker

from afina.core.disk import is_disk_full
from afina.jobs import lifecycle
from afina.jobs.run import Run

logger = logging.getLogger(__name__)


class Heartbeat:
    """Stamps the job's `heartbeat_at` every `interval` seconds while `run` holds it."""

    def __init__(self, session_factory: sessionmaker[Session], run: Run, interval: float) -> None:
        self.session_factory = session_factory
        self.run = run
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(
            target=self._beat, name=f"heartbeat-{run.job_id}", daemon=True
        )

    def beat(self) -> bool:
        """Stamp the heartbeat; False when the run no longer holds the job."""
        with self.session_factory.begin() as session:
            return lifecycle.heartbeat(session, self.run)

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except Exception as error:
                if is_disk_full(error):  # one line a beat, not a traceback
                    logger.warning("heartbeat of %s failed: the disk is full", self.run.job_id)
                else:
                    logger.exception("heartbeat of %s failed; trying again", self.run.job_id)

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
