"""Scale-out benchmarks on a real S3 store (SeaweedFS): ``python -m bench.storage [--smoke]``.

The deployment is the no-shared-disk one: ``secateurs serve`` and each ``secateurs worker`` with its own data
directory, Redis (database 12), a fresh PostgreSQL database and a ``weed mini`` S3 server, all on loopback.

- (a) **worker scaling**: the same 20 small one-shot jobs (digits CNN, 50% magnitude, evaluated on 1,000
  samples) with 1 worker process, then with 2 (as two hosts: separate data directories and caches); jobs/min
  from the first submission to the last job's end. Both runs warm: the model is validated and cached first.
- (c) **transfer throughput**: a ~``--mib`` MiB ``.npz`` uploaded through the API (receive, check, multipart put)
  against a direct put of the same file into the bucket with obstore; an artifact of the same size downloaded
  through the API (ranged reads from the bucket, streamed to the client) against a direct obstore read. The
  API's RSS growth during the upload is sampled as in bench/service_load.py.
- (b) the ~1 B-parameter model of issue 14 has its own module and section: bench/big_model.py (``bigmodel``).

Writes the ``storage`` section of bench/RESULTS.md (``--smoke``: bench/out/RESULTS.storage-smoke.md) and
bench/out/section-storage.json. The machine is shared: compare the numbers within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    OUT_DIR,
    ROOT,
    BenchError,
    free_port,
    md_table,
    streamed_multipart,
    subprocess_env,
)
from bench.digits_quality import prepare
from bench.results import write_section
from bench.service_load import RssSampler, status_kib, write_big_npz
from tests.support.procs import Service
from tests.support.seaweed import Seaweed

MiB = 1 << 20
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BROKER = "redis://127.0.0.1:6379/12"


class Deployment:
    """API + N workers + S3 + Redis + PostgreSQL, each worker its own 'host' (data directory)."""

    def __init__(self, work: Path, workers: int, **extra: str) -> None:
        import psycopg
        import redis

        self.work = work
        self.store = Seaweed(work / "s3").start()
        redis.Redis.from_url(BROKER).flushdb()
        self.db = f"secateurs_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        shared = {
            "SECATEURS_BROKER_URL": BROKER,
            "SECATEURS_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db}",
            "SECATEURS_MIN_FREE_BYTES": "0",
            **self.store.env(),
            **extra,  # e.g. a faster reaper (bench/trials.py)
        }
        self.shared = shared
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.services = [
            Service(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                subprocess_env(SECATEURS_DATA_DIR=str(work / "api-host"), **shared),
                work / "api.log",
            )
        ]
        self.workers: list[Service] = []
        self.scale(workers)
        self._ready()

    def scale(self, workers: int, split_threads: bool = False) -> None:
        """(Re)start ``workers`` worker processes (their data directories, so their caches, survive).
        ``split_threads``: each gets cores / workers TensorFlow threads instead of all the cores."""
        for old in self.workers:
            old.stop()
            self.services.remove(old)
        self.workers = []
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        extra = (
            {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": threads}
            if split_threads
            else {}
        )
        for i in range(workers):
            service = Service(
                [sys.executable, "-m", "app.cli", "worker"],
                subprocess_env(
                    SECATEURS_DATA_DIR=str(self.work / f"worker-host-{i}"), **self.shared, **extra
                ),
                self.work / f"worker-{i}-{workers}-{int(split_threads)}.log",
            )
            self.workers.append(service)
            self.services.append(service)
        self.threads = threads if split_threads else "all"

    def _ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise BenchError("the API did not become ready:\n" + self.services[0].tail())

    def close(self) -> None:
        import psycopg

        for service in reversed(self.services):
            service.stop()
        self.store.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


def _wait(http: httpx.Client, path: str, done: Any, timeout: float = 1800) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(path).json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            raise BenchError(f"timed out on {path}: {body}")
        time.sleep(0.2)


def _model_files() -> tuple[Path, Path]:
    """The digits CNN (2 epochs; bench.digits_quality's, cached) and its test split."""
    digits = prepare(OUT_DIR / "cache", 2)
    return digits["zip"], digits["test"]


def run_jobs(dep: Deployment, model_zip: Path, data: Path, jobs: int) -> dict[str, Any]:
    with httpx.Client(base_url=dep.base, timeout=600) as http:
        model = http.post("/v1/models", files={"file": ("m.zip", model_zip.read_bytes())}).json()
        dataset = http.post("/v1/datasets", files={"file": ("t.npz", data.read_bytes())}).json()
        _wait(http, f"/v1/models/{model['id']}", lambda b: b["status"] != "validating")
        payload = {
            "model_id": model["id"],
            "eval_dataset_id": dataset["id"],
            "spec": {"target_sparsity": 0.5},
        }
        # warm every worker: one job each, so both runs compare warm workers with the model in their caches
        warm = [http.post("/v1/jobs", json=payload).json()["id"] for _ in dep.workers]
        for job_id in warm:
            _wait(http, f"/v1/jobs/{job_id}", lambda b: b["status"] in ("succeeded", "failed", "canceled"))
        started = time.monotonic()
        ids = [http.post("/v1/jobs", json=payload).json()["id"] for _ in range(jobs)]
        ends = [
            _wait(http, f"/v1/jobs/{job_id}", lambda b: b["status"] in ("succeeded", "failed", "canceled"))
            for job_id in ids
        ]
        wall = time.monotonic() - started
        failed = [e for e in ends if e["status"] != "succeeded"]
        if failed:
            raise BenchError(f"{len(failed)} job(s) did not succeed: {failed[0].get('error')}")
    # The service's own clock too: first created_at to last finished_at, without the poller's 0.2 s steps.
    first = min(datetime.fromisoformat(e["created_at"]) for e in ends)
    last = max(datetime.fromisoformat(e["finished_at"]) for e in ends)
    server = (last - first).total_seconds()
    return {
        "jobs": jobs,
        "workers": len(dep.workers),
        "wall_s": wall,
        "jobs_per_min": jobs / wall * 60,
        "server_wall_s": server,
        "server_jobs_per_min": jobs / server * 60,
    }


def run_transfers(dep: Deployment, work: Path, mib: int) -> dict[str, Any]:
    import os

    from app.storage.s3 import S3BlobStore

    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):  # this process's own client, for the direct copy
        os.environ[name] = dep.shared[name]
    store = S3BlobStore(
        dep.shared["SECATEURS_STORAGE_URL"], endpoint_url=dep.shared["SECATEURS_S3_ENDPOINT_URL"]
    )
    path = work / "big.npz"
    made = write_big_npz(path, mib * MiB)
    size = made["bytes"]
    api_pid = dep.services[0].process.pid
    body, headers = streamed_multipart(path, "big.npz")
    with httpx.Client(base_url=dep.base, timeout=1800) as http:
        time.sleep(1.0)
        hwm_before = status_kib(api_pid, "VmHWM")
        with RssSampler(api_pid) as sampler:
            time.sleep(0.5)
            tick = time.monotonic()
            response = http.post("/v1/datasets", content=body, headers=headers)
            api_up = time.monotonic() - tick
            time.sleep(0.5)
        hwm_after = status_kib(api_pid, "VmHWM")
        if response.status_code != 201:
            raise BenchError(f"upload -> {response.status_code}: {response.text[:500]}")
        baseline = [k for t, k in sampler.samples if t < tick]
        base_mb = sorted(baseline)[len(baseline) // 2] / 1024
        peak_mb = max(
            max(k for _, k in sampler.samples) / 1024, hwm_after / 1024 if hwm_after > hwm_before else 0
        )

        copy = _copy(path, work / "copy.npz")  # put_file consumes its file: give it a copy
        tick = time.monotonic()
        store.put_file("bench/direct.npz", copy)
        direct_up = time.monotonic() - tick

        # download: the uploaded dataset's object served as a job artifact would be (same code path)
        job_id = "job_bench" + uuid.uuid4().hex[:8]
        store.put_file(f"jobs/{job_id}/pruned.zip", _copy(path, work / "art.zip"))
        digest = _register_artifact(dep, job_id, path)
        tick = time.monotonic()
        got = hashlib.sha256()
        with http.stream("GET", f"/v1/jobs/{job_id}/artifact") as stream:
            if stream.status_code != 200:
                raise BenchError(f"download -> {stream.status_code}")
            for chunk in stream.iter_bytes(MiB):
                got.update(chunk)
        api_down = time.monotonic() - tick
        if got.hexdigest() != digest:
            raise BenchError("the API served other bytes than were stored")
        tick = time.monotonic()
        direct = hashlib.sha256()
        with store.open(f"jobs/{job_id}/pruned.zip") as reader:
            while chunk := reader.read(8 * MiB):
                direct.update(chunk)
        direct_down = time.monotonic() - tick
    path.unlink(missing_ok=True)
    mb = size / MiB
    return {
        "bytes": size,
        "upload_api_mb_s": mb / api_up,
        "upload_direct_mb_s": mb / direct_up,
        "download_api_mb_s": mb / api_down,
        "download_direct_mb_s": mb / direct_down,
        "api_rss_growth_mb": peak_mb - base_mb,
    }


def _copy(src: Path, dst: Path) -> Path:
    with src.open("rb") as a, dst.open("wb") as b:
        while chunk := a.read(8 * MiB):
            b.write(chunk)
    return dst


def _register_artifact(dep: Deployment, job_id: str, path: Path) -> str:
    """A succeeded job record whose artifact is the object just stored (the database is shared)."""
    from app.db import jobs
    from app.db.engine import make_engine, make_session_factory, session_scope
    from app.db.tables import JobRecord, ModelRecord

    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * MiB):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    engine = make_engine(dep.shared["SECATEURS_DATABASE_URL"])
    sessions = make_session_factory(engine)
    with session_scope(sessions) as session:
        model_id = session.query(ModelRecord.id).first()[0]
        session.add(JobRecord(id=job_id, model_id=model_id, spec={"target_sparsity": 0.5}, status="queued"))
    with session_scope(sessions) as session:
        jobs.claim_job(session, job_id, lease_seconds=600, max_attempts=3)
    with session_scope(sessions) as session:
        jobs.finish_job(
            session, job_id, "succeeded", artifact_sha256=digest, artifact_bytes=path.stat().st_size
        )
    engine.dispose()
    return digest


