"""API fixtures: a real app on SQLite with the embedded file transport (no worker consumes in these tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.engine import init_db, make_engine, make_session_factory
from app.main import create_app


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, min_free_bytes=0)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """The store on SQLite AND on PostgreSQL (one database per test session, emptied for each test)."""
    url = (
        f"sqlite:///{tmp_path / 'db.sqlite'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = make_engine(url)
    init_db(engine)
    if request.param == "postgres":
        with engine.begin() as conn:
            for table in ("webhook_messages", "jobs", "models", "datasets", "trials"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
    yield make_session_factory(engine)
    engine.dispose()
