"""Service under load: ``GET /v1/jobs/{id}`` latency with 50 and 200 concurrent clients, and a 1 GiB upload.

``python -m bench.service_load [--smoke] [--out FILE.md]`` prints a markdown section; ``run(smoke)`` returns it
(for bench/run.py). ``--smoke``: 5 clients, ~2 s per phase, a 20 MiB upload (CI: proves it still runs).

SERVER: a real ``secateurs serve`` (embedded default: SQLite + file queue + one worker child) in a fresh data
directory on a free loopback port, with one API key (``secateurs keys create``), so every request is
authenticated as in production. A real job is made through the API: a tiny ``tf.Module`` MLP from
tests/support/model_factory is uploaded, validated by the worker and pruned one-shot; the load starts once the job
succeeded, so the worker child is idle. The polled job is that finished job (no webhook).

CLIENTS: a separate process per phase (``--loadgen``), so the client's CPU is not the server's; but both share
the machine's 2 cores (and so does anything else running: the "rest of machine" column is the machine's busy
CPU minus server, worker and load generator). Each client is one keep-alive HTTP/1.1 connection speaking raw
asyncio streams on uvloop: 0.07 ms of client CPU per request here, where an httpx AsyncClient took 2.4 ms and
would have starved the server of CPU. Every answer is checked (200 and the job's id; anything else counts as an
error). Latency: from writing the request to reading the body's last byte. All clients connect and make one
unmeasured request first. Each phase is bounded in time and in request count. Client models:

- closed loop: each client sends its next request as soon as the previous one answered. This measures
  saturation: throughput is the server's ceiling here and latency is mostly queueing (~clients / throughput).
- paced: each client sleeps ``interval`` x U(0.8, 1.2) after each answer (first requests spread at random over
  one interval). 1 s is app.client's fastest poll (it then backs off x1.5 up to 10 s); 0.5 s is twice that.
- floor: ``GET /healthz`` (no key, no database), closed loop: what the framework alone costs on this machine.

UPLOAD: a valid ``.npz`` of ~1 GiB (float32 ``x`` [n, 64], int64 ``y`` [n]) is written to disk in chunks (zip,
stored) and sent as a streamed multipart body with an exact Content-Length (httpx, a generator reading 1 MiB at
a time), so neither side holds it in memory. The server streams it to disk, then reads it all back to check it
(NaN/inf scan) before answering 201. The API process's VmRSS is sampled at 20 Hz from 1 s before the upload to
1 s after the answer; VmHWM (the kernel's exact peak) catches a spike between samples: growth = the higher of
both peaks - the baseline. The dataset is deleted through the API and the file removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import (
    OUT_DIR,
    Api,
    BenchError,
    Server,
    machine,
    md_table,
    subprocess_env,
    versions,
)
from tests.support.model_cache import cached_model

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Explicit layer scope, as when the load numbers in bench/RESULTS.md were measured (the `fast` preset a job
# without train data gets now ranks globally); the jobs are background load, not what is measured.
JOB_SPEC: dict[str, Any] = {
    "target_sparsity": 0.5,
    "criterion": "magnitude",
    "scope": "layer",
    "schedule": {"kind": "one_shot"},
}
GOAL_P99_MS = 20.0
GOAL_RSS_GROWTH_MB = 50.0

# The model is built in a subprocess, so this process never imports TensorFlow. argv: out_zip.
BUILD_MODEL = r"""
import sys, tempfile
from pathlib import Path
from tests.support.model_factory import build_tf_module, zip_saved_model
with tempfile.TemporaryDirectory() as tmp:
    zip_saved_model(build_tf_module(Path(tmp) / "sm", steps=20, hidden=16), Path(sys.argv[1]))
