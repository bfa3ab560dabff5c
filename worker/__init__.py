"""The training side: the Celery app, its tasks, the trainer and the demo model."""
