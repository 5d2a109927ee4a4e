"""Repository functions for webhooks: tenants' secrets and default URLs, messages and their attempts.

A message (``webhook_messages``) is written by ``jobs.finish_job`` when a job with a webhook URL ends. Each
attempt is claimed with one conditional UPDATE (``pending`` with ``attempts = N - 1`` -> ``sending`` with
``attempts = N``) and its ``webhook_deliveries`` row inserted in the same transaction, committed BEFORE the
request goes out. So a redelivered or duplicated Celery message for attempt N finds the message no longer
``pending`` at ``N - 1`` and sends nothing, and a delivered message is never sent again.

An attempt whose worker died mid-request stays ``sending``; once it is older than ``stale_after_s`` it is
recorded as interrupted (outcome unknown) and the next attempt becomes due. The receiver may then see that
message twice, with the same ``webhook-id``: at-least-once, as Standard Webhooks expects receivers to handle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db.tables import (
    TenantWebhookRecord,
    WebhookDeliveryRecord,
    WebhookMessageRecord,
    as_utc,
    utcnow,
)

INTERRUPTED = "interrupted: the worker stopped during this attempt, so its outcome is unknown"


# --- tenants ------------------------------------------------------------------------------------------------


def tenant_webhook(
    session: Session, tenant: str, new_secret: str | None = None
) -> TenantWebhookRecord | None:
    """The tenant's row; created with ``new_secret`` when missing and one is given (two requests racing to
    create it both end up with the one that was inserted first)."""
    record = session.get(TenantWebhookRecord, tenant)
    if record is not None or new_secret is None:
        return record
    now = utcnow()
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(
        insert(TenantWebhookRecord)
        .values(tenant=tenant, secret=new_secret, secret_created_at=now, created_at=now)
        .on_conflict_do_nothing(index_elements=["tenant"])
    )
    return session.get(TenantWebhookRecord, tenant, populate_existing=True)


def rotate_secret(session: Session, tenant: str, new_secret: str, grace: timedelta) -> TenantWebhookRecord:
    """Replace the tenant's secret; the old one keeps signing (as a second signature) for ``grace``."""
    record = tenant_webhook(session, tenant, new_secret)
    assert record is not None
    if record.secret == new_secret:  # just created: nothing to rotate out
        return record
    now = utcnow()
    session.execute(
        update(TenantWebhookRecord)
        .where(TenantWebhookRecord.tenant == tenant)
        .values(
            secret=new_secret,
            secret_created_at=now,
            previous_secret=TenantWebhookRecord.secret,
            previous_expires_at=now + grace,
        )
    )
    return session.get(TenantWebhookRecord, tenant, populate_existing=True)  # type: ignore[return-value]


def set_default_url(session: Session, tenant: str, url: str | None, new_secret: str) -> TenantWebhookRecord:
    record = tenant_webhook(session, tenant, new_secret)
    assert record is not None
    record.default_url = url
    session.flush()
    return record


def signing_secrets(record: TenantWebhookRecord, now: datetime) -> list[str]:
    """The current secret, then the previous one while its rotation grace lasts."""
    out = [record.secret]
    expires = as_utc(record.previous_expires_at)
    if record.previous_secret and expires is not None and expires > now:
        out.append(record.previous_secret)
    return out


# --- what a job body shows ----------------------------------------------------------------------------------


@dataclass
class WebhookState:
    message: WebhookMessageRecord | None = None
    deliveries: list[WebhookDeliveryRecord] = field(default_factory=list)


def states_for_jobs(session: Session, job_ids: Iterable[str]) -> dict[str, WebhookState]:
    """Message and attempts (in order) of each job that has a message: two queries for a whole page."""
    ids = list(job_ids)
    if not ids:
        return {}
    out: dict[str, WebhookState] = {}
    for message in session.scalars(select(WebhookMessageRecord).where(WebhookMessageRecord.job_id.in_(ids))):
        out[message.job_id] = WebhookState(message)
    if out:
        rows = session.scalars(
            select(WebhookDeliveryRecord)
            .where(WebhookDeliveryRecord.job_id.in_(list(out)))
            .order_by(WebhookDeliveryRecord.job_id, WebhookDeliveryRecord.attempt)
        )
        for delivery in rows:
            out[delivery.job_id].deliveries.append(delivery)
    return out


# --- attempts -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptClaim:
    """``claimed``: send attempt ``attempt`` now. ``early``: attempt ``attempt`` is due at ``due_at``, ask
    again then. ``done``: nothing to do (made by someone else, or the message is finished). ``missing``: no
    such message."""

    outcome: Literal["claimed", "early", "done", "missing"]
    attempt: int
    message: WebhookMessageRecord | None = None
    due_at: datetime | None = None


