"""The trial state machine (app.db.trials) on SQLite AND PostgreSQL: claims fenced by attempt, the tenant cap,
the last trial deciding the aggregation exactly once, cancel, and the reaper's pass over dead trials."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.db import jobs, records, trials
from app.db.engine import session_scope
from app.db.tables import JobRecord, TrialRecord, utcnow

SWEEP = {"sweep": {"targets": [0.5, 0.8, 0.9]}}


@pytest.fixture
def sessions(store_sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    return store_sessions


def _fanned_job(
    sessions: sessionmaker[Session], n: int = 3, tenant: str = "default"
) -> tuple[str, list[str]]:
    """A running sweep job handed over to ``n`` queued trials, as worker.trial_tasks.fan_out leaves it."""
    with session_scope(sessions) as s:
        job = records.add(
            s,
            JobRecord(
                id=records.new_id("job"),
                tenant=tenant,
                model_id="mdl_x",
                spec=SWEEP,
                status="queued",
                progress=0.0,
                attempts=0,
                cancel_requested=False,
            ),
        )
    with session_scope(sessions) as s:
        claim = jobs.claim_job(s, job.id, lease_seconds=60, max_attempts=3)
        specs = [trials.TrialSpec(i, f"sparsity-0.{i}", 0.1 * i) for i in range(n)]
        ids = trials.create_trials(s, job, "sweep", specs)
        assert trials.enter_trials_stage(s, job.id, claim.attempts)
    with session_scope(sessions) as s:  # a parent run again creates nothing new
        assert trials.create_trials(s, job, "sweep", specs) == ids
        assert trials.queued_trials(s, job.id) == ids
    return job.id, ids


def _claim(
    sessions: sessionmaker[Session], tid: str, cap: int = 0, max_attempts: int = 3
) -> trials.TrialClaim:
    with session_scope(sessions) as s:
        return trials.claim_trial(s, tid, max_attempts=max_attempts, worker="w-1@h", tenant_cap=cap)


def _finish(sessions: sessionmaker[Session], tid: str, attempt: int, status: str = "succeeded") -> str | None:
    """End a trial (committed), then close: what a trial task does."""
    with session_scope(sessions) as s:
        assert trials.finish_trial(s, tid, attempt, status, document={"x": 1}, seconds=1.0)  # type: ignore[arg-type]
    with session_scope(sessions) as s:
        return trials.close_if_done(s, tid.rsplit(".", 1)[0])


def _job(sessions: sessionmaker[Session], job_id: str) -> JobRecord:
    with session_scope(sessions) as s:
        job = s.get(JobRecord, job_id)
        assert job is not None
        return job


def test_claims_are_fenced_and_the_last_trial_sends_the_aggregation_once(
    sessions: sessionmaker[Session],
) -> None:
    job_id, ids = _fanned_job(sessions)
    assert _job(sessions, job_id).stage == "trials"
    claims = [_claim(sessions, tid) for tid in ids]
    assert [(c.claimed, c.attempts) for c in claims] == [(True, 1)] * 3
    assert _claim(sessions, ids[0]).reason == "held"  # a duplicate message
    with session_scope(sessions) as s:
        assert trials.report_trial(s, ids[0], 1, 0.5) == (True, False)
        assert not trials.report_trial(s, ids[0], 2, 0.5)[0]  # another attempt's worker is fenced off
    assert _job(sessions, job_id).progress == pytest.approx(0.5 / 3)
    assert _finish(sessions, ids[0], 1) is None
    assert _finish(sessions, ids[1], 1) is None
    with session_scope(sessions) as s:
        assert not trials.finish_trial(s, ids[2], 2, "succeeded")  # stale attempt: no effect
    assert _finish(sessions, ids[2], 1) == "aggregate"
    with session_scope(sessions) as s:  # whoever asks again (the reaper, a duplicate) does not win twice
        assert trials.close_if_done(s, job_id) is None
        assert [t.status for t in trials.list_trials(s, job_id)] == ["succeeded"] * 3
    job = _job(sessions, job_id)
    assert (job.status, job.stage, job.progress) == ("running", "aggregating", 1.0)


def test_tenant_cap_holds_trials_back_without_claiming_them(sessions: sessionmaker[Session]) -> None:
    _, ids = _fanned_job(sessions)
    _, other_ids = _fanned_job(sessions, n=1, tenant="other")
    assert _claim(sessions, ids[0], cap=2).claimed
    assert _claim(sessions, ids[1], cap=2).claimed
    capped = _claim(sessions, ids[2], cap=2)
    assert (capped.claimed, capped.reason, capped.attempts) == (False, "capped", 0)
    assert _claim(sessions, other_ids[0], cap=2).claimed  # another tenant is not held back
    with session_scope(sessions) as s:
        assert trials.running_trials_of(s, "default") == 2
    _finish(sessions, ids[0], 1)
    assert _claim(sessions, ids[2], cap=2).claimed  # a slot came free


def test_cancel_ends_queued_trials_at_once_and_running_ones_at_their_next_report(
    sessions: sessionmaker[Session],
) -> None:
    job_id, ids = _fanned_job(sessions)
    assert _claim(sessions, ids[0]).claimed
    with session_scope(sessions) as s:
        jobs.request_cancel(s, job_id)
        assert trials.cancel_trials(s, job_id) is None  # one is still running
        assert [t.status for t in trials.list_trials(s, job_id)] == ["running", "canceled", "canceled"]
        assert trials.report_trial(s, ids[0], 1, 0.3) == (True, True)  # the worker is told to stop
    assert _finish(sessions, ids[0], 1, "canceled") == "canceled"
    job = _job(sessions, job_id)
    assert (job.status, job.error["code"]) == ("canceled", "canceled")  # type: ignore[index]


def test_cancel_with_nothing_running_ends_the_job_now(sessions: sessionmaker[Session]) -> None:
    job_id, ids = _fanned_job(sessions)
    with session_scope(sessions) as s:
        jobs.request_cancel(s, job_id)
        assert trials.cancel_trials(s, job_id) == "canceled"
    assert _job(sessions, job_id).status == "canceled"
    assert _claim(sessions, ids[0]).reason == "terminal"


def test_reaper_requeues_a_dead_trial_then_fails_it_and_aggregates(sessions: sessionmaker[Session]) -> None:
    job_id, ids = _fanned_job(sessions, n=2)
    for tid in ids:
        assert _claim(sessions, tid, max_attempts=2).claimed
    _finish(sessions, ids[1], 1)

    def kill(tid: str) -> trials.ReapedTrials:
        with session_scope(sessions) as s:
            s.execute(
                update(TrialRecord)
                .where(TrialRecord.id == tid)
                .values(heartbeat_at=utcnow() - timedelta(seconds=120))
            )
        with session_scope(sessions) as s:
            return trials.reap_trials(s, lease_seconds=60, max_attempts=2, redispatch_after_s=900)

    first = kill(ids[0])
    assert (first.requeued, first.resend, first.aggregate) == ([ids[0]], [ids[0]], [])
    # A job in 'trials' is not the job reaper's to re-queue, however old its own heartbeat
    with session_scope(sessions) as s:
        s.execute(update(JobRecord).values(heartbeat_at=utcnow() - timedelta(seconds=600)))
    with session_scope(sessions) as s:
        assert jobs.reap(s, lease_seconds=60, max_attempts=3, redispatch_after_s=900).requeued == []
        assert not jobs.claim_job(s, job_id, lease_seconds=60, max_attempts=3).claimed
    second = _claim(sessions, ids[0], max_attempts=2)
    assert (second.claimed, second.attempts) == (True, 2)
    last = kill(ids[0])
    assert (last.failed, last.aggregate) == ([ids[0]], [job_id])
    with session_scope(sessions) as s:
        dead = s.get(TrialRecord, ids[0])
        assert dead is not None and dead.status == "failed" and dead.error["code"] == "interrupted"  # type: ignore[index]
    assert _job(sessions, job_id).stage == "aggregating"


def test_reaper_closes_a_job_whose_last_trial_ended_without_closing(sessions: sessionmaker[Session]) -> None:
    job_id, ids = _fanned_job(sessions, n=1)
    assert _claim(sessions, ids[0]).claimed
    with session_scope(sessions) as s:  # the worker died between ending its trial and closing the job
        assert trials.finish_trial(s, ids[0], 1, "succeeded")
    with session_scope(sessions) as s:
        reaped = trials.reap_trials(s, lease_seconds=60, max_attempts=3, redispatch_after_s=900)
    assert reaped.aggregate == [job_id]
    with session_scope(
        sessions
    ) as s:  # an aggregation whose worker died is sent again once its lease ran out
        s.execute(update(JobRecord).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
    with session_scope(sessions) as s:
        assert trials.reap_trials(s, lease_seconds=60, max_attempts=3, redispatch_after_s=900).aggregate == [
            job_id
        ]
    with session_scope(sessions) as s:
        assert trials.reap_trials(s, lease_seconds=60, max_attempts=3, redispatch_after_s=900).aggregate == []


def test_a_next_phase_hands_the_job_back_to_its_trials(sessions: sessionmaker[Session]) -> None:
    job_id, ids = _fanned_job(sessions, n=1)
    assert _claim(sessions, ids[0]).claimed
    assert _finish(sessions, ids[0], 1) == "aggregate"
    with session_scope(sessions) as s:
        job = s.get(JobRecord, job_id)
        assert job is not None
        specs = [trials.TrialSpec(1, "suggestion", None, 1, {"rows": [1, 2]})]
        assert trials.start_next_phase(s, job, "sensitivity", specs) == [f"{job_id}.1"]
    with session_scope(sessions) as s:  # a second aggregation of the same phase finds the job moved on
        job = s.get(JobRecord, job_id)
        assert job is not None and job.stage == "trials"
        assert trials.start_next_phase(s, job, "sensitivity", specs) == []
        second = s.get(TrialRecord, f"{job_id}.1")
        assert second is not None and (second.phase, second.params) == (1, {"rows": [1, 2]})
    assert _claim(sessions, f"{job_id}.1").claimed
    assert _finish(sessions, f"{job_id}.1", 1) == "aggregate"


def test_the_reaper_sends_a_dead_trial_to_the_trials_queue_and_the_aggregation(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """app.maintenance: a re-queued trial goes out on the trials queue (once), and the aggregation of a job
    whose last trial ended without closing it on the default queue."""
    from app import maintenance
    from app.config import Settings
    from app.maintenance import Maintenance
    from app.storage import Storage

    sent: list[tuple[str, str, str]] = []

    class Celery:
        def send_task(self, name: str, args: list[str], queue: str, **_: Any) -> None:
            sent.append((name, args[0], queue))

    monkeypatch.setattr(maintenance, "broker_lost_messages", lambda _celery: False)
    settings = Settings(data_dir=tmp_path, redispatch_after_s=3600, lease_seconds=30, heartbeat_seconds=1)
    loop = Maintenance(settings, Celery(), sessions, Storage(tmp_path))  # type: ignore[arg-type]
    job_id, ids = _fanned_job(sessions, n=2)
    with session_scope(sessions) as s:
        trials.mark_dispatched(s, ids)
    for tid in ids:
        assert _claim(sessions, tid).claimed
    with session_scope(sessions) as s:
        s.execute(
            update(TrialRecord)
            .where(TrialRecord.id == ids[0])
            .values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )
    report = loop.run_once()
    assert report.trials is not None and report.trials.requeued == [ids[0]]
    assert sent == [("secateurs.run_trial", ids[0], "secateurs.trials")]
    assert loop.run_once().sent_trials == []  # sent once
    with session_scope(sessions) as s:  # both end; the last one's worker dies before it closes the job
        assert trials.finish_trial(s, ids[1], 1, "succeeded")
    assert _claim(sessions, ids[0]).attempts == 2
    with session_scope(sessions) as s:
        assert trials.finish_trial(s, ids[0], 2, "succeeded")
    sent.clear()
    assert loop.run_once().sent_aggregations == [job_id]
    assert sent == [("secateurs.aggregate_trials", job_id, "secateurs")]


def test_queued_trials_come_in_the_send_order_asked(sessions: sessionmaker[Session]) -> None:
    job_id, ids = _fanned_job(sessions, n=4)
    with session_scope(sessions) as s:
        assert trials.queued_trials(s, job_id, first=[3, 1]) == [ids[3], ids[1], ids[0], ids[2]]
        assert trials.queued_trials(s, job_id, first=[3, 0, 1, 2]) == [ids[3], ids[0], ids[1], ids[2]]
        assert trials.queued_trials(s, job_id) == ids
    _claim(sessions, ids[3])  # running now: no longer queued, whatever the order
    with session_scope(sessions) as s:
        assert trials.queued_trials(s, job_id, first=[3, 2]) == [ids[2], ids[0], ids[1]]
