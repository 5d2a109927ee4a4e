"""Shared fixtures. Redis/PostgreSQL tests skip locally when the server is absent, but FAIL under CI=true:
CI must never go green by skipping them.

The suite runs under pytest-xdist (``make test``: one worker per core). Each xdist worker gets its own Redis
databases (``redis_url`` hands a fresh, flushed one to each test that asks) and one TensorFlow thread pool per
process, so two workers do not fight over two cores; built models are cached on disk for every worker and run
(``tests/support/model_cache.py``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.model_cache import CACHE_ENV
from tests.support.procs import Service, base_env, free_port, wait_ready

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_BASE = os.environ.get("SECATEURS_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
# Redis's 16 databases, less 0 (a developer's own) and 12 (bench/storage.py's broker).
REDIS_DATABASES = tuple(n for n in range(1, 16) if n != 12)
PG_ADMIN_DSN = os.environ.get("SECATEURS_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def xdist_worker() -> tuple[int, int]:
    """(this worker's index, the number of workers); (0, 1) without xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name.removeprefix("gw") or 0), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config: pytest.Config) -> None:
    # Processes started by tests (servers, workers) inherit these too.
    if CACHE_ENV not in os.environ and getattr(config, "cache", None) is not None:
        os.environ[CACHE_ENV] = str(config.cache.mkdir("secateurs-models"))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _, workers = xdist_worker()
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
            os.environ.setdefault(name, threads)
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")


# The longest test modules, longest first (``--durations`` of a cold-cache `make test`, 2026-12-08: 150 s down to
# 33 s of one worker each). xdist's loadscope hands a module to whichever worker is free in queue order, and its
# default order (most tests first) left these few-test, minute-long modules for the end: one worker busy for
# minutes while the other sat idle. Started first (`--no-loadscope-reorder` in the Makefile keeps this order),
# the many short modules fill in around them. A module not listed keeps its collection order, after these.
SLOW_FIRST = (
    "tests/faults/test_crashes.py",
    "tests/bench/test_bench_smoke.py",
    "tests/worker/test_budget_pipeline.py",
    "tests/e2e/test_trials.py",
    "tests/faults/test_fuzz_openapi.py",
    "tests/worker/test_engine_pipeline.py",
    "tests/worker/test_streamed_pipeline.py",
    "tests/storage/test_e2e_s3.py",
    "tests/worker/test_pipeline_evaluation.py",
    "tests/worker/structure/test_coverage.py",
    "tests/examples/test_examples.py",
    "tests/bench/test_service_load_smoke.py",
    "tests/worker/export/test_convert.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(SLOW_FIRST)))  # stable


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


_redis_turn = 0


@pytest.fixture
def redis_url() -> str:
    """A Redis database no other xdist worker uses, flushed for this test (the worker's databases rotate)."""
    global _redis_turn
    _need("Redis", "127.0.0.1", 6379)
    import redis

    index, workers = xdist_worker()
    mine = REDIS_DATABASES[index::workers] or REDIS_DATABASES[-1:]
    url = f"{REDIS_BASE}/{mine[_redis_turn % len(mine)]}"
    _redis_turn += 1
    redis.Redis.from_url(url).flushdb()
    return url


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


@dataclass(frozen=True)
class Embedded:
    url: str
    service: Service
    data_dir: Path
    refs: Path  # the file:// root the server's SECATEURS_DATASET_SOURCES allows (datasets by reference)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    """One `secateurs serve` (embedded default: API + worker child) per session (per xdist worker), for every
    test that needs "a server" and nothing special of it: TensorFlow starts once. Tests share its database, so
    they use the ids they created, never "the only job"."""
    root = tmp_path_factory.mktemp("embedded")
    refs = root / "refs"
    refs.mkdir()
    env = base_env(root / "data")
    env["SECATEURS_DATASET_SOURCES"] = json.dumps({"*": [f"file://{refs}/"]})
    port = free_port()
    service = Service(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env, root / "serve.log"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, [service])
        yield Embedded(url=url, service=service, data_dir=root / "data", refs=refs)
    finally:
        service.stop()


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """``start(args, env, name)``: a ``python -m app.cli ARGS`` process (logs in tmp_path), stopped at teardown."""
    started: list[Service] = []

    def start(args: list[str], env: dict[str, str], name: str) -> Service:
        service = Service([sys.executable, "-m", "app.cli", *args], env, tmp_path / f"{name}.log")
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        service.stop()