def run(smoke: bool, mib: int, jobs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        work = Path(tmp)
        model_zip, data = _model_files()
        dep = Deployment(work, workers=1)
        try:
            one = run_jobs(dep, model_zip, data, jobs)
            dep.scale(2)
            two = run_jobs(dep, model_zip, data, jobs)
            dep.scale(2, split_threads=True)
            two_split = run_jobs(dep, model_zip, data, jobs)
            transfers = run_transfers(dep, work, mib)
        finally:
            dep.close()
    two_split["threads"] = dep.threads
    return {
        "smoke": smoke,
        "one_worker": one,
        "two_workers": two,
        "two_workers_split_threads": two_split,
        "transfers": transfers,
    }


def markdown(result: dict[str, Any]) -> str:
    one, two, t = result["one_worker"], result["two_workers"], result["transfers"]
    split = result["two_workers_split_threads"]
    speedup = two["jobs_per_min"] / one["jobs_per_min"]
    split_speedup = split["jobs_per_min"] / one["jobs_per_min"]
    server_two = two["server_jobs_per_min"] / one["server_jobs_per_min"]
    server_split = split["server_jobs_per_min"] / one["server_jobs_per_min"]
    jobs_table = md_table(
        [
            "worker processes",
            "TensorFlow threads each",
            "jobs",
            "wall (s)",
            "jobs/min",
            "vs 1 worker",
            "server wall (s)",
            "server vs 1 worker",
        ],
        [
            [
                r["workers"],
                threads,
                r["jobs"],
                f"{r['wall_s']:.1f}",
                f"{r['jobs_per_min']:.1f}",
                f"{r['jobs_per_min'] / one['jobs_per_min']:.2f}x",
                f"{r['server_wall_s']:.1f}",
                f"{r['server_jobs_per_min'] / one['server_jobs_per_min']:.2f}x",
            ]
            for r, threads in ((one, "all"), (two, "all"), (split, split.get("threads", "?")))
        ],
    )
    transfer_table = md_table(
        ["", "through the API (MiB/s)", "direct to/from the bucket (MiB/s)", "API / direct"],
        [
            [
                "upload",
                f"{t['upload_api_mb_s']:.0f}",
                f"{t['upload_direct_mb_s']:.0f}",
                f"{t['upload_api_mb_s'] / t['upload_direct_mb_s']:.2f}",
            ],
            [
                "download",
                f"{t['download_api_mb_s']:.0f}",
                f"{t['download_direct_mb_s']:.0f}",
                f"{t['download_api_mb_s'] / t['download_direct_mb_s']:.2f}",
            ],
        ],
    )
    return (
        "Scale-out on S3 (SeaweedFS `weed mini` on loopback), API and workers with separate data directories "
        "(bench/storage.py).\n\n"
        f"**(a) {one['jobs']} small one-shot jobs** (digits CNN, 50%, evaluated on 1,000 samples), warm workers: "
        f"2 worker processes give **{speedup:.2f}x** the throughput of 1 with TensorFlow's default threads (every "
        f"process uses every core), **{split_speedup:.2f}x** with the cores split between them (goal 1.7x on 2 "
        "cores; the API, Redis, PostgreSQL, SeaweedFS and the poller share the same cores). Wall: the client's "
        "first submission to its poller seeing the last job end (0.2 s polls); server wall: the first job's "
        f"`created_at` to the last one's `finished_at` ({server_split:.2f}x split, {server_two:.2f}x default "
        "threads).\n\n"
        f"{jobs_table}\n\n"
        f"**(c) transfers** of a {t['bytes'] / MiB:.0f} MiB file; the API's RSS grew by "
        f"{t['api_rss_growth_mb']:.0f} MB during the upload.\n\n"
        f"{transfer_table}\n\n"
        "An upload through the API is received to local disk (hashed), checked, then put into the bucket: two "
        "passes over the bytes where a direct put makes one. **(b)** the ~1 B-parameter SavedModel: its own section "
        "below (bench/big_model.py).\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="4 jobs and 32 MiB (numbers mean nothing)")
    parser.add_argument("--mib", type=int, default=None, help="transfer size (default 512, smoke 32)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per run (default 20, smoke 4)")
    args = parser.parse_args(argv)
    mib = args.mib or (32 if args.smoke else 512)
    jobs = args.jobs or (4 if args.smoke else 20)
    tick = time.perf_counter()
    result = run(args.smoke, mib, jobs)
    result["bench_wall_s"] = time.perf_counter() - tick
    result["markdown"] = markdown(result)
    write_section("storage", result, args.smoke)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
