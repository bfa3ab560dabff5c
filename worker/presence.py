"""This worker's row in the registry (`jobs.workers`): written when the worker is ready, with
its device and the training queues it takes, stamped with its free memory every few seconds,
removed when it stops. The API counts a worker whose stamp is older than
AFINA_WORKER_TIMEOUT_SECONDS as gone."""

import logging
import socket
import threading
from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from afina.jobs import workers
from afina.worker.device import free_memory, this_device

logger = logging.getLogger(__name__)


class Presence:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        worker_id: str,
        queues: Sequence[str],
        interval: float,
    ) -> None:
        self.session_factory = session_factory
        self.worker_id = worker_id
        self.queues = list(queues)  # its training queues, its class's first
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._stamp, name="worker-presence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            with self.session_factory.begin() as session:
                workers.leave(session, self.worker_id)
        except Exception:  # it stops counting once its stamp is old
            logger.exception("could not remove worker %s from the registry", self.worker_id)

    def _stamp(self) -> None:
        registered = False
        while True:
            try:
                with self.session_factory.begin() as session:
                    if registered:  # False once the row is gone (removed meanwhile)
                        registered = workers.refresh(session, self.worker_id, free_memory())
                    else:
                        workers.register(
                            session,
                            self.worker_id,
                            socket.gethostname(),
                            self.queues,
                            this_device(),
                        )
                        registered = True
            except Exception:
                logger.exception("could not stamp worker %s in the registry", self.worker_id)
            if self._stopped.wait(self.interval):
                return
