"""Small repository functions over the tables. No FastAPI here: the worker uses the same functions.

Job state changes are single conditional UPDATEs, so two workers (or a worker and a cancel request) racing on
one job cannot both win. Reads on behalf of a caller take its ``tenant``: a row of another tenant is simply not
found, so the API answers 404 and never confirms that someone else's id exists.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.tables import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    ApiKeyRecord,
    DatasetRecord,
    IdempotencyRecord,
    JobRecord,
    ModelRecord,
    WebhookMessageRecord,
    utcnow,
)

Record = TypeVar("Record", ModelRecord, DatasetRecord, JobRecord)


class BadCursor(ValueError):
    """A `cursor` query parameter that this service did not hand out."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# --- pagination -------------------------------------------------------------------------------------------


def encode_cursor(record: ModelRecord | DatasetRecord | JobRecord) -> str:
    created = as_utc(record.created_at)
    assert created is not None
    raw = json.dumps([created.isoformat(), record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, record_id = json.loads(raw)
        return datetime.fromisoformat(created), str(record_id)
    except (ValueError, TypeError) as exc:
        raise BadCursor("cursor is not one this service handed out; start again without it") from exc


def _page(
    session: Session, model: type[Record], filters: list[Any], limit: int, cursor: str | None
) -> tuple[list[Record], str | None]:
    query = select(model).where(*filters)
    if cursor:
        created, record_id = _decode_cursor(cursor)
        query = query.where(
            or_(model.created_at < created, and_(model.created_at == created, model.id < record_id))
        )
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


# --- models -------------------------------------------------------------------------------------------------


def add(session: Session, record: Record) -> Record:
    session.add(record)
    session.flush()
    return record


def get(session: Session, model: type[Record], record_id: str) -> Record | None:
    return session.get(model, record_id)


def get_owned(session: Session, model: type[Record], record_id: str, tenant: str) -> Record | None:
    """The record if it exists AND belongs to ``tenant``; None otherwise (the two are indistinguishable)."""
    record = session.get(model, record_id)
    return record if record is not None and record.tenant == tenant else None


def _tenant_filter(model: type[Record], tenant: str | None) -> list[Any]:
    return [] if tenant is None else [model.tenant == tenant]


def list_models(
    session: Session, limit: int, cursor: str | None, *, tenant: str | None = None
) -> tuple[list[ModelRecord], str | None]:
    """``tenant=None`` lists across tenants (operators, tests); the API always passes the caller's."""
    return _page(session, ModelRecord, _tenant_filter(ModelRecord, tenant), limit, cursor)


def list_datasets(
    session: Session, limit: int, cursor: str | None, *, tenant: str | None = None
) -> tuple[list[DatasetRecord], str | None]:
    """``tenant=None`` lists across tenants (operators, tests); the API always passes the caller's."""
    return _page(session, DatasetRecord, _tenant_filter(DatasetRecord, tenant), limit, cursor)


def list_jobs(
    session: Session,
    limit: int,
    cursor: str | None,
    status: str | None = None,
    model_id: str | None = None,
    *,
    tenant: str | None = None,
) -> tuple[list[JobRecord], str | None]:
    """``tenant=None`` lists across tenants (operators, tests); the API always passes the caller's."""
    filters = _tenant_filter(JobRecord, tenant)
    if status:
        filters.append(JobRecord.status == status)
    if model_id:
        filters.append(JobRecord.model_id == model_id)
    return _page(session, JobRecord, filters, limit, cursor)


def set_model_result(
    session: Session,
    model_id: str,
    *,
    status: Literal["ready", "invalid"],
    signatures: dict[str, Any] | None = None,
    params: int | None = None,
    error: dict[str, str] | None = None,
) -> bool:
    result = session.execute(
        update(ModelRecord)
        .where(ModelRecord.id == model_id)
        .values(status=status, signatures=signatures, params=params, error=error, updated_at=utcnow())
    )
    return result.rowcount == 1


def begin_model_load(session: Session, model_id: str, max_attempts: int) -> bool:
    """Count one more load of a validating model; False once ``max_attempts`` loads were begun (each one
    before this ended without a result: the process running it died)."""
    result = session.execute(
        update(ModelRecord)
        .where(
            ModelRecord.id == model_id,
            ModelRecord.status == "validating",
            ModelRecord.load_attempts < max_attempts,
        )
        .values(load_attempts=ModelRecord.load_attempts + 1)
    )
    return result.rowcount == 1


def active_jobs_using(session: Session, *, model_id: str | None = None, dataset_id: str | None = None) -> int:
    query = select(JobRecord.id).where(JobRecord.status.in_(ACTIVE_JOB_STATUSES))
    if model_id:
        query = query.where(JobRecord.model_id == model_id)
    if dataset_id:
        query = query.where(
            or_(JobRecord.train_dataset_id == dataset_id, JobRecord.eval_dataset_id == dataset_id)
        )
    return len(list(session.scalars(query.limit(1000))))


# --- jobs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """Outcome of a worker asking to run a job: run it, or why not."""

    claimed: bool
    reason: Literal["claimed", "missing", "terminal", "held", "exhausted"]
    attempts: int = 0


def claim_job(
    session: Session, job_id: str, *, lease_seconds: float, max_attempts: int, worker: str | None = None
) -> Claim:
    """queued -> running; a running job whose lease ran out (dead worker) may be taken over. ``worker``
    ("host:pid") is recorded for the operators' heartbeat metric."""
    now = utcnow()
    stale = now - timedelta(seconds=lease_seconds)
    result = session.execute(
        update(JobRecord)
        .where(
            JobRecord.id == job_id,
            JobRecord.attempts < max_attempts,
            or_(
                JobRecord.status == "queued",
                and_(JobRecord.status == "running", JobRecord.heartbeat_at < stale),
            ),
        )
        .values(
            status="running",
            attempts=JobRecord.attempts + 1,
            heartbeat_at=now,
            stage="loading",
            progress=0.0,
            worker=worker,
        )
    )
    job = session.get(JobRecord, job_id)
    if job is None:
        return Claim(False, "missing")
    session.refresh(job)
    if result.rowcount == 1:
        if job.started_at is None:
            job.started_at = now
        return Claim(True, "claimed", job.attempts)
    if job.status in TERMINAL_JOB_STATUSES:
        return Claim(False, "terminal", job.attempts)
    if job.attempts >= max_attempts:
        return Claim(False, "exhausted", job.attempts)
    return Claim(False, "held", job.attempts)


def end_crashed_try(
    session: Session, job_id: str, *, attempt: int | None, max_attempts: int, error: dict[str, str]
) -> Literal["requeued", "failed", "untouched"]:
    """A try of the job raised where the task could not record why (while claiming, or around the pipeline).

    ``attempt``: the try the worker's committed claim counted, or None when the claim never committed (then
    this counts the try). Below ``max_attempts`` tries the job is re-queued with no dispatch time, so the
    reaper re-sends it on its next pass; at ``max_attempts`` it fails with ``error``. Conditional, so another
    worker's live claim (a duplicate message) and a job that already ended are left alone.
    """
    job = session.get(JobRecord, job_id)
    if job is None:
        return "untouched"
    session.refresh(job)
    if attempt is None:
        where = [JobRecord.id == job_id, JobRecord.status == "queued", JobRecord.attempts == job.attempts]
        tries, status = job.attempts + 1, "queued"
    else:
        where = [*_ours(job_id, attempt), JobRecord.status == "running"]
        tries, status = attempt, "running"
    if tries >= max_attempts:
        if session.execute(update(JobRecord).where(*where).values(attempts=tries)).rowcount != 1:
            return "untouched"
        finish_job(session, job_id, "failed", error=error, from_statuses=(status,), attempt=tries)
        return "failed"
    result = session.execute(
        update(JobRecord)
        .where(*where)
        .values(
            status="queued", attempts=tries, stage=None, progress=0.0, heartbeat_at=None, dispatched_at=None
        )
    )
    return "requeued" if result.rowcount == 1 else "untouched"


def _ours(job_id: str, attempt: int | None) -> list[Any]:
    """Fencing: a worker passes the attempt it claimed, so a worker the reaper gave up on (alive after all,
    e.g. cut off from the database for longer than the lease) cannot write over the run that replaced it."""
    where = [JobRecord.id == job_id]
    if attempt is not None:
        where.append(JobRecord.attempts == attempt)
    return where


def report_progress(
    session: Session, job_id: str, stage: str, progress: float, attempt: int | None = None
) -> tuple[bool, bool]:
    """Record stage/progress and renew the lease. Returns (still ours and running, cancel requested)."""
    result = session.execute(
        update(JobRecord)
        .where(*_ours(job_id, attempt), JobRecord.status == "running")
        .values(stage=stage, progress=max(0.0, min(1.0, progress)), heartbeat_at=utcnow())
    )
    job = session.get(JobRecord, job_id)
    if job is None:
        return False, True
    session.refresh(job)
    return result.rowcount == 1, job.cancel_requested


def finish_job(
    session: Session,
    job_id: str,
    status: Literal["succeeded", "failed", "canceled"],
    *,
    error: dict[str, str] | None = None,
    artifact_sha256: str | None = None,
    artifact_bytes: int | None = None,
    from_statuses: tuple[str, ...] = ("running",),
    attempt: int | None = None,
    timings: dict[str, float] | None = None,
    artifacts: list[dict[str, Any]] | None = None,
) -> bool:
    values: dict[str, Any] = {"status": status, "error": error, "finished_at": utcnow()}
    if timings is not None:
        values["timings"] = timings
    if status == "succeeded":
        values.update(
            progress=1.0,
            stage=None,
            artifact_sha256=artifact_sha256,
            artifact_bytes=artifact_bytes,
            artifacts=artifacts,
        )
    result = session.execute(
        update(JobRecord).where(*_ours(job_id, attempt), JobRecord.status.in_(from_statuses)).values(**values)
    )
    if result.rowcount != 1:
        return False
    _add_webhook_message(session, job_id, status)
    return True


def _add_webhook_message(session: Session, job_id: str, status: str) -> None:
    """The job just ended: if it has a webhook URL, write its message (an outbox row) in this same
    transaction, so the event is recorded exactly when the status changes and cannot be lost in between.
    Publishing the delivery task is the caller's part, after commit (app.webhooks.delivery.publish_for_job);
    a message that was never published is picked up by the sweep when a worker starts."""
    row = session.execute(
        select(JobRecord.webhook_url, JobRecord.tenant).where(JobRecord.id == job_id)
    ).one_or_none()
    if row is None or not row.webhook_url:
        return
    now = utcnow()
    session.add(
        WebhookMessageRecord(
            id=new_id("msg"),
            job_id=job_id,
            tenant=row.tenant,
            event_type=f"job.{status}",
            url=row.webhook_url,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
    session.flush()


def request_cancel(session: Session, job_id: str) -> None:
    """A queued job ends at once; a running one at its next stage boundary (the worker checks the flag)."""
    session.execute(update(JobRecord).where(JobRecord.id == job_id).values(cancel_requested=True))
    finish_job(
        session,
        job_id,
        "canceled",
        error={"code": "canceled", "message": "canceled by request before it started"},
        from_statuses=("queued",),
    )


def recover_interrupted(session: Session, *, max_attempts: int) -> list[str]:
    """After a restart of the embedded service no worker can hold a job: re-queue running ones (or fail them
    once their attempts are used up) and return every queued job id so its message can be sent again."""
    reason = {
        "code": "interrupted",
        "message": f"the service stopped while this job ran, {max_attempts} times; "
        "check the worker log and submit the job again",
    }
    exhausted = session.scalars(
        select(JobRecord.id).where(JobRecord.status == "running", JobRecord.attempts >= max_attempts)
    ).all()
    for job_id in exhausted:  # one by one through finish_job, so each ending records its webhook message
        finish_job(session, job_id, "failed", error=reason)
    session.execute(
        update(JobRecord)
        .where(JobRecord.status == "running")
        .values(status="queued", stage=None, progress=0.0, heartbeat_at=None)
    )
    return list(session.scalars(select(JobRecord.id).where(JobRecord.status == "queued")))


def renew_lease(session: Session, job_id: str, attempt: int | None = None) -> bool:
    """The worker's heartbeat: True while the job is still running as ``attempt`` (not canceled, failed, or
    re-queued and taken over after the reaper gave this worker up)."""
    result = session.execute(
        update(JobRecord)
        .where(*_ours(job_id, attempt), JobRecord.status == "running")
        .values(heartbeat_at=utcnow())
    )
    return result.rowcount == 1


def count_active_jobs(session: Session, tenant: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(JobRecord)
            .where(JobRecord.tenant == tenant, JobRecord.status.in_(ACTIVE_JOB_STATUSES))
        )
        or 0
    )


@dataclass
class Reaped:
    """What one reaper pass changed, and which messages must be (re-)published."""

    requeued: list[str]  # running jobs whose worker stopped renewing its lease
    failed: list[str]  # ... that had used up their attempts
    resend_jobs: list[str]  # queued jobs to publish again (including the requeued ones)
    resend_models: list[str]  # models still validating to publish again


def reap(
    session: Session,
    *,
    lease_seconds: float,
    max_attempts: int,
    redispatch_after_s: float,
    resend_all_queued: bool = False,
) -> Reaped:
    """Find jobs a dead worker left 'running' and messages a broker lost; return what to publish.

    Every change is a conditional UPDATE, so two API processes reaping at once cannot both act on one job
    (the loser's rowcount is 0); a duplicate message is harmless anyway because claims are conditional too.
    ``resend_all_queued``: the broker restarted (its run id changed) and may have lost every message.
    """
    now = utcnow()
    stale = now - timedelta(seconds=lease_seconds)
    reason = {
        "code": "interrupted",
        "message": f"the worker running this job stopped (crash, out of memory or killed) {max_attempts} "
        "times; check the worker log and memory, then submit the job again",
    }
    dead = session.execute(
        select(JobRecord.id, JobRecord.attempts).where(
            JobRecord.status == "running",
            or_(JobRecord.heartbeat_at < stale, JobRecord.heartbeat_at.is_(None)),
        )
    ).all()
    requeued: list[str] = []
    failed: list[str] = []
    for job_id, attempts in dead:
        guard = (JobRecord.id == job_id, JobRecord.status == "running", JobRecord.attempts == attempts)
        if attempts >= max_attempts:
            if finish_job(session, job_id, "failed", error=reason):
                failed.append(job_id)
            continue
        result = session.execute(
            update(JobRecord)
            .where(*guard, or_(JobRecord.heartbeat_at < stale, JobRecord.heartbeat_at.is_(None)))
            .values(status="queued", stage=None, progress=0.0, heartbeat_at=None, dispatched_at=None)
        )
        if result.rowcount == 1:
            requeued.append(job_id)
    due = now - timedelta(seconds=redispatch_after_s)
    job_filter = [JobRecord.status == "queued"]
    model_filter = [ModelRecord.status == "validating"]
    if not resend_all_queued:
        job_filter.append(or_(JobRecord.dispatched_at.is_(None), JobRecord.dispatched_at < due))
        model_filter.append(or_(ModelRecord.dispatched_at.is_(None), ModelRecord.dispatched_at < due))
    resend_jobs = list(
        session.scalars(select(JobRecord.id).where(*job_filter).order_by(JobRecord.created_at))
    )
    resend_models = list(session.scalars(select(ModelRecord.id).where(*model_filter)))
    return Reaped(requeued, failed, resend_jobs, resend_models)


def mark_dispatched(session: Session, *, job_ids: Sequence[str] = (), model_ids: Sequence[str] = ()) -> None:
    """Record that these messages were published just now (so the reaper waits before sending them again)."""
    now = utcnow()
    if job_ids:
        session.execute(update(JobRecord).where(JobRecord.id.in_(job_ids)).values(dispatched_at=now))
    if model_ids:
        session.execute(update(ModelRecord).where(ModelRecord.id.in_(model_ids)).values(dispatched_at=now))


# --- API keys -------------------------------------------------------------------------------------------------

# last_used_at is informational: writing it on every request would make every read a write (and, on SQLite,
# contend with the worker), so it is refreshed at most once per this many seconds per key.
KEY_TOUCH_EVERY_S = 60


def add_api_key(
    session: Session, *, key_id: str, tenant: str, prefix: str, secret_sha256: str
) -> ApiKeyRecord:
    record = ApiKeyRecord(id=key_id, tenant=tenant, prefix=prefix, secret_sha256=secret_sha256)
    session.add(record)
    session.flush()
    return record


def find_api_key(session: Session, prefix: str) -> ApiKeyRecord | None:
    return session.scalars(select(ApiKeyRecord).where(ApiKeyRecord.prefix == prefix)).one_or_none()


def list_api_keys(session: Session) -> list[ApiKeyRecord]:
    return list(session.scalars(select(ApiKeyRecord).order_by(ApiKeyRecord.created_at, ApiKeyRecord.id)))


def any_active_api_key(session: Session) -> bool:
    return (
        session.scalars(select(ApiKeyRecord.id).where(ApiKeyRecord.revoked_at.is_(None)).limit(1)).first()
        is not None
    )


def revoke_api_key(session: Session, key_id: str) -> bool:
    """True if this call revoked it; False if there is no such key or it was already revoked."""
    result = session.execute(
        update(ApiKeyRecord)
        .where(ApiKeyRecord.id == key_id, ApiKeyRecord.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount == 1


def touch_api_key(session: Session, key_id: str) -> None:
    now = utcnow()
    session.execute(
        update(ApiKeyRecord)
        .where(
            ApiKeyRecord.id == key_id,
            or_(
                ApiKeyRecord.last_used_at.is_(None),
                ApiKeyRecord.last_used_at < now - timedelta(seconds=KEY_TOUCH_EVERY_S),
            ),
        )
        .values(last_used_at=now)
        # SQLite hands back naive datetimes: comparing them in Python with ``now`` would fail, and nothing
        # reads the loaded key's last_used_at after this anyway.
        .execution_options(synchronize_session=False)
    )


# --- idempotency keys -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyClaim:
    """Outcome of asking for an Idempotency-Key: we hold it now, or the row that someone else made."""

    outcome: Literal["claimed", "in_flight", "done"]
    existing: IdempotencyRecord | None = None


def claim_idempotency_key(
    session: Session,
    *,
    tenant: str,
    key: str,
    endpoint: str,
    fingerprint: str | None,
    owner: str,
    lock_seconds: int,
    ttl_seconds: int,
) -> KeyClaim:
    """Insert an ``in_flight`` row for (tenant, key), race-safely; COMMITS (give it a session of its own).

    The hold must be visible to a concurrent request at once, so this commits instead of joining the caller's
    transaction. Two requests inserting at once: the unique constraint lets one win, the loser reads the
    winner's row. An expired row is deleted and the insert retried; an ``in_flight`` row whose lock ran out (its
    process died mid-request) is taken over with a conditional UPDATE, so only one taker wins.
    """
    existing: IdempotencyRecord | None = None
    for _ in range(5):
        now = utcnow()
        try:
            session.add(
                IdempotencyRecord(
                    tenant=tenant,
                    key=key,
                    endpoint=endpoint,
                    fingerprint=fingerprint,
                    status="in_flight",
                    owner=owner,
                    locked_until=now + timedelta(seconds=lock_seconds),
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_seconds),
                )
            )
            session.commit()
            return KeyClaim("claimed")
        except IntegrityError:
            session.rollback()
        existing = session.scalars(
            select(IdempotencyRecord).where(IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key)
        ).one_or_none()
        if existing is None:  # deleted (expired, released) between our insert and this read: insert again
            continue
        if as_utc(existing.expires_at) <= now:  # type: ignore[operator]
            session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id == existing.id))
            session.commit()
            continue
        if existing.status == "in_flight" and as_utc(existing.locked_until) <= now:  # type: ignore[operator]
            taken = session.execute(
                update(IdempotencyRecord)
                .where(IdempotencyRecord.id == existing.id, IdempotencyRecord.owner == existing.owner)
                .values(
                    owner=owner,
                    endpoint=endpoint,
                    fingerprint=fingerprint,
                    locked_until=now + timedelta(seconds=lock_seconds),
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_seconds),
                )
            )
            session.commit()
            if taken.rowcount == 1:
                return KeyClaim("claimed")
            continue
        session.commit()  # end the read transaction: the caller keeps no lock
        return KeyClaim("done" if existing.status == "done" else "in_flight", existing)
    return KeyClaim("in_flight", existing)  # the row kept changing under us: a live competitor holds it


def set_idempotency_fingerprint(
    session: Session, *, tenant: str, key: str, owner: str, fingerprint: str
) -> bool:
    """Record an upload's fingerprint once its body has been received (it is unknown at claim time)."""
    result = session.execute(
        update(IdempotencyRecord)
        .where(
            IdempotencyRecord.tenant == tenant,
            IdempotencyRecord.key == key,
            IdempotencyRecord.owner == owner,
            IdempotencyRecord.status == "in_flight",
        )
        .values(fingerprint=fingerprint)
    )
    return result.rowcount == 1


def complete_idempotency_key(
    session: Session,
    *,
    tenant: str,
    key: str,
    owner: str,
    status_code: int,
    headers: dict[str, str],
    body: dict[str, Any],
) -> bool:
    """``in_flight`` -> ``done`` with the response to replay. Call inside the transaction that creates the
    resource, so the resource and its idempotent response are committed together or not at all."""
    result = session.execute(
        update(IdempotencyRecord)
        .where(
            IdempotencyRecord.tenant == tenant,
            IdempotencyRecord.key == key,
            IdempotencyRecord.owner == owner,
            IdempotencyRecord.status == "in_flight",
        )
        .values(status="done", response_status=status_code, response_headers=headers, response_body=body)
    )
    return result.rowcount == 1


def release_idempotency_key(session: Session, *, tenant: str, key: str, owner: str) -> bool:
    """Forget the key (whatever its status) if ``owner`` still holds it, so a retry runs the request afresh."""
    result = session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key, IdempotencyRecord.owner == owner
        )
    )
    return result.rowcount == 1


def purge_expired_idempotency_keys(session: Session) -> int:
    result = session.execute(
        delete(IdempotencyRecord)
        .where(IdempotencyRecord.expires_at <= utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount
