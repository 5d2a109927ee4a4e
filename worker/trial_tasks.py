"""Trials as tasks (issue 23): a job that fans out (``worker.kinds.trial_rules``: a sweep, K-fold
cross-validation) runs as one task per trial on whichever worker takes it, then one aggregation task; no task waits for another.

- ``fan_out`` (called by the job's task, ``worker.tasks``, instead of the pipeline): creates the trial records
  (``app.db.trials``), moves the job to stage ``trials``, sends one ``secateurs.run_trial`` per queued trial to
  the trials queue (``app.queue.TRIALS_QUEUE``) and returns: the job stays ``running``, held by no task.
- ``run_trial``: claims the trial (conditionally; a tenant already running
  ``SECATEURS_TENANT_MAX_RUNNING_TRIALS`` trials gets it back in the queue with a countdown, so it never holds
  a worker while it waits), loads the model and data through the worker cache, runs the pipeline for its index
  (``run_pipeline(..., trial=i)``: the ordinary one-target run), stores its files in the blob store under the
  job's artifact names (``artifacts/sparsity-0.80.zip``, ...) and its document in the trial record. Progress
  reports renew the trial's lease, update the job's progress (the mean over its trials) and carry cancel.
- whoever ends the last trial (``app.db.trials.close_if_done``: decided by one conditional UPDATE) sends
  ``secateurs.aggregate_trials``, which builds the kind's document from the trials' (the same document the
  one-task run builds), writes ``metrics.json`` and ends the job ``succeeded`` (or ``failed`` when no trial
  succeeded, ``canceled`` when asked).

A trial whose worker dies is re-queued by the reaper (``app.maintenance``) with its attempt counted; after
``max_attempts`` it is ``failed`` and the sweep reports that point with its reason. Like ``worker.tasks``,
this module touches the store.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, current_app, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from app import job_files
from app.config import Settings
from app.db import jobs, trials
from app.db.engine import session_scope
from app.db.tables import DatasetRecord, JobRecord, ModelRecord, TrialRecord, as_utc, utcnow
from app.errors import SecateursError, StoreUnavailable
from app.observability.logs import bind, log_context
from app.presenters import trial_out
from app.queue import AGGREGATE_TRIALS, RUN_TRIAL, send
from app.schemas.metrics import MetricsDocument
from app.schemas.resources import TrialOut
from app.schemas.spec import PruneSpec
from app.storage import Storage
from app.webhooks.delivery import publish_for_job
from worker import tasks
from worker.blobs import with_retries
from worker.lease import JobLease
from worker.tasks import (
    JobCanceled,
    Progress,
    _context,
    _error,
    _sha256,
    _unexpected,
    job_arrays,
    prepared_model_dir,
)

if TYPE_CHECKING:  # worker.kinds imports TensorFlow: only inside the tasks (see worker.celery_worker)
    from worker.kinds.plans import Aggregated, NextPhase

log = logging.getLogger("secateurs.worker")


def fans_out(spec: PruneSpec, settings: Settings) -> bool:
    """Whether a job of this spec runs as trials (``SECATEURS_FAN_OUT_TRIALS``, and a kind that can)."""
    from worker.kinds import trial_rules

    return settings.fan_out_trials and trial_rules(spec) is not None


def worker_name() -> str:
    """This worker process's name, unique per process: ``secateurs-<pid>@<host>`` (the pid of this process,
    which runs the tasks; the Celery node name carries its supervisor's)."""
    return f"secateurs-{os.getpid()}@{socket.gethostname()}"


def fan_out(job: JobRecord, spec: PruneSpec, attempt: int) -> bool:
    """For a job that fans out: create its trials (once: a parent run again after a restart finds them), hand
    the job over to them, send the queued ones and return True without waiting. False: run it in one task."""
    from worker.kinds import trial_rules

    settings, sessions, _ = _context()
    rules = trial_rules(spec)
    if rules is None or not settings.fan_out_trials:
        return False
    planned = rules.plan(spec)
    specs = [trials.TrialSpec(i, p.label, p.target, 0, p.params) for i, p in enumerate(planned)]
    heaviest_first = sorted(range(len(planned)), key=lambda i: -planned[i].cost)  # stable: else by index
    with session_scope(sessions) as session:
        trials.create_trials(session, job, rules.name, specs)
        if not trials.enter_trials_stage(session, job.id, attempt):
            raise JobCanceled  # canceled or taken over meanwhile
        queued = trials.queued_trials(session, job.id, first=heaviest_first)
    _send_trials(current_app, sessions, queued)
    log.info("job %s: %d trial(s) sent", job.id, len(queued))
    _close(current_app, sessions, job.id)  # a parent run again may find every trial ended already
    return True


