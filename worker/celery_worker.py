"""Target of `celery -A worker.celery_worker worker`. TensorFlow is not imported at module import time: only
once the worker is ready, in the process that runs the tasks (solo or threads pool: Celery never forks after)."""

from __future__ import annotations

import logging

from celery.signals import worker_ready

from app.config import get_settings
from app.queue import make_celery

app = make_celery(get_settings())

import worker.tasks  # noqa: E402  (registers the tasks on `app`)
import worker.webhook_tasks  # noqa: E402  (registers secateurs.deliver_webhook)

log = logging.getLogger("secateurs.worker")


@worker_ready.connect
def _resend_webhooks(**_: object) -> None:
    """Attempts that a restart dropped (the embedded transport keeps no ETA'd message) or that could not be
    published go out again; duplicates are harmless. Before the TensorFlow import, so they are not delayed."""
    try:
        count = worker.webhook_tasks.sweep_on_start(app)
    except Exception:  # a worker that cannot sweep can still run jobs; the next start tries again
        log.exception("could not re-publish pending webhook deliveries")
        return
    if count:
        log.info("re-published %d pending webhook delivery attempt(s)", count)


@worker_ready.connect
def _warm_up(**_: object) -> None:
    """Import TensorFlow once the worker is up (solo pool: no fork follows), so the first job does not pay
    the ~4 s import."""
    import worker.pipeline  # noqa: F401
