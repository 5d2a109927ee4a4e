"""Celery app factory and task names. The API sends tasks BY NAME and never imports worker code.

Production: Redis broker. Embedded default: kombu's ``filesystem://`` transport in the data directory, so one
process pair (API + worker child) needs no server. Same task code either way.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from app.config import Settings

VALIDATE_MODEL = "secateurs.validate_model"
VALIDATE_DATASET = "secateurs.validate_dataset"  # args: dataset id (worker/tasks.py; app/db/datasets.py)
RUN_JOB = "secateurs.run_job"
DELIVER_WEBHOOK = "secateurs.deliver_webhook"  # args: message id, attempt number (worker/webhook_tasks.py)
RUN_TRIAL = "secateurs.run_trial"  # args: trial id (worker/trials.py; app/db/trials.py)
AGGREGATE_TRIALS = "secateurs.aggregate_trials"  # args: job id, once its last trial ended
QUEUE = "secateurs"
# Trials have a queue of their own, which every worker consumes besides QUEUE: a tenant's 20 queued sweep
# points then do not stand in front of another tenant's single job (workers take from both queues in turn).
TRIALS_QUEUE = "secateurs.trials"
QUEUES = (QUEUE, TRIALS_QUEUE)


class _AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel with messages written whole before they are visible.

    kombu 5.x creates ``<ms>_<uuid>.<queue>.msg`` and then writes it; a consumer polling in between moves the
    empty file, fails to decode it and the worker exits (``JSONDecodeError``) with that message lost, so its
    job waits forever. Here the bytes go to a dot-file the consumer's name filter skips, renamed into place
    (atomic on one filesystem)."""

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        part = os.path.join(self.data_folder_out, f".{name}.part")
        try:
            with open(part, "wb") as fh:
                fh.write(str_to_bytes(dumps(payload)))
            os.replace(part, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc


class AtomicFilesystemTransport(filesystem.Transport):
    Channel = _AtomicFilesystemChannel


# The embedded broker's URL scheme: kombu resolves transports by alias, in the API and the worker alike.
EMBEDDED_SCHEME = "secateurs-fs"
TRANSPORT_ALIASES.setdefault(EMBEDDED_SCHEME, f"{__name__}:AtomicFilesystemTransport")


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    if not settings.embedded:
        assert settings.broker_url is not None
        return settings.broker_url, {
            "visibility_timeout": settings.visibility_timeout,
            "socket_connect_timeout": 5,
            "socket_timeout": 10,
        }
    # control: kombu's exchange tables; its default is ./control in the process's working directory.
    folders = {name: settings.broker_dir / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return f"{EMBEDDED_SCHEME}://", {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),
        "store_processed": False,
        "polling_interval": 0.1,  # kombu's default (1 s) adds a second of queue wait to every task
    }


def make_celery(settings: Settings) -> Celery:
    url, transport_options = broker_options(settings)
    celery = Celery("secateurs", broker=url)
    celery.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # the job record in our database is the truth
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Declared for pools that enforce them; the solo pool does not, so worker/lease.py does.
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_hard_time_limit,
        worker_hijack_root_logger=False,
        # Publishing must fail fast so the API can answer 503 instead of hanging a request.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        broker_connection_timeout=5,
    )
    return celery


def send(celery: Celery, task: str, *args: str | int, countdown: float | None = None) -> None:
    """Publish ``task`` by name; ``countdown`` (seconds) holds it back that long (webhook retries, a trial
    over its tenant's cap). Trials go to ``TRIALS_QUEUE``, everything else to ``QUEUE``."""
    queue = TRIALS_QUEUE if task == RUN_TRIAL else QUEUE
    celery.send_task(task, args=list(args), queue=queue, countdown=countdown)


def broker_ping(celery: Celery) -> None:
    """Raise if the broker does not answer within a few seconds."""
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)


BROKER_MARKER = "secateurs:broker-alive"


def broker_lost_messages(celery: Celery) -> bool:
    """True when the broker may have lost its messages since it was last asked: a Redis restarted without
    persistence (this machine's keeps nothing on disk) or flushed comes back without our marker key. The first
    caller to find it missing sets it again (SET NX), so among several API processes one answers True; a
    freshly started API after a joint restart (compose restart, a reboot) notices too. False for transports
    whose messages live in files. Raises if the broker does not answer."""
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        client = getattr(conn.default_channel, "client", None)
        if client is None or not hasattr(client, "set"):
            return False
        return bool(client.set(BROKER_MARKER, "1", nx=True))