"""


@dataclass(frozen=True)
class Plan:
    """What one run does; ``FULL`` by hand, ``SMOKE`` in CI (seconds, numbers mean nothing)."""

    clients: tuple[int, ...]
    closed_s: float
    paced_s: float
    intervals_s: tuple[float, ...]
    floor_s: float
    max_requests: int
    upload_bytes: int


FULL = Plan(
    clients=(50, 200),
    closed_s=20.0,
    paced_s=30.0,
    intervals_s=(1.0, 0.5),
    floor_s=10.0,
    max_requests=200_000,
    upload_bytes=GiB,
)
SMOKE = Plan(
    clients=(5,),
    closed_s=2.0,
    paced_s=2.0,
    intervals_s=(0.5,),
    floor_s=1.0,
    max_requests=5_000,
    upload_bytes=20 * MiB,
)


# -- /proc ---------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of the full line)


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, summed over its CPUs, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, steal / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` value in KiB (VmRSS: resident now; VmHWM: peak resident so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


# -- the load generator (runs in its own process) --------------------------------------------------------------


class BadAnswer(BenchError):
    """A complete response that is not 200 with the job (e.g. a 500): counted as an error, not a latency."""


class _Conn:
    """One keep-alive HTTP/1.1 connection sending the same GET; raw streams to keep client CPU negligible."""

    def __init__(self, host: str, port: int, request: bytes, expect: str) -> None:
        self.host, self.port, self.request = host, port, request
        self.marker = expect.encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def get(self) -> int:
        """Send the request, read the whole response; returns latency in ns. Raises on a bad answer."""
        assert self.reader is not None and self.writer is not None
        start = time.perf_counter_ns()
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = -1
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length < 0:
            raise BenchError(f"response without Content-Length: {head[:200]!r}")
        body = await self.reader.readexactly(length)
        elapsed = time.perf_counter_ns() - start
        if not head.startswith(b"HTTP/1.1 200 ") or self.marker not in body:  # read in full: still usable
            status = head.split(b"\r\n", 1)[0].decode(errors="replace")
            raise BadAnswer(f"{status}: {body[:200]!r}")
        return elapsed

    async def reconnect(self) -> None:
        self.close()
        await self.connect()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _loadgen(cfg: dict[str, Any]) -> dict[str, Any]:
    """Connect, warm up, say ``ready``, wait for ``go``, run the phase, say ``done``; returns the samples."""
    request = (
        f"GET {cfg['path']} HTTP/1.1\r\nHost: {cfg['host']}:{cfg['port']}\r\n"
        f"Authorization: Bearer {cfg['api_key']}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    conns = [_Conn(cfg["host"], cfg["port"], request, cfg["expect"]) for _ in range(cfg["clients"])]
    for conn in conns:  # one by one: a burst of 200 SYNs is not what this measures
        await conn.connect()
    warmup = await asyncio.gather(*(c.get() for c in conns), return_exceptions=True)  # not measured
    warmup_errors = [f"{type(r).__name__}: {r}"[:300] for r in warmup if isinstance(r, BaseException)]
    for conn, outcome in zip(conns, warmup, strict=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, BadAnswer):
            await conn.reconnect()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
        raise BenchError("the driver did not say go")

    latencies: list[int] = []
    # when each measured request was sent, ms into the phase: are the slowest spread out, or one pause?
    sent_ms: list[int] = []
    errors: list[str] = []
    budget = [cfg["max_requests"]]
    rng = random.Random(cfg.get("seed", 0))
    interval = cfg.get("interval_s")
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    deadline = start + cfg["duration_s"]

    async def client(conn: _Conn) -> None:
        if interval:  # spread the clients' phases over the first interval
            await asyncio.sleep(rng.uniform(0, interval))
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            try:
                sent = time.monotonic()
                latencies.append(await conn.get())
                sent_ms.append(round((sent - start) * 1000))
            except BadAnswer as exc:
                errors.append(str(exc)[:300])
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, BenchError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                await conn.reconnect()  # as a client would; if this fails too, the phase fails
            if interval:
                await asyncio.sleep(interval * rng.uniform(0.8, 1.2))

    await asyncio.gather(*(client(c) for c in conns))
    elapsed = time.monotonic() - start
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    print("done", flush=True)
    for conn in conns:
        conn.close()
    return {
        "latencies_ns": latencies,
        "sent_ms": sent_ms,
        "errors": errors,
        "warmup_errors": warmup_errors,
        "elapsed_s": elapsed,
        "client_cpu_s": (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
    }


def loadgen_main(cfg: dict[str, Any]) -> int:
    """Entry point of the load generator process: the samples go to stdout as one JSON line after ``done``."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio is fine, only a little more client CPU
        pass
    result = asyncio.run(_loadgen(cfg))
    print(json.dumps(result), flush=True)
    return 0