tasks.fan_out_hook = fan_out


def _send_trials(celery: Celery, sessions: sessionmaker[Session], ids: list[str]) -> None:
    for tid in ids:
        send(celery, RUN_TRIAL, tid)
    with session_scope(sessions) as session:
        trials.mark_dispatched(session, ids)


def _close(celery: Celery, sessions: sessionmaker[Session], job_id: str) -> None:
    """After a trial ended (committed): the one caller that finds none active sends the aggregation."""
    with session_scope(sessions) as session:
        outcome = trials.close_if_done(session, job_id)
    if outcome == "aggregate":
        send(celery, AGGREGATE_TRIALS, job_id)
    elif outcome == "canceled":
        with session_scope(sessions) as session:
            publish_for_job(celery, session, job_id)


# --- one trial ----------------------------------------------------------------------------------------------


class TrialLease(JobLease):
    """The job lease's heartbeat and time limits, renewing the trial's record instead of the job's."""

    def __init__(
        self, sessions: sessionmaker[Session], trial_id: str, attempt: int, settings: Settings
    ) -> None:
        super().__init__(sessions, trial_id, attempt, settings, self._on_hard_limit)

    def _renew(self, session: Session) -> bool:
        return trials.renew_trial(session, self.job_id, self.attempt)

    def _on_hard_limit(self, timings: str) -> None:
        with session_scope(self.sessions) as session:
            trial = session.get(TrialRecord, self.job_id)
            trials.finish_trial(
                session,
                self.job_id,
                self.attempt,
                "failed",
                error=_error(
                    "timeout", f"the trial ran past the hard time limit (timings so far: {timings})"
                ),
            )
            job_id = trial.job_id if trial else None
        if job_id:
            _close(current_app, self.sessions, job_id)


class _TrialProgress(Progress):
    """A trial's report: its lease renewed, the job's progress moved, and cancel carried (a canceled job stops
    its running trials at their next report)."""

    def _write(self, session: Session, stage: str, progress: float) -> tuple[bool, bool]:
        return trials.report_trial(session, self.record_id, self.lease.attempt, progress)


@shared_task(name=RUN_TRIAL, bind=True, acks_late=True)
def run_trial(self: Task, trial_id: str) -> None:
    with log_context(trial_id=trial_id, job_id=trial_id.rsplit(".", 1)[0]):
        _run_trial(self.app, trial_id)


def _run_trial(celery: Celery, trial_id: str) -> None:
    settings, sessions, storage = _context()
    with session_scope(sessions) as session:
        claim = trials.claim_trial(
            session,
            trial_id,
            max_attempts=settings.max_attempts,
            worker=worker_name(),
            tenant_cap=settings.tenant_max_running_trials,
        )
        trial = session.get(TrialRecord, trial_id)
        job_id = trial.job_id if trial else None
    if claim.reason == "capped":  # back to the queue for a while: no worker waits for a tenant's slot
        send(celery, RUN_TRIAL, trial_id, countdown=settings.trial_requeue_countdown_s)
        with session_scope(sessions) as session:
            trials.mark_dispatched(session, [trial_id])
        return
    if claim.reason in ("ended", "exhausted") and job_id:
        _close(celery, sessions, job_id)
        return
    if not claim.claimed or job_id is None:
        log.info("trial %s not run: %s", trial_id, claim.reason)
        return
    attempt = claim.attempts
    tick = time.perf_counter()
    status, error, document, files = "failed", None, None, None
    try:
        with TrialLease(sessions, trial_id, attempt, settings) as lease:
            status, error, document, files = _run_claimed_trial(trial_id, attempt, lease, settings, storage)
    except Exception as exc:  # recorded below; the trial must not stay running
        log.exception("trial %s failed", trial_id)
        status, error = "failed", _unexpected(exc, job_id)
    with session_scope(sessions) as session:
        ended = trials.finish_trial(
            session,
            trial_id,
            attempt,
            status,  # type: ignore[arg-type]
            error=error,
            document=document,
            files=files,
            seconds=time.perf_counter() - tick,
        )
    if not ended:
        log.info("trial %s ended after it was taken over; not recorded", trial_id)
    _close(celery, sessions, job_id)


