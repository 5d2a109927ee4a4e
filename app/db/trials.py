"""The trial state machine (issue 23): a job's trials as records, each run by a task of its own.

A fanned-out job is ``running`` in stage ``trials`` while its trials run, then ``aggregating`` while one task
builds its document; no task holds it meanwhile (``app.db.tables.FANNED_OUT_STAGES``). A trial goes
``queued -> running -> succeeded | failed | canceled``; a running trial whose worker stopped renewing its
lease goes back to ``queued`` (the reaper re-sends it) until ``max_attempts`` claims were used, then fails.

Every change is one conditional UPDATE, as for jobs (``app.db.jobs``): two workers claiming one trial, a
worker and the reaper, or two trials ending at once cannot both win. The trial that ends last is decided in
the database (``close_if_done``: stage ``trials -> aggregating`` only while no trial is active), in its own
transaction after the trial's ending committed, so exactly one caller sends the aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import and_, exists, func, or_, select, text, update
from sqlalchemy.orm import Session

from app.db.jobs import finish_job
from app.db.tables import ACTIVE_TRIAL_STATUSES, JobRecord, TrialRecord, utcnow

TRIALS, AGGREGATING = "trials", "aggregating"


@dataclass(frozen=True)
class TrialSpec:
    """One trial to create: its index in the job, what it runs (``label``) and its target, if any."""

    index: int
    label: str
    target: float | None = None
    phase: int = 0
    params: dict[str, Any] | None = None


def may_have_trials(spec: dict[str, Any]) -> bool:
    """Whether a job of this (stored) spec can run as trials: a sweep, a search, a sensitivity job, or K-fold
    cross-validation (the worker's ``worker.kinds.trial_rules`` decides; this only spares plain jobs' bodies
    the query)."""
    return any(spec.get(kind) for kind in ("sweep", "search", "sensitivity")) or bool(
        (spec.get("evaluation") or {}).get("cross_validation")
    )


def trial_id(job_id: str, index: int) -> str:
    return f"{job_id}.{index}"


def create_trials(session: Session, job: JobRecord, kind: str, specs: Sequence[TrialSpec]) -> list[str]:
    """The job's trial records, created once (a parent run again after a restart finds them there).
    Returns every trial id in index order."""
    have = set(session.scalars(select(TrialRecord.index).where(TrialRecord.job_id == job.id)))
    for spec in specs:
        if spec.index not in have:
            session.add(
                TrialRecord(
                    id=trial_id(job.id, spec.index),
                    job_id=job.id,
                    tenant=job.tenant,
                    index=spec.index,
                    kind=kind,
                    label=spec.label,
                    target=spec.target,
                    phase=spec.phase,
                    params=spec.params,
                    status="queued",
                    attempts=0,
                    progress=0.0,
                    created_at=utcnow(),
                )
            )
    session.flush()
    return [trial_id(job.id, spec.index) for spec in specs]


def enter_trials_stage(session: Session, job_id: str, attempt: int) -> bool:
    """The parent task hands the job over to its trials: stage ``trials``, progress from the trials."""
    result = session.execute(
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.attempts == attempt, JobRecord.status == "running")
        .values(stage=TRIALS, heartbeat_at=utcnow(), progress=_job_progress(job_id))
    )
    return result.rowcount == 1


def start_next_phase(session: Session, job: JobRecord, kind: str, specs: Sequence[TrialSpec]) -> list[str]:
    """The aggregation of a phase found more to run: create the next phase's trials and hand the job back
    to them (``aggregating -> trials``), in one transaction. Returns the queued trial ids to send ([] when
    the job is no longer aggregating: canceled, or another aggregation got there first)."""
    result = session.execute(
        update(JobRecord)
        .where(JobRecord.id == job.id, JobRecord.status == "running", JobRecord.stage == AGGREGATING)
        .values(stage=TRIALS, heartbeat_at=utcnow())
    )
    if result.rowcount != 1:
        return []
    create_trials(session, job, kind, specs)
    return queued_trials(session, job.id)


def queued_trials(session: Session, job_id: str, first: Sequence[int] = ()) -> list[str]:
    """The job's queued trials in the order to send them: the indices in ``first`` (in that order), then the
    rest by index."""
    rows = session.execute(
        select(TrialRecord.id, TrialRecord.index)
        .where(TrialRecord.job_id == job_id, TrialRecord.status == "queued")
        .order_by(TrialRecord.index)
    ).all()
    rank = {index: i for i, index in enumerate(first)}
    return [tid for tid, _ in sorted(rows, key=lambda row: rank.get(row[1], len(rank)))]


def mark_dispatched(session: Session, ids: Sequence[str]) -> None:
    if ids:
        session.execute(update(TrialRecord).where(TrialRecord.id.in_(ids)).values(dispatched_at=utcnow()))


def list_trials(session: Session, job_id: str) -> list[TrialRecord]:
    return list(
        session.scalars(select(TrialRecord).where(TrialRecord.job_id == job_id).order_by(TrialRecord.index))
    )


@dataclass(frozen=True)
class TrialClaim:
    """A worker asking to run a trial: run it (``claimed``), or why not. ``capped``: the tenant already runs
    its cap of trials, send it again later; ``ended``: the job ended or is being canceled (the trial was
    marked canceled); ``exhausted``: its attempts are used up (the trial was marked failed)."""

    claimed: bool
    reason: Literal["claimed", "missing", "terminal", "held", "capped", "ended", "exhausted"]
    attempts: int = 0


def claim_trial(
    session: Session, trial_id: str, *, max_attempts: int, worker: str | None, tenant_cap: int = 0
) -> TrialClaim:
    """queued -> running, unless the tenant runs ``tenant_cap`` trials already (0: no cap). On PostgreSQL a
    transaction-scoped advisory lock per tenant makes count-then-claim one step (two workers cannot both take
    the last slot); SQLite runs one writer at a time anyway."""
    trial = session.get(TrialRecord, trial_id)
    if trial is None:
        return TrialClaim(False, "missing")
    session.refresh(trial)
    if trial.status != "queued":
        return TrialClaim(
            False, "terminal" if trial.status not in ACTIVE_TRIAL_STATUSES else "held", trial.attempts
        )
    job = session.get(JobRecord, trial.job_id)
    if job is not None:
        session.refresh(job)
    if job is None or job.status != "running" or job.cancel_requested:
        end_queued(
            session,
            trial.job_id,
            "canceled",
            {"code": "canceled", "message": "the job was canceled or ended"},
        )
        return TrialClaim(False, "ended", trial.attempts)
    if trial.attempts >= max_attempts:
        fail_exhausted(session, trial_id, trial.attempts, max_attempts)
        return TrialClaim(False, "exhausted", trial.attempts)
    before = trial.attempts  # the UPDATE below refreshes the object in the session
    guard = [
        TrialRecord.id == trial_id,
        TrialRecord.status == "queued",
        TrialRecord.attempts == before,
    ]
    if tenant_cap > 0:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"trials:{trial.tenant}"}
            )
        running = (
            select(func.count())
            .select_from(TrialRecord)
            .where(TrialRecord.tenant == trial.tenant, TrialRecord.status == "running")
        )
        if (session.scalar(running) or 0) >= tenant_cap:
            return TrialClaim(False, "capped", before)
    now = utcnow()
    result = session.execute(
        update(TrialRecord)
        .where(*guard)
        .values(
            status="running",
            attempts=TrialRecord.attempts + 1,
            worker=worker,
            heartbeat_at=now,
            started_at=now,
            progress=0.0,
            error=None,
        )
    )
    if result.rowcount != 1:
        return TrialClaim(False, "held", before)
    return TrialClaim(True, "claimed", before + 1)


def fail_exhausted(session: Session, trial_id: str, attempts: int, max_attempts: int) -> bool:
    return finish_trial(
        session,
        trial_id,
        attempts,
        "failed",
        error={
            "code": "interrupted",
            "message": f"the worker running this trial stopped (crash, out of memory or killed) {max_attempts} "
            "times; check the worker log and memory",
        },
        from_statuses=("queued", "running"),
    )


def _ours(trial_id: str, attempt: int) -> list[Any]:
    """Fencing, as for jobs: a worker the reaper gave up on cannot write over the attempt that replaced it."""
    return [TrialRecord.id == trial_id, TrialRecord.attempts == attempt]


def _job_progress(job_id: str) -> Any:
    """The job's progress as a SQL expression: the mean of its trials' (an ended trial counts as done)."""
    return (
        select(func.coalesce(func.avg(TrialRecord.progress), 0.0))
        .where(TrialRecord.job_id == job_id)
        .scalar_subquery()
    )


def report_trial(session: Session, trial_id: str, attempt: int, progress: float) -> tuple[bool, bool]:
    """Record the trial's progress, renew its lease and update its job's progress. Returns (still ours and
    running, the job is being canceled or has ended)."""
    result = session.execute(
        update(TrialRecord)
        .where(*_ours(trial_id, attempt), TrialRecord.status == "running")
        .values(progress=max(0.0, min(1.0, progress)), heartbeat_at=utcnow())
    )
    trial = session.get(TrialRecord, trial_id)
    if trial is None:
        return False, True
    session.execute(
        update(JobRecord)
        .where(JobRecord.id == trial.job_id, JobRecord.status == "running", JobRecord.stage == TRIALS)
        .values(progress=_job_progress(trial.job_id), heartbeat_at=utcnow())
    )
    job = session.get(JobRecord, trial.job_id)
    if job is not None:
        session.refresh(job)
    stop = job is None or job.status != "running" or job.cancel_requested
    return result.rowcount == 1, stop


def renew_trial(session: Session, trial_id: str, attempt: int) -> bool:
    """The trial's heartbeat: True while it is still running as ``attempt``."""
    result = session.execute(
        update(TrialRecord)
        .where(*_ours(trial_id, attempt), TrialRecord.status == "running")
        .values(heartbeat_at=utcnow())
    )
    return result.rowcount == 1


