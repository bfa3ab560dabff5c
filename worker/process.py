"""This worker process: the name it gives the jobs it runs, and whether it was asked to stop."""

import os
import socket
import threading

# Set by `afina serve` for the worker child it starts: a name of its own for that process.
WORKER_ID_VARIABLE = "AFINA_WORKER_ID"

# Set when the worker is asked to shut down (Celery's signal): the run stops at its next step
# and its job goes back to the queue.
shutdown_requested = threading.Event()


def this_worker() -> str:
    """The name this worker process gives the jobs it runs (`Job.worker`)."""
    return os.environ.get(WORKER_ID_VARIABLE) or f"{socket.gethostname()}:{os.getpid()}"