def _run_claimed_trial(
    trial_id: str, attempt: int, lease: TrialLease, settings: Settings, storage: Storage
) -> tuple[str, dict[str, str] | None, dict[str, Any] | None, list[dict[str, Any]] | None]:
    """(status, error, document, files) of one claimed trial."""
    from worker.errors import PipelineError
    from worker.pipeline import run_pipeline

    _, sessions, _ = _context()
    with session_scope(sessions) as session:
        trial = session.get(TrialRecord, trial_id)
        assert trial is not None
        job = session.get(JobRecord, trial.job_id)
        assert job is not None
        bind(tenant=job.tenant)
        model = session.get(ModelRecord, job.model_id)
        train = session.get(DatasetRecord, job.train_dataset_id) if job.train_dataset_id else None
        evaluation = session.get(DatasetRecord, job.eval_dataset_id) if job.eval_dataset_id else None
        calibration = (
            session.get(DatasetRecord, job.calibration_dataset_id) if job.calibration_dataset_id else None
        )
        for obj in {id(o): o for o in (trial, job, model, train, evaluation, calibration) if o}.values():
            session.expunge(obj)
    report = _TrialProgress(sessions, trial_id, lease)
    work = storage.job_dir(job.id) / f"trial-{trial.index}-{attempt}"
    try:
        report("loading", 0.0)
        if model is None or model.status != "ready":
            return "failed", _error("missing_model", f"model {job.model_id} is gone or not ready"), None, None
        if any(
            wanted and record is None
            for wanted, record in (
                (job.train_dataset_id, train),
                (job.eval_dataset_id, evaluation),
                (job.calibration_dataset_id, calibration),
            )
        ):
            return "failed", _error("missing_dataset", "a dataset of the job was deleted"), None, None
        spec = PruneSpec.model_validate(job.spec)
        saved_model = prepared_model_dir(model, storage, settings)
        data = job_arrays(spec, model, train, evaluation, calibration, storage, settings)
        for stale in storage.job_dir(job.id).glob(f"trial-{trial.index}-*"):  # an earlier attempt's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        work.mkdir(parents=True)
        document = run_pipeline(
            saved_model,
            spec,
            data.train,
            data.evaluation,
            work,
            report,
            data.calibration,
            trial=trial.index,
            trial_params=trial.params,
        )
        data.add_notes(document)
        if not lease.confirm():  # a worker the reaper gave up on must not replace the new attempt's files
            raise JobCanceled
        files = _store_files(storage, job.id, work / "artifacts")
        return "succeeded", None, document, files
    except JobCanceled:
        return "canceled", _error("canceled", "the job was canceled or this trial taken over"), None, None
    except SoftTimeLimitExceeded:
        return (
            "failed",
            _error("timeout", f"the trial ran past the {settings.task_soft_time_limit} s limit"),
            None,
            None,
        )
    except PipelineError as exc:
        return "failed", _error(exc.code, exc.message), None, None
    except StoreUnavailable as exc:
        return "failed", _error("store_unavailable", exc.detail), None, None
    except SecateursError as exc:
        return "failed", _error("invalid_input", exc.detail), None, None
    except MemoryError:
        return "failed", _error("out_of_memory", "the worker ran out of memory"), None, None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _store_files(storage: Storage, job_id: str, source: Path) -> list[dict[str, Any]]:
    """The trial's files (``<work>/artifacts/<name>.<ext>``) into the job's ``artifacts/``, and into a remote
    store (only these files: other trials of the job may be writing beside them on this host)."""
    target = storage.job_dir(job_id) / "artifacts"
    target.mkdir(parents=True, exist_ok=True)
    entries = []
    for path in sorted(source.iterdir()) if source.is_dir() else []:
        if not path.is_file():
            continue
        entries.append(
            job_files.entry(path.stem, f"artifacts/{path.name}", path.stat().st_size, _sha256(path))
        )
        os.replace(path, target / path.name)
        if storage.remote:
            key = storage.job_key(job_id, f"artifacts/{path.name}")
            with_retries(f"storing {key}", lambda key=key, p=target / path.name: storage.publish(key, p))  # type: ignore[misc]
            (target / path.name).unlink(missing_ok=True)
    return entries


# --- aggregation --------------------------------------------------------------------------------------------


@shared_task(name=AGGREGATE_TRIALS, bind=True, acks_late=True)
def aggregate_trials(self: Task, job_id: str) -> None:
    with log_context(job_id=job_id, stage=trials.AGGREGATING):
        try:
            _aggregate(job_id)
        finally:
            _, sessions, _ = _context()
            with session_scope(sessions) as session:
                publish_for_job(self.app, session, job_id)


