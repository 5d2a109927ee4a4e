"""Repository functions on SQLite AND PostgreSQL: the claim/finish state machine and pagination."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.db import jobs, model_status, records
from app.db.engine import session_scope
from app.db.tables import JobRecord, ModelRecord, as_utc, utcnow


@pytest.fixture
def sessions(store_sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    return store_sessions


def _job(session: Session, job_id: str | None = None, model_id: str = "mdl_x") -> JobRecord:
    return records.add(
        session,
        JobRecord(
            id=job_id or records.new_id("job"),
            model_id=model_id,
            spec={"target_sparsity": 0.5},
            status="queued",
            progress=0.0,
            attempts=0,
            cancel_requested=False,
        ),
    )


def test_claim_once_then_held(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s:
        job = _job(s)
    with session_scope(sessions) as s:
        first = jobs.claim_job(s, job.id, lease_seconds=60, max_attempts=3)
    with session_scope(sessions) as s:
        second = jobs.claim_job(s, job.id, lease_seconds=60, max_attempts=3)
    assert (first.claimed, first.reason, first.attempts) == (True, "claimed", 1)
    assert (second.claimed, second.reason) == (False, "held")
    with session_scope(sessions) as s:
        record = s.get(JobRecord, job.id)
        assert record is not None and record.status == "running" and record.started_at is not None


def test_stale_lease_is_taken_over_until_attempts_run_out(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s:
        job = _job(s)
    for attempt in (1, 2):
        with session_scope(sessions) as s:
            assert jobs.claim_job(s, job.id, lease_seconds=60, max_attempts=2).attempts == attempt
            s.execute(update(JobRecord).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
    with session_scope(sessions) as s:
        claim = jobs.claim_job(s, job.id, lease_seconds=60, max_attempts=2)
    assert (claim.claimed, claim.reason) == (False, "exhausted")


def test_finish_only_from_running_and_terminal_is_final(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s:
        job = _job(s)
        assert not jobs.finish_job(s, job.id, "succeeded")  # still queued
        jobs.claim_job(s, job.id, lease_seconds=60, max_attempts=3)
        assert jobs.finish_job(s, job.id, "succeeded", artifact_sha256="ab", artifact_bytes=3)
        assert not jobs.finish_job(s, job.id, "failed", error={"code": "x", "message": "y"})
        assert jobs.claim_job(s, job.id, lease_seconds=0, max_attempts=3).reason == "terminal"
        record = s.get(JobRecord, job.id)
        assert record is not None
        s.refresh(record)
        assert (record.status, record.progress, record.artifact_bytes) == ("succeeded", 1.0, 3)


def test_cancel_queued_ends_at_once_running_sets_flag(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s:
        queued, running = _job(s), _job(s)
        jobs.claim_job(s, running.id, lease_seconds=60, max_attempts=3)
    with session_scope(sessions) as s:
        jobs.request_cancel(s, queued.id)
        jobs.request_cancel(s, running.id)
    with session_scope(sessions) as s:
        assert s.get(JobRecord, queued.id).status == "canceled"  # type: ignore[union-attr]
        still, cancel = jobs.report_progress(s, running.id, "pruning", 0.5)
    assert (still, cancel) == (True, True)


def test_recover_interrupted_requeues_or_fails(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s:
        fresh, worn, waiting = _job(s), _job(s), _job(s)
        jobs.claim_job(s, fresh.id, lease_seconds=60, max_attempts=2)
        for _ in range(2):
            s.execute(update(JobRecord).where(JobRecord.id == worn.id).values(status="queued"))
            jobs.claim_job(s, worn.id, lease_seconds=60, max_attempts=2)
    with session_scope(sessions) as s:
        resend = jobs.recover_interrupted(s, max_attempts=2)
    assert sorted(resend) == sorted([fresh.id, waiting.id])
    with session_scope(sessions) as s:
        failed = s.get(JobRecord, worn.id)
        assert failed is not None and failed.status == "failed" and failed.error["code"] == "interrupted"


def test_pagination_is_newest_first_and_complete(sessions: sessionmaker[Session]) -> None:
    base = utcnow()
    with session_scope(sessions) as s:
        ids = []
        for i in range(7):
            record = _job(s, model_id="mdl_a" if i % 2 else "mdl_b")
            record.created_at = base + timedelta(seconds=i // 2)  # ties on purpose: the id breaks them
            ids.append(record.id)
    seen: list[str] = []
    cursor = None
    with session_scope(sessions) as s:
        while True:
            rows, cursor = records.list_jobs(s, 3, cursor)
            seen += [r.id for r in rows]
            if cursor is None:
                break
        assert len(seen) == 7 and set(seen) == set(ids)
        created = [as_utc(s.get(JobRecord, i).created_at) for i in seen]  # type: ignore[union-attr]
        assert created == sorted(created, reverse=True)
        only_a, _ = records.list_jobs(s, 50, None, model_id="mdl_a")
        assert {r.model_id for r in only_a} == {"mdl_a"} and len(only_a) == 3


def test_bad_cursor_is_refused(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s, pytest.raises(records.BadCursor):
        records.list_models(s, 10, "not-a-cursor")


def test_model_result_recorded(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s:
        records.add(
            s,
            ModelRecord(
                id="mdl_1",
                name="m",
                format="saved_model",
                filename="m.zip",
                size_bytes=1,
                sha256="0" * 64,
                status="validating",
            ),
        )
    with session_scope(sessions) as s:
        assert model_status.set_model_result(
            s, "mdl_1", status="ready", signatures={"serving_default": {}}, params=10
        )
    with session_scope(sessions) as s:
        record = s.get(ModelRecord, "mdl_1")
        assert record is not None and (record.status, record.params) == ("ready", 10)
