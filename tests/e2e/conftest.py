"""Real processes: `secateurs serve` (uvicorn) and `secateurs worker` (celery), talking over HTTP and Redis.

The fixtures that start them; the plain helpers (Service, free_port, base_env, wait_ready, poll) are in
tests/support/procs.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.procs import Service


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(args: list[str], env: dict[str, str], name: str) -> Service:
        service = Service([sys.executable, "-m", "app.cli", *args], env, tmp_path / f"{name}.log")
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        service.stop()

