"""A running job's lease and time limits, kept by a thread beside the pipeline.

Celery's solo pool (the one TensorFlow needs: no fork after import) enforces no time limits, and a job stuck in
one long TensorFlow call reports no progress, so neither can be left to the pipeline:
- the heartbeat renews the job's lease every ``heartbeat_seconds``; the reaper in the API re-queues a job whose
  lease ran out (the worker died), long before Redis's visibility timeout would redeliver it;
- past the soft limit the next progress report raises ``SoftTimeLimitExceeded`` (the job fails with
  ``timeout`` and the timings so far);
- past the hard limit (the pipeline never reached a progress report) the thread records the failure and ends
  the process: nothing else can interrupt a running TensorFlow op. The supervisor (``secateurs serve`` /
  ``secateurs worker``) starts a fresh worker.
Like worker/tasks.py, this touches the store; nothing else in worker/ does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import jobs
from app.db.engine import session_scope

log = logging.getLogger("secateurs.worker")
EXIT_HARD_TIME_LIMIT = 75  # the supervisor logs the exit code; any non-zero code restarts the worker


class JobLease:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        job_id: str,
        attempt: int,
        settings: Settings,
        on_hard_limit: Callable[[str], None],
    ) -> None:
        self.sessions, self.job_id, self.attempt, self.settings = sessions, job_id, attempt, settings
        self.on_hard_limit = on_hard_limit
        start = time.monotonic()
        self.soft_deadline = start + settings.task_soft_time_limit
        self.hard_deadline = start + settings.task_hard_time_limit
        self.stages: list[tuple[str, float]] = []  # (stage, monotonic start), for partial timings
        self.lost = False  # the record is no longer ours (canceled, taken over, failed by the reaper)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> JobLease:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def entered(self, stage: str) -> None:
        if not self.stages or self.stages[-1][0] != stage:
            self.stages.append((stage, time.monotonic()))

    def confirm(self) -> bool:
        """Renew now and say whether the job is still ours (before replacing its output files)."""
        with session_scope(self.sessions) as session:
            ours = self._renew(session)
        self.lost = self.lost or not ours
        return ours

    def _renew(self, session: Session) -> bool:
        """Renew the record's lease; False once it is no longer ours (a trial's lease renews the trial's)."""
        return jobs.renew_lease(session, self.job_id, self.attempt)

    def check_time(self) -> None:
        """Called at each progress report: past the soft limit the pipeline unwinds from here."""
        if time.monotonic() > self.soft_deadline:
            raise SoftTimeLimitExceeded()

    def stage_seconds(self) -> dict[str, float]:
        """Seconds per stage so far, and ``total``: recorded on the job when it ends (GET /metrics)."""
        now = time.monotonic()
        out: dict[str, float] = {}
        for i, (stage, started) in enumerate(self.stages):
            ended = self.stages[i + 1][1] if i + 1 < len(self.stages) else now
            out[stage] = round(out.get(stage, 0.0) + ended - started, 3)
        if self.stages:
            out["total"] = round(now - self.stages[0][1], 3)
        return out

    def timings(self) -> str:
        """'loading 1.2 s, pruning 3.4 s, fine_tuning 50.0 s (interrupted)' — what ran before a limit hit."""
        now = time.monotonic()
        parts = []
        for i, (stage, started) in enumerate(self.stages):
            ended = self.stages[i + 1][1] if i + 1 < len(self.stages) else now
            last = i + 1 == len(self.stages)
            parts.append(f"{stage} {ended - started:.1f} s" + (" (interrupted)" if last else ""))
        return ", ".join(parts) or "no stage had started"

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with session_scope(self.sessions) as session:
                    if not self._renew(session):
                        self.lost = True
            except Exception as exc:  # the database is down: keep trying; the pipeline goes on meanwhile
                log.warning("job %s: could not renew its lease: %s", self.job_id, exc)
            if time.monotonic() > self.hard_deadline and not self._stop.is_set():
                self._hard_stop()

    def _hard_stop(self) -> None:
        log.error(
            "job %s ran past the hard time limit (%s s) inside one operation; ending this worker process",
            self.job_id,
            self.settings.task_hard_time_limit,
        )
        try:
            self.on_hard_limit(self.timings())
        finally:
            self._stop.set()
            exit_process(EXIT_HARD_TIME_LIMIT)


def exit_process(code: int) -> None:
    """Now, from this thread, without unwinding the pipeline (which is stuck): flush logs, then _exit."""
    logging.shutdown()
    os._exit(code)