def finish_trial(
    session: Session,
    trial_id: str,
    attempt: int,
    status: Literal["succeeded", "failed", "canceled"],
    *,
    error: dict[str, str] | None = None,
    document: dict[str, Any] | None = None,
    files: list[dict[str, Any]] | None = None,
    seconds: float | None = None,
    from_statuses: tuple[str, ...] = ("running",),
) -> bool:
    """End the trial (as ``attempt``); commit before ``close_if_done`` (see the module's docstring)."""
    values: dict[str, Any] = {"status": status, "error": error, "finished_at": utcnow(), "progress": 1.0}
    if document is not None:
        values["document"] = document
    if files is not None:
        values["files"] = files
    if seconds is not None:
        values["seconds"] = round(seconds, 3)
    result = session.execute(
        update(TrialRecord)
        .where(*_ours(trial_id, attempt), TrialRecord.status.in_(from_statuses))
        .values(**values)
    )
    return result.rowcount == 1


def end_queued(
    session: Session, job_id: str, status: Literal["canceled", "failed"], error: dict[str, str]
) -> int:
    """Every queued trial of the job ends now (cancel, or a job that ended otherwise)."""
    result = session.execute(
        update(TrialRecord)
        .where(TrialRecord.job_id == job_id, TrialRecord.status == "queued")
        .values(status=status, error=error, finished_at=utcnow(), progress=1.0)
    )
    return int(result.rowcount or 0)


