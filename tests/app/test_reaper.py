"""The reaper (jobs.reap + app.maintenance) on SQLite AND PostgreSQL, the per-tenant job quota, and the 503 a
database outage gets. The real-process versions (SIGKILLed worker, Redis restart) are in tests/faults."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app import maintenance
from app.config import Settings
from app.db import jobs, records
from app.db.engine import session_scope
from app.db.tables import JobRecord, ModelRecord, WebhookMessageRecord, as_utc, utcnow
from app.main import create_app
from app.maintenance import Maintenance
from app.storage import Storage
from tests.app.helpers import app_of, assert_problem, create_job, mark_model, sent_tasks, upload_model


@pytest.fixture
def sessions(store_sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    return store_sessions


def _job(session: Session, status: str = "queued", **values: Any) -> str:
    job = records.add(
        session,
        JobRecord(
            id=records.new_id("job"),
            model_id="mdl_x",
            spec={"target_sparsity": 0.5},
            status=status,
            progress=0.0,
            attempts=values.pop("attempts", 0),
            cancel_requested=False,
            **values,
        ),
    )
    return job.id


def _reap(session: Session, **kwargs: Any) -> jobs.Reaped:
    options: dict[str, Any] = {"lease_seconds": 60, "max_attempts": 3, "redispatch_after_s": 600}
    return jobs.reap(session, **(options | kwargs))


def test_dead_worker_job_is_requeued_live_one_kept(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_scope(sessions) as s:
        dead = _job(s, "running", attempts=1, heartbeat_at=now - timedelta(seconds=61))
        live = _job(s, "running", attempts=1, heartbeat_at=now - timedelta(seconds=5))
    with session_scope(sessions) as s:
        reaped = _reap(s)
    assert reaped.requeued == [dead] and reaped.failed == []
    assert dead in reaped.resend_jobs and live not in reaped.resend_jobs
    with session_scope(sessions) as s:
        job = s.get(JobRecord, dead)
        assert job is not None and (job.status, job.stage, job.heartbeat_at) == ("queued", None, None)
        assert job.attempts == 1  # counted when claimed, not when re-queued
        other = s.get(JobRecord, live)
        assert other is not None and other.status == "running"
    with session_scope(sessions) as s:  # the next claim runs it again, as attempt 2
        claim = jobs.claim_job(s, dead, lease_seconds=60, max_attempts=3)
    assert claim.claimed and claim.attempts == 2


def test_dead_worker_job_fails_once_attempts_are_used_up(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s:
        job_id = _job(
            s,
            "running",
            attempts=3,
            heartbeat_at=utcnow() - timedelta(seconds=300),
            webhook_url="https://example.com/hook",
        )
    with session_scope(sessions) as s:
        reaped = _reap(s)
    assert reaped.failed == [job_id] and reaped.requeued == [] and job_id not in reaped.resend_jobs
    with session_scope(sessions) as s:
        job = s.get(JobRecord, job_id)
        assert job is not None and job.status == "failed" and job.finished_at is not None
        assert job.error is not None and job.error["code"] == "interrupted"
        assert "3 times" in job.error["message"]
        # the ending recorded its webhook message in the same transaction, like any other ending
        assert s.query(WebhookMessageRecord).filter_by(job_id=job_id, event_type="job.failed").count() == 1


def test_reaping_twice_acts_once(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s:
        job_id = _job(s, "running", attempts=1, heartbeat_at=utcnow() - timedelta(seconds=100))
    with session_scope(sessions) as s:
        first = _reap(s)
    with session_scope(sessions) as s:
        second = _reap(s)
    assert first.requeued == [job_id] and second.requeued == []


def test_queued_messages_are_resent_only_when_old_or_after_a_broker_restart(
    sessions: sessionmaker[Session],
) -> None:
    now = utcnow()
    with session_scope(sessions) as s:
        fresh = _job(s, dispatched_at=now - timedelta(seconds=10))
        old = _job(s, dispatched_at=now - timedelta(seconds=601))
        never = _job(s)  # dispatched_at NULL: an API that died between commit and publish
        s.add(
            ModelRecord(
                id="mdl_v",
                name="m",
                format="saved_model",
                filename="m.zip",
                size_bytes=1,
                sha256="0" * 64,
                status="validating",
                dispatched_at=now - timedelta(seconds=5),
            )
        )
    with session_scope(sessions) as s:
        reaped = _reap(s)
    assert set(reaped.resend_jobs) == {old, never} and reaped.resend_models == []
    with session_scope(sessions) as s:
        everything = _reap(s, resend_all_queued=True)
    assert set(everything.resend_jobs) == {fresh, old, never} and everything.resend_models == ["mdl_v"]
    with session_scope(sessions) as s:
        jobs.mark_dispatched(s, job_ids=[old, never])
    with session_scope(sessions) as s:
        assert _reap(s).resend_jobs == []


class FakeCelery:
    """Records published tasks; `down` makes publishing fail like an unreachable broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.down = False

    def send_task(self, name: str, args: list[str], **_: Any) -> None:
        if self.down:
            raise ConnectionRefusedError("broker down")
        self.sent.append((name, args[0]))


