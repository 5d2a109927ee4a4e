"""Target of `celery -A worker.celery_worker worker`. TensorFlow is not imported at module import time: only
once the worker is ready, in the process that runs the tasks (solo or threads pool: Celery never forks after)."""

from __future__ import annotations

from celery.signals import worker_ready

from app.config import get_settings
from app.queue import make_celery

app = make_celery(get_settings())

import worker.tasks  # noqa: E402,F401  (registers the tasks on `app`)


@worker_ready.connect
def _warm_up(**_: object) -> None:
    """Import TensorFlow once the worker is up (solo pool: no fork follows), so the first job does not pay
    the ~4 s import."""
    import worker.pipeline  # noqa: F401