def claim_attempt(
    session: Session, message_id: str, attempt: int, *, max_attempts: int, stale_after_s: float
) -> AttemptClaim:
    """Take attempt ``attempt`` of the message, recording it (``at`` = now) before anything is sent."""
    now = utcnow()
    message = session.get(WebhookMessageRecord, message_id)
    if message is None:
        return AttemptClaim("missing", attempt)
    stale = resolve_stale(session, message, now=now, max_attempts=max_attempts, stale_after_s=stale_after_s)
    if stale and message.status == "pending" and message.attempts == attempt:
        attempt += 1  # our own attempt was the one interrupted (the worker died; Celery redelivered): go on
    result = session.execute(
        update(WebhookMessageRecord)
        .where(
            WebhookMessageRecord.id == message_id,
            WebhookMessageRecord.status == "pending",
            WebhookMessageRecord.attempts == attempt - 1,
            WebhookMessageRecord.next_attempt_at <= now,
        )
        .values(status="sending", attempts=attempt, sending_since=now, next_attempt_at=None)
        # SQLite hands back naive datetimes, which Python cannot compare with ``now``; refreshed below.
        .execution_options(synchronize_session=False)
    )
    session.refresh(message)
    if result.rowcount == 1:
        session.add(
            WebhookDeliveryRecord(message_id=message_id, job_id=message.job_id, attempt=attempt, at=now)
        )
        session.flush()
        return AttemptClaim("claimed", attempt, message)
    if message.status == "pending" and message.attempts == attempt - 1:
        return AttemptClaim("early", attempt, message, as_utc(message.next_attempt_at))
    return AttemptClaim("done", attempt, message)


def resolve_stale(
    session: Session, message: WebhookMessageRecord, *, now: datetime, max_attempts: int, stale_after_s: float
) -> bool:
    """An attempt ``sending`` for longer than ``stale_after_s`` lost its worker: record it as interrupted and
    make the next attempt due now (or fail the message when that was the last). True if it did."""
    since = as_utc(message.sending_since)
    if message.status != "sending" or since is None or since > now - timedelta(seconds=stale_after_s):
        return False
    last = message.attempts >= max_attempts
    result = session.execute(
        update(WebhookMessageRecord)
        .where(
            WebhookMessageRecord.id == message.id,
            WebhookMessageRecord.status == "sending",
            WebhookMessageRecord.attempts == message.attempts,
        )
        .values(
            status="failed" if last else "pending", next_attempt_at=None if last else now, sending_since=None
        )
    )
    if result.rowcount != 1:
        return False
    session.execute(
        update(WebhookDeliveryRecord)
        .where(
            WebhookDeliveryRecord.message_id == message.id,
            WebhookDeliveryRecord.attempt == message.attempts,
            WebhookDeliveryRecord.status_code.is_(None),
            WebhookDeliveryRecord.error.is_(None),
        )
        .values(error=INTERRUPTED)
    )
    session.refresh(message)
    return True


def record_result(
    session: Session,
    message_id: str,
    attempt: int,
    *,
    outcome: Literal["delivered", "gone", "retry", "failed"],
    status_code: int | None,
    error: str | None,
    duration_ms: int,
    next_retry_at: datetime | None,
) -> bool:
    """Complete attempt N and move the message on. False if the attempt was taken from us meanwhile (judged
    stale), in which case the caller must not schedule a retry: whoever took it did."""
    values: dict[str, Any] = {"status_code": status_code, "error": error and error[:500]}
    values.update(duration_ms=duration_ms, next_retry_at=next_retry_at if outcome == "retry" else None)
    session.execute(
        update(WebhookDeliveryRecord)
        .where(WebhookDeliveryRecord.message_id == message_id, WebhookDeliveryRecord.attempt == attempt)
        .values(**values)
    )
    result = session.execute(
        update(WebhookMessageRecord)
        .where(
            WebhookMessageRecord.id == message_id,
            WebhookMessageRecord.status == "sending",
            WebhookMessageRecord.attempts == attempt,
        )
        .values(
            status="pending" if outcome == "retry" else outcome,
            next_attempt_at=next_retry_at if outcome == "retry" else None,
            sending_since=None,
        )
    )
    return result.rowcount == 1


def due_messages(
    session: Session, *, max_attempts: int, stale_after_s: float
) -> list[tuple[str, int, datetime | None]]:
    """(message id, next attempt, when it is due) of every message still to be attempted, stale attempts
    resolved first. For the sweep that re-publishes what a restart or a failed publish left behind."""
    now = utcnow()
    for message in session.scalars(
        select(WebhookMessageRecord).where(WebhookMessageRecord.status == "sending")
    ).all():
        resolve_stale(session, message, now=now, max_attempts=max_attempts, stale_after_s=stale_after_s)
    pending = session.scalars(
        select(WebhookMessageRecord)
        .where(WebhookMessageRecord.status == "pending")
        .order_by(WebhookMessageRecord.next_attempt_at)
    )
    return [(m.id, m.attempts + 1, as_utc(m.next_attempt_at)) for m in pending]


def unsent_message_id(session: Session, job_id: str) -> str | None:
    """The id of the job's message if no attempt of it was made yet (the first one is still to publish)."""
    return session.scalars(
        select(WebhookMessageRecord.id).where(
            WebhookMessageRecord.job_id == job_id,
            WebhookMessageRecord.status == "pending",
            WebhookMessageRecord.attempts == 0,
        )
    ).one_or_none()
