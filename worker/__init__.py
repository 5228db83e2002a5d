"""The worker: a Celery app whose processes keep one model resident and answer jobs with it."""
