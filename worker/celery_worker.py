"""Target of `celery -A worker.celery_worker worker`. TensorFlow is not imported at module import time: only
once the worker is ready, in the process that runs the tasks (solo or threads pool: Celery never forks after)."""

from __future__ import annotations

import logging
import os
import signal

from celery.signals import setup_logging, task_postrun, worker_ready

from app.config import get_settings
from app.queue import make_celery

app = make_celery(get_settings())

import worker.tasks  # noqa: E402  (registers the tasks on `app`)
import worker.trial_tasks  # noqa: E402  (secateurs.run_trial, secateurs.aggregate_trials; sweeps fan out)
import worker.webhook_tasks  # noqa: E402  (registers secateurs.deliver_webhook)

log = logging.getLogger("secateurs.worker")


if get_settings().log_format == "json":

    @setup_logging.connect
    def _json_logs(loglevel: int | str | None = None, **_: object) -> None:
        """Connected, this signal replaces Celery's own logging set-up: JSON lines with job_id/tenant/stage."""
        from app.observability.logs import configure_logging

        level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else (loglevel or logging.INFO)
        configure_logging("json", level if isinstance(level, int) else logging.INFO)


def _check_store() -> None:
    """A store that refuses us (wrong credentials, no bucket) stops the worker before it takes a task, with a
    message naming the setting; one that does not answer yet is only logged (jobs retry, then fail)."""
    from app.errors import StoreUnavailable
    from app.storage import Storage
    from app.storage.base import StoreMisconfigured

    try:
        Storage.from_settings(get_settings()).check()
    except StoreMisconfigured as exc:
        log.error("blob store misconfigured: %s", exc)
        raise SystemExit(f"secateurs worker: refusing to start: {exc}") from exc
    except StoreUnavailable as exc:
        log.warning("blob store not reachable at start (the worker starts anyway): %s", exc.detail)


_check_store()


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


def _rss_mib() -> float:
    """Current (not peak) resident memory: TensorFlow's allocator keeps what a large model took."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


@task_postrun.connect
def _recycle_when_bloated(**_: object) -> None:
    """Celery's worker_max_memory_per_child only exists for the prefork pool, and TensorFlow needs solo: so
    after a task that leaves this process above SECATEURS_WORKER_MAX_MEMORY_PER_CHILD (MiB) it asks itself for
    a warm shutdown (the task is done and acknowledged first) and the supervisor starts a fresh process."""
    limit = get_settings().worker_max_memory_per_child
    if not limit:
        return
    rss = _rss_mib()
    if rss > limit:
        log.warning(
            "worker uses %.0f MiB > %d MiB after a task: exiting so a fresh worker starts", rss, limit
        )
        os.kill(os.getpid(), signal.SIGTERM)
