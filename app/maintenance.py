"""The reaper: a thread in each API process that keeps the queue honest without waiting for the broker.

Every ``reaper_interval_s`` it
- re-queues jobs whose worker stopped renewing its lease (SIGKILL, out of memory, a lost machine) — or fails
  them with ``interrupted`` once ``max_attempts`` are used — instead of waiting hours for Redis's visibility
  timeout to redeliver the message;
- re-publishes queued jobs, validating models and pending (validating/converting) datasets whose message a broker lost: at once when Redis lost our
  marker key (a restart of a Redis that keeps nothing on disk drops every message and the marker with them),
  else once their message is ``redispatch_after_s`` old;
- does the same for the trials of fanned-out jobs (app.db.trials): a trial whose worker died is re-queued and
  sent again (its attempt counted; failed after ``max_attempts``), lost trial messages are re-sent, and a job
  whose trials all ended but whose aggregation never ran is aggregated;
- every ``retention_interval_s``, runs the retention sweep (app.retention).

Every change is a conditional UPDATE and every task claims its record conditionally, so several API processes
may run this at once and a duplicate message is a no-op. Errors (the database or broker down) are logged and
the next pass tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from app import retention
from app.config import Settings
from app.db import jobs, trials
from app.db.engine import session_scope
from app.queue import (
    AGGREGATE_TRIALS,
    RUN_JOB,
    RUN_TRIAL,
    VALIDATE_DATASET,
    VALIDATE_MODEL,
    broker_lost_messages,
    send,
)
from app.retention import RetentionReport
from app.storage import Storage

log = logging.getLogger("secateurs.maintenance")


@dataclass
class PassReport:
    """What one pass did; kept on the Maintenance object for tests and logs."""

    broker_restarted: bool = False
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    sent_jobs: list[str] = field(default_factory=list)
    sent_models: list[str] = field(default_factory=list)
    sent_datasets: list[str] = field(default_factory=list)
    sent_trials: list[str] = field(default_factory=list)  # trials of fanned-out jobs (app.db.trials)
    sent_aggregations: list[str] = field(default_factory=list)  # jobs whose trials all ended
    trials: trials.ReapedTrials | None = None
    retention: RetentionReport | None = None
    errors: list[str] = field(default_factory=list)


class Maintenance:
    """The reaper loop. ``clock`` is monotonic with an arbitrary origin (tests pass a fake one), so "never
    swept" is ``None`` rather than a number that happens to lie in the clock's past."""

    def __init__(
        self,
        settings: Settings,
        celery: Celery,
        sessions: sessionmaker[Session],
        storage: Storage,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.celery, self.sessions, self.storage = settings, celery, sessions, storage
        self._clock = clock
        self._resend_all = False
        self._last_retention: float | None = None  # None: the first pass sweeps (a killed API's temp files)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.last: PassReport | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="secateurs-reaper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_s):
            try:
                self.run_once()
            except Exception:  # never let the thread die: the next pass tries again
                log.exception("maintenance pass failed")

    def _check_broker(self, report: PassReport) -> bool:
        """True when the broker answers. If it may have lost its messages (its marker key is gone: Redis
        restarted without persistence), everything queued is re-sent, until one pass manages to send it all."""
        try:
            lost = broker_lost_messages(self.celery)
        except Exception as exc:
            report.errors.append(f"broker: {type(exc).__name__}: {exc}")
            return False
        if lost:
            log.warning("the broker restarted or was flushed: re-sending every queued job and validation")
            self._resend_all = True
        report.broker_restarted = self._resend_all
        return True

    def run_once(self) -> PassReport:
        report = PassReport()
        broker_up = self._check_broker(report)
        s = self.settings
        with session_scope(self.sessions) as session:
            reaped = jobs.reap(
                session,
                lease_seconds=s.lease_seconds,
                max_attempts=s.max_attempts,
                redispatch_after_s=s.redispatch_after_s,
                resend_all_queued=self._resend_all,
            )
            trial_pass = trials.reap_trials(
                session,
                lease_seconds=s.lease_seconds,
                max_attempts=s.max_attempts,
                redispatch_after_s=s.redispatch_after_s,
                resend_all_queued=self._resend_all,
            )
        report.trials = trial_pass
        for trial_id in trial_pass.requeued:
            log.warning("trial %s: its worker stopped renewing the lease; re-queued", trial_id)
        for trial_id in trial_pass.failed:
            log.warning("trial %s: its worker died and its attempts are used up; failed", trial_id)
        if trial_pass.canceled:
            self._publish_webhooks(trial_pass.canceled)
        report.requeued, report.failed = reaped.requeued, reaped.failed
        for job_id in reaped.requeued:
            log.warning("job %s: its worker stopped renewing the lease; re-queued", job_id)
        for job_id in reaped.failed:
            log.warning("job %s: its worker died and its attempts are used up; failed", job_id)
        if reaped.failed:
            self._publish_webhooks(reaped.failed)
        if broker_up:
            self._send(RUN_JOB, reaped.resend_jobs, report.sent_jobs, report)
            self._send(VALIDATE_MODEL, reaped.resend_models, report.sent_models, report)
            self._send(VALIDATE_DATASET, reaped.resend_datasets, report.sent_datasets, report)
            self._send(RUN_TRIAL, trial_pass.resend, report.sent_trials, report)  # re-queued ones too
            self._send(AGGREGATE_TRIALS, trial_pass.aggregate, report.sent_aggregations, report)
            with session_scope(self.sessions) as session:
                jobs.mark_dispatched(
                    session,
                    job_ids=report.sent_jobs,
                    model_ids=report.sent_models,
                    dataset_ids=report.sent_datasets,
                )
                trials.mark_dispatched(session, report.sent_trials)
            if not report.errors:
                self._resend_all = False
        now = self._clock()  # listing the data directory every reaper pass (15 s) would be waste
        if self._last_retention is None or now - self._last_retention >= self.settings.retention_interval_s:
            self._last_retention = now
            report.retention = self._retention(report)
        self.passes += 1
        self.last = report
        if report.sent_jobs or report.sent_models or report.sent_datasets:
            log.info(
                "re-sent %d job(s), %d model validation(s), %d dataset validation(s)",
                len(report.sent_jobs),
                len(report.sent_models),
                len(report.sent_datasets),
            )
        return report

    def _send(self, task: str, ids: list[str], sent: list[str], report: PassReport) -> None:
        for record_id in ids:
            try:
                send(self.celery, task, record_id)
            except Exception as exc:
                report.errors.append(f"publish {task} {record_id}: {type(exc).__name__}: {exc}")
                return  # the broker went away mid-pass; the rest waits for the next pass
            sent.append(record_id)

    def _publish_webhooks(self, job_ids: list[str]) -> None:
        from app.webhooks.delivery import publish_for_job

        for job_id in job_ids:
            try:
                with session_scope(self.sessions) as session:
                    publish_for_job(self.celery, session, job_id)
            except Exception:  # the outbox row stays pending; a worker start sweeps it
                log.exception("could not publish the webhook of job %s", job_id)

    def _retention(self, report: PassReport) -> RetentionReport | None:
        try:
            return retention.sweep(self.settings, self.sessions, self.storage)
        except Exception as exc:
            log.exception("retention sweep failed")
            report.errors.append(f"retention: {type(exc).__name__}: {exc}")
            return None
