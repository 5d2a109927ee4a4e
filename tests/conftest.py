"""Shared fixtures. Redis/PostgreSQL tests skip locally when the server is absent, but FAIL under CI=true:
CI must never go green by skipping them."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = os.environ.get("SECATEURS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_ADMIN_DSN = os.environ.get("SECATEURS_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _need(service: str, host: str, port: int) -> None:
    if _answers(host, port):
        return
    message = f"{service} does not answer on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message}; CI must run these tests (.ci/run should have started it)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    _need("Redis", "127.0.0.1", 6379)
    return REDIS_URL


def _fresh_database() -> Iterator[str]:
    _need("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    name = f"secateurs_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    yield from _fresh_database()


@pytest.fixture
def own_postgres_url() -> Iterator[str]:
    """A fresh database for one test: no API key or job that an earlier test of the session left behind (a
    stored key turns auth on for every server on that database)."""
    yield from _fresh_database()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "var"
    path.mkdir()
    return path
