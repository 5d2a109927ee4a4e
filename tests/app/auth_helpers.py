"""Shared by the auth, idempotency and header tests: databases on both engines, bearer headers, a worker's part."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, delete

from app.db import jobs
from app.db.engine import init_db, make_engine, session_scope
from app.db.tables import Base
from tests.app.helpers import sha256

ARTIFACT = b"PK\x03\x04" + bytes(range(256)) * 64
ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite in tmp_path, or the session's PostgreSQL database emptied first (it is shared by all tests)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
        return
    url: str = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    try:
        init_db(engine)
        empty(engine)
    finally:
        engine.dispose()
    yield url


def empty(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(delete(table))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def succeed(
    app: FastAPI, job_id: str, artifact: bytes = ARTIFACT, metrics: dict[str, Any] | None = None
) -> Path:
    """A worker's part of a good run: claim, write the outputs, then finish the record."""
    with session_scope(app.state.session_factory) as session:
        assert jobs.claim_job(session, job_id, lease_seconds=600, max_attempts=3).claimed
    job_dir: Path = app.state.storage.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "pruned.zip").write_bytes(artifact)
    (job_dir / "metrics.json").write_text(json.dumps(metrics or {"job_id": job_id}))
    with session_scope(app.state.session_factory) as session:
        assert jobs.finish_job(
            session, job_id, "succeeded", artifact_sha256=sha256(artifact), artifact_bytes=len(artifact)
        )
    return job_dir
