"""`python -m afina.worker`: one training worker, as `afina serve` starts it beside the API.

Started by `afina serve`, it is told the parent's pid and stops (warm shutdown: the job goes
back to the queue) if that process goes away without stopping it, e.g. on a kill -9. A
worker that has not stopped after as long as `afina serve` would have waited for it ends
itself then (SIGKILL): with no parent left to do it, nothing else would.
"""

import os
import signal
import threading
import time

from afina.worker.celery_app import run_worker

PARENT_PID_VARIABLE = "AFINA_WORKER_PARENT_PID"
# As long as `afina serve` waits for its worker to stop (`afina.cli.main.WORKER_STOP_SECONDS`).
STOP_SECONDS = 30


def _stop_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_SECONDS)  # a daemon thread: it ends with the process, if that stops first
    os.kill(os.getpid(), signal.SIGKILL)


if parent := os.environ.get(PARENT_PID_VARIABLE):
    threading.Thread(target=_stop_with_parent, args=(int(parent),), daemon=True).start()
run_worker()
