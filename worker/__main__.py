"""`python -m afina.worker`: one training worker, as `afina serve` starts it beside the API."""

from afina.worker.celery_app import run_worker

run_worker()