# -- the driver ---------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every reported value is one that was measured)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def run_phase(
    server: Server,
    path: str,
    expect: str,
    api_key: str,
    clients: int,
    duration_s: float,
    max_requests: int,
    interval_s: float | None,
) -> dict[str, Any]:
    """One load phase in a fresh load-generator process; server CPU is read at ``go`` and at ``done``."""
    assert server.process is not None
    cfg = {
        "host": "127.0.0.1",
        "port": server.port,
        "path": path,
        "expect": expect,
        "api_key": api_key,
        "clients": clients,
        "duration_s": duration_s,
        "max_requests": max_requests,
        "interval_s": interval_s,
        "seed": clients,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.service_load", "--loadgen", json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise BenchError(f"load generator failed to start: {proc.stderr.read() if proc.stderr else ''}")
        api_pid = server.process.pid
        workers = server.worker_pids()
        api_cpu0 = cpu_seconds(api_pid)
        worker_cpu0 = sum(cpu_seconds(p) for p in workers)
        busy0, steal0 = machine_cpu_seconds()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != "done":
            raise BenchError(f"load generator failed: {proc.stderr.read() if proc.stderr else ''}")
        api_cpu = cpu_seconds(api_pid) - api_cpu0
        worker_cpu = sum(cpu_seconds(p) for p in workers) - worker_cpu0
        busy1, steal1 = machine_cpu_seconds()
        load1 = float(Path("/proc/loadavg").read_text().split()[0])
        result = json.loads(proc.stdout.readline())
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lat_ms = sorted(ns / 1e6 for ns in result["latencies_ns"])
    elapsed = result["elapsed_s"]
    if not lat_ms:
        raise BenchError(f"no successful request with {clients} clients: {result['errors'][:3]}")
    # Few windows = the slowest 1% came in a few bursts (server-wide pauses), many = steady queueing.
    slowest = sorted(zip(result["latencies_ns"], result["sent_ms"], strict=True))[
        -max(1, len(lat_ms) // 100) :
    ]
    tail_windows = len({sent // 250 for _, sent in slowest})
    return {
        "path": path,
        "model": "paced" if interval_s else "closed",
        "clients": clients,
        "interval_s": interval_s,
        "requests": len(lat_ms),
        "errors": len(result["errors"]),
        "error_samples": result["errors"][:3],
        "warmup_errors": len(result["warmup_errors"]),
        "elapsed_s": elapsed,
        "rps": len(lat_ms) / elapsed,
        "p50_ms": percentile(lat_ms, 50),
        "p95_ms": percentile(lat_ms, 95),
        "p99_ms": percentile(lat_ms, 99),
        "max_ms": lat_ms[-1],
        "mean_ms": sum(lat_ms) / len(lat_ms),
        "slowest_1pct_in_250ms_windows": tail_windows,
        "windows_250ms": max(1, round(elapsed * 4)),
        "api_cpu_pct": 100.0 * api_cpu / elapsed,
        "worker_cpu_pct": 100.0 * worker_cpu / elapsed,
        "client_cpu_pct": 100.0 * result["client_cpu_s"] / elapsed,
        "api_cpu_ms_per_request": 1000.0 * api_cpu / len(lat_ms),
        # everything else running on the machine meanwhile (other programs): the noise this phase had
        "other_cpu_pct": 100.0
        * max(0.0, busy1 - busy0 - api_cpu - worker_cpu - result["client_cpu_s"])
        / elapsed,
        "steal_pct": 100.0 * (steal1 - steal0) / elapsed,
        "loadavg_1min": load1,
        "api_rss_mb": status_kib(api_pid, "VmRSS") / 1024.0,
    }


# -- the upload -----------------------------------------------------------------------------------------------


def write_big_npz(path: Path, target_bytes: int, chunk_rows: int = 16384) -> dict[str, Any]:
    """A valid .npz of about ``target_bytes`` (x float32 [n, 64], y int64 [n]), written chunk by chunk."""
    features = 64
    n = max(1, target_bytes // (features * 4 + 8))
    rng = np.random.default_rng(0)
    block = rng.random(
        (chunk_rows, features), dtype=np.float32
    )  # repeated: content does not matter, finiteness does
    labels = rng.integers(0, 10, chunk_rows, dtype=np.int64)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, dtype, shape, chunk in (("x", "<f4", (n, features), block), ("y", "<i8", (n,), labels)):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_2_0(
                    out, {"descr": dtype, "fortran_order": False, "shape": shape}
                )
                left = n
                while left:
                    rows = min(left, chunk_rows)
                    out.write(chunk[:rows].tobytes())
                    left -= rows
    return {"rows": n, "bytes": path.stat().st_size}


class RssSampler:
    """VmRSS of one process every ``period`` seconds in a thread, with monotonic timestamps."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), status_kib(self.pid, "VmRSS")))
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_upload(server: Server, api_key: str, size: int, work: Path) -> dict[str, Any]:
    """Write the .npz, stream it up while sampling the API's RSS, delete it again (file and dataset)."""
    assert server.process is not None
    pid = server.process.pid
    path = work / "big.npz"
    tick = time.monotonic()
    made = write_big_npz(path, size)
    write_s = time.monotonic() - tick
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    sent_at: list[float] = []

    def body() -> Iterator[bytes]:
        yield head
        with path.open("rb") as fh:
            while chunk := fh.read(MiB):
                yield chunk
        yield tail
        sent_at.append(time.monotonic())

    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + made["bytes"] + len(tail)),
    }
    try:
        time.sleep(1.0)  # let the API settle after the load phases
        hwm_before = status_kib(pid, "VmHWM")
        with RssSampler(pid) as sampler:
            time.sleep(1.0)  # baseline samples
            started = time.monotonic()
            with httpx.Client(base_url=server.base_url, timeout=1800) as http:
                response = http.post("/v1/datasets", content=body(), headers=headers)
            answered = time.monotonic()
            time.sleep(1.0)  # what it keeps after answering
        hwm_after = status_kib(pid, "VmHWM")
        if response.status_code != 201:
            raise BenchError(f"upload -> {response.status_code}: {response.text[:1000]}")
        dataset = response.json()
        if dataset["n_samples"] != made["rows"] or dataset["size_bytes"] != made["bytes"]:
            raise BenchError(f"the server describes another file: {dataset}")
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            auth = {"Authorization": headers["Authorization"]}
            if http.delete(f"/v1/datasets/{dataset['id']}", headers=auth).status_code != 204:
                raise BenchError("could not delete the uploaded dataset")
    finally:
        path.unlink(missing_ok=True)
    baseline = [kib for t, kib in sampler.samples if t < started]
    during = [kib for t, kib in sampler.samples if started <= t <= answered]
    after = [kib for t, kib in sampler.samples if t > answered]
    if not (baseline and during and after and sent_at):
        raise BenchError("too few RSS samples around the upload")
    base_mb = sorted(baseline)[len(baseline) // 2] / 1024.0
    sampled_peak_mb = max(during + after) / 1024.0
    # A spike shorter than the sampling period shows only in VmHWM: if it rose, it rose during the upload.
    peak_mb = max(sampled_peak_mb, hwm_after / 1024.0 if hwm_after > hwm_before else 0.0)
    send_s = sent_at[0] - started
    total_s = answered - started
    return {
        "bytes": made["bytes"],
        "rows": made["rows"],
        "client_write_s": write_s,
        "send_s": send_s,
        "total_s": total_s,
        "send_mb_s": made["bytes"] / MiB / send_s,
        "total_mb_s": made["bytes"] / MiB / total_s,
        "rss_baseline_mb": base_mb,
        "rss_sampled_peak_mb": sampled_peak_mb,
        "rss_peak_mb": peak_mb,
        "rss_growth_mb": peak_mb - base_mb,
        "rss_after_mb": after[-1] / 1024.0,
        "hwm_before_mb": hwm_before / 1024.0,
        "hwm_after_mb": hwm_after / 1024.0,
        "samples": len(sampler.samples),
    }


# -- the whole run ------------------------------------------------------------------------------------------


def tiny_mlp_zip(root: Path) -> dict[str, Any]:
    """A ``cached_model`` builder: the tiny model's zip, built in a subprocess (this process never imports
    TensorFlow)."""
    done = subprocess.run(
        [sys.executable, "-c", BUILD_MODEL, str(root / "model.zip")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"building the model failed:\n{done.stderr[-3000:]}")
    return {"zip_bytes": (root / "model.zip").stat().st_size}


def build_model(cache_dir: Path) -> Path:
    """The tiny model zip, built once and cached."""
    root, _ = cached_model(tiny_mlp_zip, cache_dir=cache_dir)
    return root / "model.zip"


def create_api_key(data_dir: Path) -> str:
    """``secateurs keys create`` on the server's data directory, before it starts (auth then required)."""
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "bench", "--json"],
        env=subprocess_env(SECATEURS_DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"keys create failed: {done.stderr[-2000:]}")
    return str(json.loads(done.stdout)["key"])


def run_service_load(
    smoke: bool = False, cache_dir: Path | None = None, work_dir: Path | None = None, plan: Plan | None = None
) -> dict[str, Any]:
    """Start the server, make a job, run the load phases and the upload; returns results and ``markdown``."""
    plan = plan or (SMOKE if smoke else FULL)
    model_zip = build_model(cache_dir or OUT_DIR / "cache")
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="secateurs-load-")) if work_dir is None else work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        server = Server(work / "server")
        server.data_dir.mkdir(parents=True, exist_ok=True)
        api_key = create_api_key(server.data_dir)
        with server, Api(server.base_url) as api:
            api.http.headers["Authorization"] = f"Bearer {api_key}"
            model = api.wait_model(api.upload("/v1/models", model_zip, name="load-bench")["id"])
            job, submitted = api.submit_job({"model_id": model["id"], "spec": JOB_SPEC})
            api.wait_job(job["id"], submitted)
            poll = (f"/v1/jobs/{job['id']}", f'"id":"{job["id"]}"')
            runs: list[tuple[tuple[str, str], int, float | None, float]] = [
                (("/healthz", '"status":"ok"'), plan.clients[0], None, plan.floor_s)
            ]
            for clients in plan.clients:
                runs.append((poll, clients, None, plan.closed_s))
                runs += [(poll, clients, interval, plan.paced_s) for interval in plan.intervals_s]
            phases = []
            for (path, expect), clients, interval, duration in runs:
                how = f"paced {interval:g} s" if interval else "closed loop"
                print(f"[service_load] {path}: {clients} clients, {how}", file=sys.stderr, flush=True)
                phases.append(
                    run_phase(server, path, expect, api_key, clients, duration, plan.max_requests, interval)
                )
            print(f"[service_load] upload {plan.upload_bytes / MiB:.0f} MiB", file=sys.stderr, flush=True)
            upload = run_upload(server, api_key, plan.upload_bytes, work)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "smoke": smoke,
        "plan": plan.__dict__,
        "job_id": job["id"],
        "phases": phases,
        "upload": upload,
        "machine": machine(),
        "versions": {**versions(), **_service_versions()},
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    result["markdown"] = render(result)
    return result


def run(smoke: bool) -> str:
    """The markdown section (for bench/run.py)."""
    return str(run_service_load(smoke=smoke)["markdown"])


def _service_versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for name in ("fastapi", "starlette", "uvicorn", "sqlalchemy", "pydantic", "httptools", "uvloop"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# -- report ---------------------------------------------------------------------------------------------------


def _phase_row(p: dict[str, Any]) -> list[object]:
    what = "`GET /healthz` (floor)" if p["path"] == "/healthz" else "`GET /v1/jobs/{id}`"
    model = "closed loop" if p["model"] == "closed" else f"paced {p['interval_s']:g} s"
    return [
        what,
        p["clients"],
        model,
        f"{p['requests']:,}",
        p["errors"],
        f"{p['rps']:.0f}",
        f"{p['p50_ms']:.1f}",
        f"{p['p95_ms']:.1f}",
        f"{p['p99_ms']:.1f}",
        f"{p['max_ms']:.1f}",
        f"{p['api_cpu_pct']:.0f}%",
        f"{p['api_cpu_ms_per_request']:.2f}",
        f"{p['client_cpu_pct']:.0f}%",
        f"{p['other_cpu_pct']:.0f}% (load {p['loadavg_1min']:.1f})",
    ]


def render(result: dict[str, Any]) -> str:
    """The markdown section: method in one paragraph, the latency table, the upload table, the goals."""
    plan, up, facts, ver = result["plan"], result["upload"], result["machine"], result["versions"]
    title = "### Status polls under load, 1 GiB upload"  # bench/run.py puts it under its own ## heading
    if result["smoke"]:
        title = "### Service load (SMOKE: tiny stand-in, numbers mean nothing)"
    headers = [
        "request",
        "clients",
        "client model",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "API CPU",
        "API CPU ms/req",
        "load-gen CPU",
        "rest of machine CPU",
    ]
    lines = [
        title,
        "",
        f"Date: {result['date']}. Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['ram']} RAM, "
        f"{facts['os']}; the server and the load generator share it (and so does whatever else runs: last "
        f"column). Versions: Python {ver['python']}, secateurs {ver['secateurs']}, FastAPI {ver['fastapi']}, "
        f"Starlette {ver['starlette']}, uvicorn {ver['uvicorn']} (httptools {ver['httptools']}, uvloop "
        f"{ver['uvloop']}), SQLAlchemy {ver['sqlalchemy']}, pydantic {ver['pydantic']}.",
        "",
        "`GET /v1/jobs/{id}` of a finished job, with an API key, against `secateurs serve` (embedded: SQLite, "
        "its worker child idle), one keep-alive connection per client, from a separate load-generator process "
        "(raw HTTP/1.1 on uvloop; every answer checked). **Closed loop**: next request as soon as the answer "
        "arrives: measures saturation, so its latency is mostly queueing. **Paced**: each client sleeps the "
        "interval x U(0.8, 1.2) after each answer; app.client polls every 1 s at the fastest (then x1.5 up to "
        f"10 s), 0.5 s is twice that. Bounded: closed {plan['closed_s']:g} s, paced {plan['paced_s']:g} s, "
        f"at most {plan['max_requests']:,} requests per phase. `GET /healthz` (no key, no database) is the "
        "framework's floor on this machine. CPU columns are % of one core over the phase (the API is one "
        "process: ~100% is its ceiling).",
        "",
        md_table(headers, [_phase_row(p) for p in result["phases"]]),
        f"Upload: a valid `.npz` of {up['bytes'] / MiB:,.0f} MiB ({up['rows']:,} rows), streamed as multipart "
        "with Content-Length from a file; the server answers 201 after writing it to disk (fsync) and reading "
        "it all back to check it.",
        "",
        md_table(
            ["", "value"],
            [
                ["body sent (client side)", f"{up['send_s']:.1f} s = {up['send_mb_s']:.0f} MiB/s"],
                [
                    "until 201 (incl. the server's check)",
                    f"{up['total_s']:.1f} s = {up['total_mb_s']:.0f} MiB/s",
                ],
                ["API VmRSS baseline (median of 1 s before)", f"{up['rss_baseline_mb']:.1f} MiB"],
                [
                    "API VmRSS peak (20 Hz samples, during + 1 s after)",
                    f"{up['rss_sampled_peak_mb']:.1f} MiB",
                ],
                [
                    "API VmHWM before / after (the kernel's exact peak)",
                    f"{up['hwm_before_mb']:.1f} / {up['hwm_after_mb']:.1f} MiB",
                ],
                ["**API RSS growth** (higher peak - baseline)", f"**{up['rss_growth_mb']:.1f} MiB**"],
                ["API VmRSS 1 s after the answer", f"{up['rss_after_mb']:.1f} MiB"],
            ],
        ),
    ]
    if not result["smoke"]:
        top = max(plan["clients"])
        goals = []
        for p in result["phases"]:
            if p["path"] != "/healthz" and p["model"] == "paced" and p["clients"] == top:
                verdict = "met" if p["p99_ms"] <= GOAL_P99_MS else "MISSED"
                goals.append(f"every {p['interval_s']:g} s: {p['p99_ms']:.1f} ms ({verdict})")
        growth = up["rss_growth_mb"]
        lines.append(
            f"Goals: status poll p99 <= {GOAL_P99_MS:g} ms with {top} clients polling "
            + "; ".join(goals)
            + f". 1 GiB upload grows the API's memory by <= {GOAL_RSS_GROWTH_MB:g} MB: {growth:.1f} MiB "
            f"({'met' if growth <= GOAL_RSS_GROWTH_MB else 'MISSED'}).\n"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service_load", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="5 clients, a few seconds, a 20 MB upload")
    parser.add_argument("--loadgen", metavar="JSON", help=argparse.SUPPRESS)  # the load-generator process
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown (and .json) here")
    args = parser.parse_args(argv)
    if args.loadgen:
        return loadgen_main(json.loads(args.loadgen))
    result = run_service_load(smoke=args.smoke)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(result["markdown"])
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