def _aggregate(job_id: str) -> None:
    from worker.errors import PipelineError
    from worker.kinds import trial_rules
    from worker.kinds.plans import NextPhase

    _, sessions, storage = _context()
    with session_scope(sessions) as session:
        job = session.get(JobRecord, job_id)
        if job is None or job.status != "running" or job.stage != trials.AGGREGATING:
            return
        rows = trials.list_trials(session, job_id)
        for obj in (job, *rows):
            session.expunge(obj)
        if job.cancel_requested:
            jobs.finish_job(session, job_id, "canceled", error=_error("canceled", "canceled by request"))
            return
    started = job.started_at
    try:
        spec = PruneSpec.model_validate(job.spec)
        trial_rows = [_trial_row(t) for t in rows]
        rules = trial_rules(spec)
        assert rules is not None
        outcome = rules.aggregate(spec, trial_rows)
        if isinstance(outcome, NextPhase):
            _next_phase(job, rules.name, rows, outcome)
            return
        document = outcome.document
        document["trials"] = [TrialOut.model_validate(trial_out(t)).model_dump(mode="json") for t in rows]
        if started is not None:  # the job's wall time, queueing of its trials included
            elapsed = (utcnow() - as_utc(started)).total_seconds()  # type: ignore[operator]
            document.setdefault("timings_s", {})["total"] = round(elapsed, 4)
        full = {"job_id": job_id, "model_id": job.model_id, **document}
        MetricsDocument.model_validate(full)
        job_dir = storage.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "metrics.json").write_text(json.dumps(full, indent=2, allow_nan=False))
        files, main = _job_files(rows, outcome)
        if storage.remote:
            key = storage.job_key(job_id, "metrics.json")
            with_retries(f"storing {key}", lambda: storage.publish(key, job_dir / "metrics.json"))
            shutil.rmtree(job_dir, ignore_errors=True)
        with session_scope(sessions) as session:
            done = jobs.finish_job(
                session,
                job_id,
                "succeeded",
                artifact_sha256=main["sha256"] if main else None,
                artifact_bytes=main["size_bytes"] if main else None,
                timings={"trials": round(sum(t.seconds or 0.0 for t in rows), 3)},
                artifacts=files,
            )
        if not done:
            log.info("job %s aggregated after it ended otherwise; not recorded", job_id)
    except PipelineError as exc:
        with session_scope(sessions) as session:
            jobs.finish_job(session, job_id, "failed", error=_error(exc.code, exc.message))
    except Exception as exc:
        log.exception("job %s: aggregation failed", job_id)
        with session_scope(sessions) as session:
            jobs.finish_job(session, job_id, "failed", error=_unexpected(exc, job_id))


def _job_files(
    rows: list[TrialRecord], outcome: Aggregated
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The job's files: the top trial's zip as ``saved_model`` first (none for a job that keeps no model),
    then every succeeded trial's files by name (a sweep's ``sparsity-0.80``, exports); and that zip's entry."""
    main = None
    if outcome.top is not None:
        top = next(t for t in rows if t.index == outcome.top)
        main = next(f for f in top.files or [] if f["file"] == f"artifacts/{top.label}.zip")
    every = sorted(
        (
            f
            for t in rows
            if t.status == "succeeded"
            for f in (t.files or [])
            if main is None or outcome.top_listed or f["file"] != main["file"]  # K-fold: saved_model only
        ),
        key=lambda f: f["file"],
    )
    if main is None:
        return every, None
    saved = job_files.entry(job_files.SAVED_MODEL, main["file"], main["size_bytes"], main["sha256"])
    return [saved, *every], main


def _next_phase(job: JobRecord, kind: str, rows: list[TrialRecord], outcome: NextPhase) -> None:
    """More trials, computed from the ended ones: created and handed the job back in one transaction, then
    sent (a crash in between leaves them queued for the reaper to send)."""
    _, sessions, _ = _context()
    phase = max(t.phase for t in rows) + 1
    first = max(t.index for t in rows) + 1
    specs = [
        trials.TrialSpec(first + i, p.label, p.target, phase, p.params) for i, p in enumerate(outcome.trials)
    ]
    with session_scope(sessions) as session:
        queued = trials.start_next_phase(session, job, kind, specs)
    _send_trials(current_app, sessions, queued)
    log.info("job %s: phase %d, %d trial(s) sent", job.id, phase, len(queued))


def _trial_row(trial: TrialRecord) -> dict[str, Any]:
    return {
        "index": trial.index,
        "phase": trial.phase,
        "label": trial.label,
        "params": trial.params,
        "status": trial.status,
        "document": trial.document,
        "seconds": trial.seconds,
        "error": trial.error,
    }
