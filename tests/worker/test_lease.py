"""The lease thread beside a running job: heartbeats, losing the job, soft and hard time limits (no TensorFlow)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import jobs, records
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import JobRecord, as_utc, utcnow
from worker import lease as lease_module
from worker.lease import EXIT_HARD_TIME_LIMIT, JobLease


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    init_db(engine)
    return make_session_factory(engine)


def _running_job(sessions: sessionmaker[Session]) -> str:
    with session_scope(sessions) as s:
        job = records.add(
            s,
            JobRecord(
                id=records.new_id("job"),
                model_id="mdl_x",
                spec={},
                status="running",
                progress=0.0,
                attempts=1,
                cancel_requested=False,
                heartbeat_at=utcnow() - timedelta(seconds=50),
            ),
        )
        return job.id


def _heartbeat(sessions: sessionmaker[Session], job_id: str) -> Any:
    with session_scope(sessions) as s:
        job = s.get(JobRecord, job_id)
        assert job is not None
        return as_utc(job.heartbeat_at)


def _wait(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_heartbeat_renews_the_lease(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    job_id = _running_job(sessions)
    before = _heartbeat(sessions, job_id)
    settings = Settings(data_dir=tmp_path, heartbeat_seconds=0.2, lease_seconds=1)
    with JobLease(sessions, job_id, 1, settings, lambda _t: None) as lease:
        assert _wait(lambda: _heartbeat(sessions, job_id) > before + timedelta(seconds=40))
        assert not lease.lost


def test_a_job_taken_away_is_noticed(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    job_id = _running_job(sessions)
    settings = Settings(data_dir=tmp_path, heartbeat_seconds=0.2, lease_seconds=1)
    with JobLease(sessions, job_id, 1, settings, lambda _t: None) as lease:
        with session_scope(sessions) as s:  # e.g. the reaper failed it, or it was canceled and ended
            jobs.finish_job(s, job_id, "failed", error={"code": "interrupted", "message": "x"})
        assert _wait(lambda: lease.lost)


def test_soft_limit_raises_at_the_next_report_with_timings(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, task_soft_time_limit=10, task_hard_time_limit=20)
    lease = JobLease(sessions, _running_job(sessions), 1, settings, lambda _t: None)
    lease.entered("loading")
    lease.entered("loading")
    lease.entered("fine_tuning")
    lease.check_time()  # within the limit: nothing
    lease.soft_deadline = time.monotonic() - 1
    with pytest.raises(SoftTimeLimitExceeded):
        lease.check_time()
    timings = lease.timings()
    assert timings.startswith("loading ") and timings.endswith("(interrupted)")
    assert timings.count("fine_tuning") == 1 and timings.count("loading") == 1


def test_hard_limit_records_the_failure_then_ends_the_process(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exited = threading.Event()
    codes: list[int] = []

    def fake_exit(code: int) -> None:  # the real one ends the process
        codes.append(code)
        exited.set()

    monkeypatch.setattr(lease_module, "exit_process", fake_exit)
    recorded: list[str] = []
    settings = Settings(
        data_dir=tmp_path,
        heartbeat_seconds=0.2,
        lease_seconds=1,
        task_soft_time_limit=10,
        task_hard_time_limit=20,
    )
    lease = JobLease(sessions, _running_job(sessions), 1, settings, recorded.append)
    lease.entered("fine_tuning")
    lease.hard_deadline = time.monotonic()  # as if 20 s had passed inside one TensorFlow call
    with lease:
        assert exited.wait(10)
    assert codes == [EXIT_HARD_TIME_LIMIT]
    assert len(recorded) == 1 and "fine_tuning" in recorded[0]


def test_confirm_tells_whether_the_job_is_still_ours(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    job_id = _running_job(sessions)
    settings = Settings(data_dir=tmp_path)
    assert JobLease(sessions, job_id, 1, settings, lambda _t: None).confirm()
    stale = JobLease(sessions, job_id, 0, settings, lambda _t: None)  # an older attempt's worker
    assert not stale.confirm() and stale.lost