def close_if_done(session: Session, job_id: str) -> Literal["aggregate", "canceled", None]:
    """Called after a trial's ending committed: the one caller that finds no trial of the job active moves
    the job to ``aggregating`` (and must send the aggregation), or ends it ``canceled`` when a cancel was
    asked; everyone else gets None."""
    active = exists().where(TrialRecord.job_id == job_id, TrialRecord.status.in_(ACTIVE_TRIAL_STATUSES))
    result = session.execute(
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.status == "running", JobRecord.stage == TRIALS, ~active)
        .values(stage=AGGREGATING, heartbeat_at=utcnow(), progress=_job_progress(job_id))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    job = session.get(JobRecord, job_id)
    assert job is not None
    session.refresh(job)
    if job.cancel_requested:
        finish_job(session, job_id, "canceled", error={"code": "canceled", "message": "canceled by request"})
        return "canceled"
    return "aggregate"


def cancel_trials(session: Session, job_id: str) -> Literal["canceled", None]:
    """A cancel request for a fanned-out job: queued trials end now; with none running the job ends now
    too (else the last running trial ends it at its next progress report)."""
    end_queued(session, job_id, "canceled", {"code": "canceled", "message": "canceled by request"})
    return "canceled" if close_if_done(session, job_id) == "canceled" else None


@dataclass
class ReapedTrials:
    """What one reaper pass did to trials, and what to publish."""

    requeued: list[str] = field(default_factory=list)  # running trials whose worker stopped renewing
    failed: list[str] = field(default_factory=list)  # ... that had used up their attempts
    resend: list[str] = field(default_factory=list)  # queued trials to publish again
    aggregate: list[str] = field(default_factory=list)  # jobs whose aggregation must be sent (again)
    canceled: list[str] = field(default_factory=list)  # jobs that ended canceled here (publish webhooks)


