"""Fixtures for the fault tests: the app in-process with the corpus limits, and a real `secateurs serve`.

The real server is the embedded default (API + one worker child on the file broker, SQLite, a data directory),
started with the limits in ``corpus.LIMITS`` so that bombs trip them with test-sized data.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.e2e.conftest import Service, base_env, free_port
from tests.faults import corpus


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
