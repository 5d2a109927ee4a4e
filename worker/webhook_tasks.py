"""The Celery task that delivers webhooks: ``secateurs.deliver_webhook(message_id, attempt)``.

Thin on purpose: :func:`app.webhooks.delivery.attempt` claims, sends and records one attempt, and this task
publishes whatever comes next (a retry with its countdown, or the same attempt again if it arrived early).
No TensorFlow is imported here or by anything this module imports, so a delivery never pays for it.

Each worker also runs the sweep when it starts (worker/celery_worker.py): attempts left unpublished by a
restart or a failed publish are sent again, held until due.
"""

from __future__ import annotations

from functools import cache

from celery import Celery, Task, shared_task
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.db.engine import init_db, make_engine, make_session_factory
from app.queue import DELIVER_WEBHOOK
from app.webhooks import delivery


@cache
def context() -> tuple[Settings, sessionmaker[Session]]:
    settings = get_settings()
    engine = make_engine(settings.db_url)
    init_db(engine)
    return settings, make_session_factory(engine)


@shared_task(name=DELIVER_WEBHOOK, bind=True, acks_late=True, ignore_result=True)
def deliver_webhook(self: Task, message_id: str, attempt: int) -> None:
    settings, sessions = context()
    step = delivery.attempt(settings, sessions, message_id, int(attempt))
    if step is not None:
        delivery.publish(self.app, step)


def sweep_on_start(celery: Celery) -> int:
    """Re-publish every webhook attempt still to be made (see app.webhooks.delivery.sweep)."""
    settings, sessions = context()
    return delivery.sweep(settings, sessions, celery)