def test_maintenance_resends_everything_after_a_broker_restart(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path, redispatch_after_s=3600, lease_seconds=30, heartbeat_seconds=1)
    marker_missing = iter([False, False, True, False])
    monkeypatch.setattr(maintenance, "broker_lost_messages", lambda _celery: next(marker_missing))
    celery = FakeCelery()
    loop = Maintenance(settings, celery, sessions, Storage(tmp_path))  # type: ignore[arg-type]
    with session_scope(sessions) as s:
        job_id = _job(s, dispatched_at=utcnow())
        dead = _job(s, "running", attempts=1, heartbeat_at=utcnow() - timedelta(seconds=31))

    first = loop.run_once()  # re-queues the dead worker's job and sends it
    assert first.requeued == [dead] and celery.sent == [("secateurs.run_job", dead)]
    assert loop.run_once().sent_jobs == []  # the marker is there: the fresh message is trusted
    celery.sent.clear()
    third = loop.run_once()  # the marker is gone: Redis restarted and may have lost both messages
    assert third.broker_restarted and sorted(third.sent_jobs) == sorted([job_id, dead])
    assert loop.run_once().sent_jobs == []  # sent once; back to trusting the broker


@pytest.mark.redis
def test_the_broker_marker_is_missing_once_per_loss(data_dir: Path, redis_url: str) -> None:
    """Against the real Redis: the first caller after a loss is told, the next ones are not."""
    import redis

    from app.queue import BROKER_MARKER, broker_lost_messages, make_celery

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    client.delete(BROKER_MARKER)
    celery = make_celery(Settings(data_dir=data_dir, broker_url=redis_url))
    assert broker_lost_messages(celery) is True
    assert broker_lost_messages(celery) is False
    client.delete(BROKER_MARKER)  # what a restart without persistence (or a flush) does
    assert broker_lost_messages(celery) is True
    assert broker_lost_messages(make_celery(Settings(data_dir=data_dir))) is False  # files keep messages


def test_maintenance_keeps_going_while_the_broker_is_down(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path, redispatch_after_s=1)

    def unreachable(_celery: Any) -> bool:
        raise ConnectionRefusedError("no broker")

    monkeypatch.setattr(maintenance, "broker_lost_messages", unreachable)
    celery = FakeCelery()
    loop = Maintenance(settings, celery, sessions, Storage(tmp_path))  # type: ignore[arg-type]
    with session_scope(sessions) as s:
        job_id = _job(s, dispatched_at=utcnow() - timedelta(seconds=5))
    report = loop.run_once()
    assert report.errors and "broker" in report.errors[0] and celery.sent == []
    monkeypatch.setattr(maintenance, "broker_lost_messages", lambda _celery: False)
    assert loop.run_once().sent_jobs == [job_id]
    with session_scope(sessions) as s:
        job = s.get(JobRecord, job_id)
        assert job is not None and job.dispatched_at is not None
        assert as_utc(job.dispatched_at) > utcnow() - timedelta(seconds=30)


# --- the API side -----------------------------------------------------------------------------------------


def test_quota_of_active_jobs_per_tenant(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, min_free_bytes=0, max_active_jobs_per_tenant=2)
    with TestClient(create_app(settings)) as client:
        model = upload_model(client)
        mark_model(app_of(client), model["id"], "ready")
        first = create_job(client, model["id"])
        create_job(client, model["id"])
        refused = client.post("/v1/jobs", json={"model_id": model["id"], "spec": {"target_sparsity": 0.5}})
        body = assert_problem(refused, 429)
        assert body["active_jobs"] == 2 and body["limit"] == 2
        assert "SECATEURS_MAX_ACTIVE_JOBS_PER_TENANT" in body["detail"]
        assert int(refused.headers["Retry-After"]) > 0
        assert len(client.get("/v1/jobs").json()["items"]) == 2  # nothing kept
        assert len([t for t in sent_tasks(settings) if t.task == "secateurs.run_job"]) == 2
        client.post(f"/v1/jobs/{first['id']}/cancel")  # a queued job ends at once: room for one more
        create_job(client, model["id"])


