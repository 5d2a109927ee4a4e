"""The job state machine: queued -> running -> succeeded | failed | canceled, with leases, retries, the
reaper's pass over jobs a dead worker left running, and the messages a broker may have lost.

Job state changes are single conditional UPDATEs, so two workers (or a worker and a cancel request, or two
reapers) racing on one job cannot both win. A job that ends writes its webhook message in the same
transaction (an outbox row, ``app.db.webhooks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.db.records import new_id
from app.db.tables import (
    ACTIVE_JOB_STATUSES,
    PENDING_DATASET_STATUSES,
    TERMINAL_JOB_STATUSES,
    DatasetRecord,
    JobRecord,
    ModelRecord,
    WebhookMessageRecord,
    utcnow,
)


def active_jobs_using(session: Session, *, model_id: str | None = None, dataset_id: str | None = None) -> int:
    query = select(JobRecord.id).where(JobRecord.status.in_(ACTIVE_JOB_STATUSES))
    if model_id:
        query = query.where(JobRecord.model_id == model_id)
    if dataset_id:
        query = query.where(
            or_(
                JobRecord.train_dataset_id == dataset_id,
                JobRecord.eval_dataset_id == dataset_id,
                JobRecord.calibration_dataset_id == dataset_id,
            )
        )
    return len(list(session.scalars(query.limit(1000))))


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
    resend_datasets: list[str] = field(default_factory=list)  # datasets still validating/converting


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
    dataset_filter = [DatasetRecord.status.in_(PENDING_DATASET_STATUSES)]
    if not resend_all_queued:
        dataset_filter.append(or_(DatasetRecord.dispatched_at.is_(None), DatasetRecord.dispatched_at < due))
    resend_datasets = list(session.scalars(select(DatasetRecord.id).where(*dataset_filter)))
    return Reaped(requeued, failed, resend_jobs, resend_models, resend_datasets)


def mark_dispatched(
    session: Session,
    *,
    job_ids: Sequence[str] = (),
    model_ids: Sequence[str] = (),
    dataset_ids: Sequence[str] = (),
) -> None:
    """Record that these messages were published just now (so the reaper waits before sending them again)."""
    now = utcnow()
    if job_ids:
        session.execute(update(JobRecord).where(JobRecord.id.in_(job_ids)).values(dispatched_at=now))
    if model_ids:
        session.execute(update(ModelRecord).where(ModelRecord.id.in_(model_ids)).values(dispatched_at=now))
    if dataset_ids:
        session.execute(
            update(DatasetRecord).where(DatasetRecord.id.in_(dataset_ids)).values(dispatched_at=now)
        )
