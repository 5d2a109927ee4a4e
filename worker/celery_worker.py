"""Target of `celery -A worker.celery_worker worker`. TensorFlow is imported inside the tasks, never here, so
nothing TF-related exists before Celery forks (we run the solo pool anyway: one job per process)."""

from __future__ import annotations

from app.config import get_settings
from app.queue import make_celery

app = make_celery(get_settings())

import worker.tasks  # noqa: E402,F401  (registers the tasks on `app`)
