"""Real processes for the crash and outage tests: `secateurs serve` / `secateurs worker`, a test-own Redis and a
test-own PostgreSQL cluster, each started and stopped (gracefully or with SIGKILL) by the test itself.

Process trees come from tests/support/procs.py (``/proc``, no psutil). Every wait polls a condition against a
generous deadline and fails with what it last saw; nothing asserts on durations.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.support.procs import Service, celery_child, free_port

T = TypeVar("T")
TERMINAL = ("succeeded", "failed", "canceled")
Recorder = Callable[[str, object], None]  # pytest's record_property


def report_figures(record_property: Recorder, name: str, figures: dict[str, int]) -> None:
    """One summary line on stdout (shown with -s) and in the junit report, plus one property per figure."""
    line = f"{name}: " + ", ".join(f"{key}={value}" for key, value in figures.items())
    print(f"\n[faults] {line}")
    record_property(name, line)
    for key, value in figures.items():
        record_property(f"{name}.{key}", value)


# --- waiting ------------------------------------------------------------------------------------------------


def wait_until(
    check: Callable[[], T | None],
    what: str,
    timeout: float = 180.0,
    interval: float = 0.25,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something other than None/False; fail naming ``what`` after ``timeout``
    (plus ``detail()``, e.g. a log tail, to show why)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


# --- the service's processes --------------------------------------------------------------------------------


class Processes:
    """Starts `python -m app.cli ...` services with their logs under ``log_dir``; ``stop_all`` at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Service] = []

    def start(self, args: list[str], env: dict[str, str], name: str) -> Service:
        log_path = self.log_dir / f"{name}.log"
        n = 1
        while log_path.exists():  # a restarted service keeps the earlier log
            n += 1
            log_path = self.log_dir / f"{name}-{n}.log"
        service = Service([sys.executable, "-m", "app.cli", *args], env, log_path)
        self.started.append(service)
        return service

    def serve(self, env: dict[str, str], port: int, name: str = "serve") -> Service:
        return self.start(["serve", "--port", str(port)], env, name)

    def worker(self, env: dict[str, str], name: str = "worker") -> Service:
        return self.start(["worker"], env, name)

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"--- {s.log_path.name}\n{s.tail(lines)}" for s in self.started)

    def stop_all(self, grace_s: float = 20.0) -> None:
        """SIGTERM every service's process group at once (their graceful shutdowns overlap), then SIGKILL
        whatever still runs after ``grace_s``."""
        running = [s for s in self.started if s.process.poll() is None]
        for service in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for service in running:
            try:
                service.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait()
        for service in self.started:
            service.log.close()