def test_jobs_record_when_their_message_was_sent(client: TestClient) -> None:
    model = upload_model(client)
    mark_model(app_of(client), model["id"], "ready")
    job = create_job(client, model["id"])
    with session_scope(app_of(client).state.session_factory) as s:
        record = s.get(JobRecord, job["id"])
        model_record = s.get(ModelRecord, model["id"])
        assert record is not None and record.dispatched_at is not None
        assert model_record is not None and model_record.dispatched_at is not None


def test_database_outage_is_503_with_retry_after(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_: Any, **__: Any) -> None:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(records, "list_jobs", down)
    response = client.get("/v1/jobs")
    body = assert_problem(response, 503)
    assert response.headers["Retry-After"] == "5" and "database" in body["detail"]


def test_serve_runs_the_reaper_thread(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=data_dir, min_free_bytes=0, reaper_interval_s=0.2)
    monkeypatch.setattr(maintenance, "broker_lost_messages", lambda _celery: False)
    with TestClient(create_app(settings, maintenance=True)) as client:
        app = app_of(client)
        with session_scope(app.state.session_factory) as s:
            job_id = _job(s, "running", attempts=1, heartbeat_at=utcnow() - timedelta(seconds=3600))
        loop = app.state.maintenance
        assert loop is not None

        def requeued_and_sent() -> bool:  # the message goes out first, then dispatched_at is written
            with session_scope(app.state.session_factory) as s:
                job = s.get(JobRecord, job_id)
                return job is not None and job.status == "queued" and job.dispatched_at is not None

        for _ in range(300):
            if requeued_and_sent():
                break
            loop._stop.wait(0.1)
        assert requeued_and_sent()
        assert [t.task for t in sent_tasks(settings) if t.args == [job_id]] == ["secateurs.run_job"]
    assert loop._thread is not None and not loop._thread.is_alive()  # stopped with the app


def test_a_worker_given_up_on_cannot_write_over_the_run_that_replaced_it(
    sessions: sessionmaker[Session],
) -> None:
    """The first worker was cut off longer than the lease (alive after all): the reaper re-queued its job and
    a second worker claimed it as attempt 2. Everything the first one writes with attempt 1 is a no-op."""
    with session_scope(sessions) as s:
        job_id = _job(s, "running", attempts=1, heartbeat_at=utcnow() - timedelta(seconds=100))
    with session_scope(sessions) as s:
        assert _reap(s).requeued == [job_id]
    with session_scope(sessions) as s:
        assert jobs.claim_job(s, job_id, lease_seconds=60, max_attempts=3).attempts == 2
    with session_scope(sessions) as s:
        assert not jobs.renew_lease(s, job_id, 1)
        assert jobs.report_progress(s, job_id, "saving", 0.9, 1)[0] is False
        assert not jobs.finish_job(
            s, job_id, "succeeded", artifact_sha256="a" * 64, artifact_bytes=1, attempt=1
        )
        assert jobs.renew_lease(s, job_id, 2)
    with session_scope(sessions) as s:
        job = s.get(JobRecord, job_id)
        assert job is not None and job.status == "running" and job.artifact_sha256 is None
        assert job.stage == "loading"  # attempt 1's progress report did not land either
    with session_scope(sessions) as s:
        assert jobs.finish_job(s, job_id, "succeeded", artifact_sha256="b" * 64, artifact_bytes=2, attempt=2)


# A monotonic clock's origin is arbitrary (boot on Linux): the first pass must sweep whatever it reads.
@pytest.mark.parametrize("clock_start", [-1e4, 0.0, 5.0, 1e6])
def test_retention_runs_on_the_first_pass_then_at_its_own_interval(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock_start: float
) -> None:
    calls: list[int] = []
    now = [clock_start]
    monkeypatch.setattr(maintenance, "broker_lost_messages", lambda _celery: False)
    monkeypatch.setattr(maintenance.retention, "sweep", lambda *_args: calls.append(1))
    loop = Maintenance(
        Settings(data_dir=tmp_path, retention_interval_s=3600),
        FakeCelery(),  # type: ignore[arg-type]
        sessions,
        Storage(tmp_path),
        clock=lambda: now[0],
    )
    for _ in range(3):
        loop.run_once()
        now[0] += 15.0
    assert len(calls) == 1  # the reaper passes go on; the directory listing waits an hour
    now[0] = clock_start + 3599.0
    loop.run_once()
    assert len(calls) == 1
    now[0] = clock_start + 3600.0  # the interval has passed
    loop.run_once()
    assert len(calls) == 2
