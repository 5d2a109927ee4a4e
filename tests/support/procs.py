"""Real processes for tests and benchmarks: `python -m app.cli ...` services with their logs, free ports, the
environment they start with, waiting for them, and their process trees read from ``/proc`` (Linux, no psutil).

Plain helpers (no fixtures), so bench/ can use them without importing a conftest; the fixtures that start
services for a test are in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """A child process with its log file, stopped (SIGTERM, then SIGKILL) at teardown."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def wait_ready(base_url: str, services: list[Service], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in services:
            if service.process.poll() is not None:
                pytest.fail(f"a service exited early ({service.process.returncode}):\n{service.tail()}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail("service not ready in time:\n" + "\n---\n".join(s.tail() for s in services))


def poll(
    fetch: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body = fetch()
    while not done(body):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting; last body: {body}")
        time.sleep(0.5)
        body = fetch()
    return body


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(
        {"SECATEURS_DATA_DIR": str(data_dir), "SECATEURS_MIN_FREE_BYTES": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    )
    env.update(extra)
    return env


# --- process trees ------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads' children)."""
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in Path(path).read_text().split()]
    return found


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def celery_child(supervisor_pid: int) -> int | None:
    """The live `celery ... worker` child of a supervisor (`secateurs worker`, or `serve` in embedded mode)."""
    for pid in children(supervisor_pid):
        args = cmdline(pid)
        if "celery" in args and "worker" in args and alive(pid):
            return pid
    return None
