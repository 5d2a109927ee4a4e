"""Fixtures for the fault tests: the app in-process with the corpus limits, and a real `secateurs serve`.

The real server is the embedded default (API + one worker child on the file broker, SQLite, a data directory),
started with the limits in ``corpus.LIMITS`` so that bombs trip them with test-sized data.

The crash and outage tests (test_crashes.py, test_outages.py) get their processes from ``processes``, a tiny
model from ``tiny_files``, a test-own Redis (``redis_server``), a throwaway database on the machine's
PostgreSQL (``pg_database``) and a test-own PostgreSQL cluster (``pg_cluster``). Like tests/conftest.py, a
missing server or binary skips locally and FAILS under CI=true.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import IN_CI, PG_ADMIN_DSN, _need
from tests.faults import corpus
from tests.faults.procs import PostgresCluster, Processes, RedisServer, postgres_bin, throwaway_database
from tests.support import model_factory
from tests.support.procs import Service, base_env, free_port


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """schemathesis 4.32 on pytest 9.2 gives every operation's item of one test the same node id (its NodeId has
    no params): pytest-xdist then runs one operation per test and silently drops the rest. The operation label
    is in the item's name; put it in the node id, so every item is addressable and runs."""
    for item in items:
        node_id = getattr(item, "_id", None)
        if node_id is not None and "[" in item.name and "[" not in item.nodeid:
            label = item.name[item.name.index("[") + 1 : -1]
            item._id = dataclasses.replace(node_id, params=label)


@pytest.fixture
def corpus_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, min_free_bytes=0, **corpus.LIMITS)


@pytest.fixture
def corpus_client(corpus_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(corpus_settings)) as client:
        yield client


@dataclass
class Server:
    """A running `secateurs serve` (embedded default): its URL, data directory and process."""

    url: str
    data_dir: Path
    service: Service

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def worker_pids(self) -> list[int]:
        """The embedded worker: children of the serve process running `celery ... worker`."""
        parent = self.service.process.pid
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        pids = []
        for pid in children:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"celery" in cmdline and b"worker" in cmdline:
                pids.append(int(pid))
        return pids


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Started at once; the caller waits for it with ``wait_ready`` (it boots while models are built)."""
    root = tmp_path_factory.mktemp("faults-server")
    limits = {f"SECATEURS_{key.upper()}": str(int(value)) for key, value in corpus.LIMITS.items()}
    port = free_port()
    service = Service(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        base_env(root / "data", **limits),
        root / "serve.log",
    )
    try:
        yield Server(f"http://127.0.0.1:{port}", root / "data", service)
    finally:
        service.stop()


# --- crash and outage tests ---------------------------------------------------------------------------------


def _need_binary(name: str, found: object) -> None:
    if found:
        return
    message = f"{name} is not installed"
    if IN_CI:
        pytest.fail(f"{message}; CI must run these tests")
    pytest.skip(message)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@dataclass
class TinyFiles:
    """A plain tf.Module MLP on digits (a few KB: uploads and loads in well under a second) and its train set."""

    model: Path  # .tar.gz of the SavedModel; input "pixels" [None, 64]
    train: Path  # .npz with x.pixels and y (1347 samples)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    root = tmp_path_factory.mktemp("tiny")
    saved = model_factory.build_tf_module(root / "module", steps=60, hidden=16)  # the cached tiny MLP the client tests use
    train, _ = model_factory.digits_datasets(flat=True)
    return TinyFiles(
        model=model_factory.tar_saved_model(saved, root / "model.tar.gz"),
        train=model_factory.write_npz(root / "train.npz", {"x.pixels": train["x"], "y": train["y"]}),
    )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Services started through it are stopped at teardown (SIGTERM to their group, then SIGKILL)."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started test-own redis-server on a free port (no persistence), stopped at teardown."""
    _need_binary("redis-server", shutil.which("redis-server"))
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A throwaway database on the machine's PostgreSQL (SQLAlchemy URL), for this test alone: no other test's
    leftover 'running' job can reach this test's reaper."""
    _need("PostgreSQL", "127.0.0.1", 5432)
    with throwaway_database(PG_ADMIN_DSN) as url:
        yield url


@pytest.fixture
def pg_cluster() -> Iterator[PostgresCluster]:
    """A started test-own PostgreSQL cluster in a temp dir on a free port: the test may stop and start it."""
    bin_dir = postgres_bin()
    _need_binary("PostgreSQL's initdb / pg_ctl", bin_dir)
    if os.geteuid() == 0:  # PostgreSQL will not run as root: the cluster runs as the 'postgres' user
        _need_binary("the 'postgres' system user", _user_exists("postgres") and shutil.which("runuser"))
    assert bin_dir is not None
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