def kill_group(service: Service) -> None:
    """SIGKILL a service and everything it started (a crash of the machine's service, not a shutdown)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait()


def fault_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The parent's environment without SECATEURS_*, plus short fault-test timings and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(
        {
            "SECATEURS_DATA_DIR": str(data_dir),
            "SECATEURS_MIN_FREE_BYTES": "0",
            "SECATEURS_HEARTBEAT_SECONDS": "0.5",
            "SECATEURS_LEASE_SECONDS": "3",
            "SECATEURS_REAPER_INTERVAL_S": "0.5",
            "SECATEURS_RETENTION_INTERVAL_S": "0.5",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    env.update(extra)
    return env


# --- HTTP ---------------------------------------------------------------------------------------------------


class Api:
    """An httpx client on a running service, with the few calls these tests repeat."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def upload_model(self, path: Path, timeout: float = 180.0) -> str:
        """Upload and wait until the worker validated it; returns the id of the (ready) model."""
        with path.open("rb") as fh:
            response = self.http.post("/v1/models", files={"file": (path.name, fh)})
        assert response.status_code == 201, response.text
        model_id = str(response.json()["id"])
        model = wait_until(
            lambda: (
                (body := self.http.get(f"/v1/models/{model_id}").json())["status"] != "validating" and body
            ),
            f"model {model_id} to be validated",
            timeout,
        )
        assert model["status"] == "ready", model
        return model_id

    def upload_dataset(self, path: Path) -> str:
        with path.open("rb") as fh:
            response = self.http.post("/v1/datasets", files={"file": (path.name, fh)})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_job(
        self, job_id: str, done: Callable[[dict[str, Any]], bool], what: str, timeout: float = 180.0
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            nonlocal last
            last = self.job(job_id)
            return last if done(last) else None

        return wait_until(check, f"job {job_id} {what}", timeout, detail=lambda: f"last: {last}")

    def wait_ended(self, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
        return self.wait_job(job_id, lambda b: b["status"] in TERMINAL, "to end", timeout)

    def settle(self, job_ids: list[str], timeout: float = 180.0) -> dict[str, dict[str, Any]]:
        """Each job's last body once all have ended, or when ``timeout`` ran out (then some are not ended:
        the caller counts them as lost or stuck, and reports the figures before it fails)."""
        deadline = time.monotonic() + timeout
        last: dict[str, dict[str, Any]] = {}
        while True:
            for job_id in job_ids:
                if last.get(job_id, {}).get("status") not in TERMINAL:
                    last[job_id] = self.job(job_id)
            if all(body["status"] in TERMINAL for body in last.values()) or time.monotonic() > deadline:
                return last
            time.sleep(0.5)


def wait_ready(api: Api, services: list[Service], timeout: float = 120.0) -> None:
    """Until /readyz answers 200; fails at once if a service exited."""

    def check() -> bool:
        for service in services:
            if service.process.poll() is not None:
                pytest.fail(
                    f"{service.log_path.name} exited ({service.process.returncode}):\n{service.tail()}"
                )
        try:
            return api.http.get("/readyz", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(check, "/readyz to answer 200", timeout, 0.5, lambda: "\n".join(s.tail() for s in services))


# --- Redis --------------------------------------------------------------------------------------------------


class RedisServer:
    """A test-own `redis-server` that keeps nothing on disk (like this machine's): a restart loses every
    message, which is exactly the outage the reaper must repair."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = shutil.which("redis-server")
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=5)

    def start(self) -> None:
        assert self.binary is not None, "redis-server is not installed"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (self.workdir / f"redis-{self.starts}.log").open("wb")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        args += ["no", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(self._pings, f"redis-server on port {self.port}", 30, 0.1)

    def _pings(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"redis-server exited with {self.process.returncode} (port {self.port} taken?)")
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def run_id(self) -> str:
        return str(self.client().info("server")["run_id"])

    def stop(self) -> None:
        """SIGTERM (with --save "" nothing is written: every queued message is gone)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- PostgreSQL ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def throwaway_database(admin_dsn: str) -> Iterator[str]:
    """A fresh database on the server ``admin_dsn`` points at (SQLAlchemy URL yielded), dropped afterwards."""
    import psycopg

    name = f"secateurs_faults_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(admin_dsn)
    host, port, user = info.get("host", "127.0.0.1"), info.get("port", "5432"), info.get("user", "postgres")
    try:
        yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_bin() -> Path | None:
    """The directory holding initdb / pg_ctl (Debian keeps them off PATH), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb, trust auth, fsync off) on a free port, stopped and started by
    the test. PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` system user, in a
    directory outside pytest's root-only tmp tree."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="secateurs-pg-"))
        self.data = self.root / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=60, cwd=self.root, check=False
        )
        if result.returncode != 0:
            pytest.fail(
                f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )

    def init(self) -> None:
        initdb = str(self.bin_dir / "initdb")
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_ctl = str(self.bin_dir / "pg_ctl")
        self._run(
            pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        if self.running():
            with contextlib.suppress(BaseException):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# --- the production topology --------------------------------------------------------------------------------


class Stack:
    """`secateurs serve` + `secateurs worker` on Redis and PostgreSQL, with a tiny model (validated, ready)
    and its train dataset uploaded."""

    def __init__(
        self,
        processes: Processes,
        data_dir: Path,
        broker_url: str,
        database_url: str,
        model: Path,
        train: Path,
        **settings: object,
    ) -> None:
        from app.auth import create_key
        from app.config import Settings

        extra = {f"SECATEURS_{name.upper()}": str(value) for name, value in settings.items()}
        self.env = fault_env(
            data_dir,
            SECATEURS_ENVIRONMENT="production",
            SECATEURS_BROKER_URL=broker_url,
            SECATEURS_DATABASE_URL=database_url,
            **extra,
        )
        # production always requires an API key; the admin command's code path makes one
        _, key = create_key(
            Settings(
                environment="production", broker_url=broker_url, database_url=database_url, data_dir=data_dir
            ),
            "faults",
        )
        self.port = free_port()
        self.serve = processes.serve(self.env, self.port)
        self.worker = processes.worker(self.env)
        self.processes = processes
        self.api = Api(f"http://127.0.0.1:{self.port}", key)
        wait_ready(self.api, [self.serve, self.worker])
        self.model_id = self.api.upload_model(model)
        self.train_id = self.api.upload_dataset(train)

    def post_job(self, spec: dict[str, Any]) -> httpx.Response:
        body = {"model_id": self.model_id, "train_dataset_id": self.train_id, "spec": spec}
        return self.api.http.post("/v1/jobs", json=body)

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.post_job(spec)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def worker_child(self) -> int | None:
        return celery_child(self.worker.process.pid)

    def close(self) -> None:
        self.api.close()