def reap_trials(
    session: Session,
    *,
    lease_seconds: float,
    max_attempts: int,
    redispatch_after_s: float,
    resend_all_queued: bool = False,
) -> ReapedTrials:
    """The reaper's pass over fanned-out jobs (``app.maintenance``): dead trials re-queued (or failed after
    ``max_attempts``), lost trial messages re-sent, a job whose trials all ended but whose aggregation was
    never sent (its last trial's worker died in between) or never finished (its worker died) aggregated."""
    now = utcnow()
    stale = now - timedelta(seconds=lease_seconds)
    out = ReapedTrials()
    dead = session.execute(
        select(TrialRecord.id, TrialRecord.attempts, TrialRecord.job_id).where(
            TrialRecord.status == "running",
            or_(TrialRecord.heartbeat_at < stale, TrialRecord.heartbeat_at.is_(None)),
        )
    ).all()
    touched: set[str] = set()
    for tid, attempts, job_id in dead:
        if attempts >= max_attempts:
            if fail_exhausted(session, tid, attempts, max_attempts):
                out.failed.append(tid)
                touched.add(job_id)
            continue
        result = session.execute(
            update(TrialRecord)
            .where(
                *_ours(tid, attempts),
                TrialRecord.status == "running",
                or_(TrialRecord.heartbeat_at < stale, TrialRecord.heartbeat_at.is_(None)),
            )
            .values(status="queued", heartbeat_at=None, dispatched_at=None, progress=0.0)
        )
        if result.rowcount == 1:
            out.requeued.append(tid)
    due = now - timedelta(seconds=redispatch_after_s)
    running_job = select(JobRecord.id).where(JobRecord.status == "running", JobRecord.stage == TRIALS)
    queued = [TrialRecord.status == "queued", TrialRecord.job_id.in_(running_job)]
    if not resend_all_queued:
        queued.append(or_(TrialRecord.dispatched_at.is_(None), TrialRecord.dispatched_at < due))
    out.resend = list(session.scalars(select(TrialRecord.id).where(*queued).order_by(TrialRecord.created_at)))
    # Jobs in 'trials' with nothing active left (a worker died between ending its trial and closing the job).
    idle = session.scalars(
        select(JobRecord.id).where(
            JobRecord.status == "running",
            JobRecord.stage == TRIALS,
            ~exists().where(
                TrialRecord.job_id == JobRecord.id, TrialRecord.status.in_(ACTIVE_TRIAL_STATUSES)
            ),
        )
    ).all()
    for job_id in {*idle, *touched}:
        outcome = close_if_done(session, job_id)
        if outcome == "aggregate":
            out.aggregate.append(job_id)
        elif outcome == "canceled":
            out.canceled.append(job_id)
    # An aggregation whose worker died (or whose message was lost): sent again once its lease ran out.
    stuck = session.scalars(
        select(JobRecord.id).where(
            JobRecord.status == "running",
            JobRecord.stage == AGGREGATING,
            or_(JobRecord.heartbeat_at < stale, JobRecord.heartbeat_at.is_(None)),
        )
    ).all()
    for job_id in stuck:
        result = session.execute(
            update(JobRecord)
            .where(
                JobRecord.id == job_id,
                JobRecord.stage == AGGREGATING,
                JobRecord.status == "running",
                or_(JobRecord.heartbeat_at < stale, JobRecord.heartbeat_at.is_(None)),
            )
            .values(heartbeat_at=now)
        )
        if result.rowcount == 1 and job_id not in out.aggregate:
            out.aggregate.append(job_id)
    return out


def running_trials_of(session: Session, tenant: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(TrialRecord)
            .where(and_(TrialRecord.tenant == tenant, TrialRecord.status == "running"))
        )
        or 0
    )


def requeue_running(session: Session) -> int:
    """After a restart of the embedded service no worker can hold a trial: running ones go back to queued
    (their attempt stays counted)."""
    result = session.execute(
        update(TrialRecord)
        .where(TrialRecord.status == "running")
        .values(status="queued", heartbeat_at=None, dispatched_at=None, progress=0.0)
    )
    return int(result.rowcount or 0)
