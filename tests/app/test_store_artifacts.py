"""jobs.artifacts on SQLite AND PostgreSQL: the recorded file list round-trips, and init_db adds the column to
a database created before it existed (old jobs then list their one zip)."""

from __future__ import annotations

from sqlalchemy import Engine, inspect
from sqlalchemy.orm import Session, sessionmaker

from app import job_files
from app.store import repo
from app.store.db import init_db, session_scope
from app.store.tables import JobRecord

FILES = [
    job_files.entry("saved_model", "pruned.zip", 1234, "a" * 64),
    job_files.entry("tflite_int8", "artifacts/tflite_int8.tflite", 99, "b" * 64),
]


def _finished_job(sessions: sessionmaker[Session], **finish: object) -> str:
    with session_scope(sessions) as session:
        job_id = repo.new_id("job")
        repo.add(
            session,
            JobRecord(
                id=job_id,
                model_id="mdl_x",
                spec={"target_sparsity": 0.5},
                status="queued",
                progress=0.0,
                attempts=0,
                cancel_requested=False,
            ),
        )
    with session_scope(sessions) as session:
        assert repo.claim_job(session, job_id, lease_seconds=60, max_attempts=3).claimed
        assert repo.finish_job(
            session, job_id, "succeeded", artifact_sha256="a" * 64, artifact_bytes=1234, **finish
        )  # type: ignore[arg-type]
    return job_id


def test_the_file_list_round_trips(store_sessions: sessionmaker[Session]) -> None:
    job_id = _finished_job(store_sessions, artifacts=FILES)
    with session_scope(store_sessions) as session:
        record = session.get(JobRecord, job_id)
        assert record is not None
        assert record.artifacts == FILES
        assert job_files.find_file(record, "tflite_int8") == FILES[1]
        assert job_files.find_file(record, "tflite_float16") is None


def test_init_db_adds_the_column_to_an_older_database(store_sessions: sessionmaker[Session]) -> None:
    engine: Engine = store_sessions.kw["bind"]
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN artifacts")
    assert "artifacts" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    init_db(engine)
    assert "artifacts" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    job_id = _finished_job(store_sessions)  # recorded without a list, as before
    with session_scope(store_sessions) as session:
        record = session.get(JobRecord, job_id)
        assert record is not None and record.artifacts is None
        assert job_files.job_files(record) == [job_files.entry("saved_model", "pruned.zip", 1234, "a" * 64)]
