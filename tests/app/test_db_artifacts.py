"""jobs.artifacts on SQLite AND PostgreSQL: the recorded file list round-trips, and init_db adds the column to
a database created before it existed (old jobs then list their one zip)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, inspect
from sqlalchemy.orm import Session, sessionmaker

from app import job_files
from app.db import jobs, records
from app.db.engine import init_db, session_scope
from app.db.tables import JobRecord

FILES = [
    job_files.entry("saved_model", "pruned.zip", 1234, "a" * 64),
    job_files.entry("tflite_int8", "artifacts/tflite_int8.tflite", 99, "b" * 64),
]


def _finished_job(sessions: sessionmaker[Session], **finish: object) -> str:
    with session_scope(sessions) as session:
        job_id = records.new_id("job")
        records.add(
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
        assert jobs.claim_job(session, job_id, lease_seconds=60, max_attempts=3).claimed
        assert jobs.finish_job(
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


def test_entries_refuse_names_and_paths_that_could_escape() -> None:
    for name in ("", "../x", "Tflite", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="artifact name"):
            job_files.entry(name, "pruned.zip", 1, "a" * 64)
    for file in ("/etc/passwd", "../other-job/pruned.zip", "artifacts/../../x"):
        with pytest.raises(ValueError, match="relative path"):
            job_files.entry("saved_model", file, 1, "a" * 64)
    assert job_files.entry("sparsity-0.80", "artifacts/sparsity-0.80.zip", 1, "c" * 64)["media_type"] == (
        "application/zip"
    )
    tflite = job_files.entry("tflite_int8", "artifacts/tflite_int8.tflite", 1, "d" * 64)
    assert job_files.download_filename("job_1", tflite) == "job_1-tflite_int8.tflite"
    assert job_files.download_filename("job_1", FILES[0]) == "job_1-pruned.zip"
