"""Trials across workers (issue 23): ``python -m bench.trials [--smoke]``.

The no-shared-disk deployment of bench/storage.py (API and each worker with its own data directory, Redis,
PostgreSQL, a SeaweedFS S3 store), every worker process with one TensorFlow thread, a fast reaper (3 s lease):

- (a) a **6-target sweep with fine-tuning** (the digits CNN of bench/digits_quality.py, the stand-in until the
  Fashion-MNIST CNN of the calibration bench is in the house) with 1 worker process, then with 2: the job's
  wall time on the service's clock (``created_at`` to ``finished_at``), warm workers (one small job each
  first). Goal >= 1.8x.
- (b) **overhead**: a one-target sweep (one trial, then the aggregation) against the same single job
  (``target_sparsity``), on one worker, ``--repeats`` times each, interleaved; median ratio. Goal <= 1.10x.
- (c) **a worker SIGKILLed mid-sweep** (2 workers, one killed while both run a trial): the job succeeds and
  its points equal the undisturbed 2-worker run's (metric, sparsity, parameters, MACs, Pareto flags).

K-fold cross-validation, sensitivity and search fan out too but are not measured here yet. Writes the ``trials`` section of bench/RESULTS.md (``--smoke``: bench/out/RESULTS.trials-smoke.md;
3 targets, 1 repeat: the numbers mean nothing) and bench/out/section-trials.json. The machine is shared:
compare the numbers within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import OUT_DIR, ROOT, BenchError, md_table
from bench.digits_quality import prepare
from bench.results import RESULTS, replace_block
from bench.storage import Deployment

ENDED = ("succeeded", "failed", "canceled")
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
FAST_REAPER = {
    "SECATEURS_HEARTBEAT_SECONDS": "0.5",
    "SECATEURS_LEASE_SECONDS": "3",
    "SECATEURS_REAPER_INTERVAL_S": "0.5",
}
SAME = ("target", "sparsity", "metric", "params_total", "params_nonzero", "effective_macs", "pareto")
FINE_TUNE = {"epochs": 3, "batch_size": 32}


def _wait(http: httpx.Client, job_id: str, timeout: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(f"/v1/jobs/{job_id}").json()
        if body["status"] in ENDED:
            if body["status"] != "succeeded":
                raise BenchError(f"job {job_id} {body['status']}: {body.get('error')}")
            return body
        if time.monotonic() > deadline:
            raise BenchError(f"timed out on job {job_id}: {body}")
        time.sleep(0.2)


def _server_s(job: dict[str, Any]) -> float:
    return (
        datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"])
    ).total_seconds()


class Client:
    """The model and datasets uploaded once per deployment; jobs submitted and awaited."""

    def __init__(self, dep: Deployment, files: dict[str, Any]) -> None:
        self.http = httpx.Client(base_url=dep.base, timeout=600)
        model = self.http.post(
            "/v1/models", files={"file": ("m.zip", Path(files["zip"]).read_bytes())}
        ).json()
        self.ids = {"model_id": model["id"]}
        for role, key in (("train_dataset_id", "train"), ("eval_dataset_id", "test")):
            data = Path(files[key]).read_bytes()
            self.ids[role] = self.http.post("/v1/datasets", files={"file": (f"{key}.npz", data)}).json()["id"]
        deadline = time.monotonic() + 300
        while self.http.get(f"/v1/models/{model['id']}").json()["status"] == "validating":
            if time.monotonic() > deadline:
                raise BenchError("the model was not validated in time")
            time.sleep(0.2)

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.http.post("/v1/jobs", json={**self.ids, "spec": spec})
        if response.status_code != 202:
            raise BenchError(f"POST /v1/jobs -> {response.status_code}: {response.text[:300]}")
        return str(response.json()["id"])

    def run(self, spec: dict[str, Any]) -> dict[str, Any]:
        return _wait(self.http, self.submit(spec))

    def warm(self, workers: int) -> None:
        """One short job per worker, at once, so every worker has loaded TensorFlow and cached the model."""
        ids = [self.submit({"target_sparsity": 0.5, "preset": "fast"}) for _ in range(workers)]
        for job_id in ids:
            _wait(self.http, job_id)

    def points(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        metrics = self.http.get(f"/v1/jobs/{job['id']}/metrics").json()
        return [{k: p.get(k) for k in SAME} for p in metrics["sweep"]["points"]]

    def close(self) -> None:
        self.http.close()


def _sweep(targets: list[float]) -> dict[str, Any]:
    return {"sweep": {"targets": targets}, "fine_tune": FINE_TUNE, "seed": 1}


def _kill_mid_sweep(client: Client, dep: Deployment, spec: dict[str, Any]) -> dict[str, Any]:
    """Submit, wait until both workers run a trial, SIGKILL the first one's process, wait for the end."""
    job_id = client.submit(spec)
    deadline = time.monotonic() + 600
    while True:
        body = client.http.get(f"/v1/jobs/{job_id}").json()
        running = [t for t in body.get("trials") or [] if t["status"] == "running"]
        if len(running) >= 2:
            break
        if body["status"] in ENDED or time.monotonic() > deadline:
            raise BenchError(f"never saw two trials running: {body}")
        time.sleep(0.1)
    pid = int(running[0]["worker"].split("@", 1)[0].removeprefix("secateurs-"))
    ours = {w.process.pid for w in dep.workers}
    if not any(str(parent) in _ancestors(pid) for parent in ours):
        raise BenchError(f"trial worker {pid} is not a child of this bench's workers")
    os.kill(pid, signal.SIGKILL)
    job = _wait(client.http, job_id)
    retried = next(t for t in job["trials"] if t["id"] == running[0]["id"])
    return {"job": job, "killed_trial": running[0]["label"], "attempts": retried["attempts"]}


def _ancestors(pid: int) -> list[str]:
    found = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        found.append(str(pid))
    return found


def run(smoke: bool, repeats: int) -> dict[str, Any]:
    files = prepare(OUT_DIR / "cache", 2)
    targets = [0.5, 0.7, 0.9] if smoke else [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    with tempfile.TemporaryDirectory(prefix="bench-trials-") as tmp:
        dep = Deployment(Path(tmp), workers=1, **FAST_REAPER, **ONE_THREAD)
        try:
            client = Client(dep, files)
            client.warm(1)
            one = client.run(_sweep(targets))
            # (b) on the one warm worker: a one-target sweep vs the same single job, interleaved
            single_s, sweep1_s = [], []
            for _ in range(repeats):
                single_s.append(
                    _server_s(client.run({"target_sparsity": 0.8, "fine_tune": FINE_TUNE, "seed": 1}))
                )
                sweep1_s.append(_server_s(client.run(_sweep([0.8]))))
            dep.scale(2)
            client.warm(2)
            two = client.run(_sweep(targets))
            killed = _kill_mid_sweep(client, dep, _sweep(targets))
            points = {
                "one": client.points(one),
                "two": client.points(two),
                "killed": client.points(killed["job"]),
            }
            client.close()
        finally:
            dep.close()
    return {
        "smoke": smoke,
        "targets": targets,
        "fine_tune": FINE_TUNE,
        "one_worker_s": _server_s(one),
        "two_workers_s": _server_s(two),
        "workers_used": sorted({t["worker"] for t in two["trials"]}),
        "single_job_s": single_s,
        "one_target_sweep_s": sweep1_s,
        "killed": {
            "trial": killed["killed_trial"],
            "attempts": killed["attempts"],
            "s": _server_s(killed["job"]),
        },
        "points_equal_one_vs_two": points["one"] == points["two"],
        "points_equal_killed_vs_two": points["killed"] == points["two"],
        "points": points,
    }


def markdown(result: dict[str, Any]) -> str:
    speedup = result["one_worker_s"] / result["two_workers_s"]
    overhead = statistics.median(result["one_target_sweep_s"]) / statistics.median(result["single_job_s"])
    table = md_table(
        ["run", "worker processes", "job wall (s)", "vs 1 worker"],
        [
            [f"{len(result['targets'])}-target sweep", 1, f"{result['one_worker_s']:.1f}", "1.00x"],
            [
                f"{len(result['targets'])}-target sweep",
                2,
                f"{result['two_workers_s']:.1f}",
                f"{speedup:.2f}x",
            ],
            [
                f"... one worker SIGKILLed mid-trial ({result['killed']['trial']}, "
                f"{result['killed']['attempts']} attempts)",
                2,
                f"{result['killed']['s']:.1f}",
                f"{result['one_worker_s'] / result['killed']['s']:.2f}x",
            ],
        ],
    )
    return (
        "Trials across workers (bench/trials.py): the deployment of the storage section (S3, Redis, PostgreSQL, "
        "separate data directories), one TensorFlow thread per worker process, fine-tuning "
        f"{result['fine_tune']['epochs']} epochs per target on the digits CNN.\n\n"
        f"**(a)** a {len(result['targets'])}-target sweep: 2 worker processes finish it **{speedup:.2f}x** "
        f"faster than 1 (goal >= 1.8x; the API, Redis, PostgreSQL, SeaweedFS and the poller share the cores).\n\n"
        f"{table}\n\n"
        f"**(b)** overhead: a one-target sweep takes **{overhead:.2f}x** the same single job (median of "
        f"{len(result['single_job_s'])}; goal <= 1.10x): one more task (the aggregation) and one more model "
        "load.\n\n"
        f"**(c)** points equal: one worker vs two **{result['points_equal_one_vs_two']}**, a worker killed "
        f"mid-sweep vs undisturbed **{result['points_equal_killed_vs_two']}** (metric, sparsity, parameters, "
        "MACs, Pareto flags).\n\n"
        "K-fold cross-validation, sensitivity and search (its probes) fan out as well; not measured here.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trials", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="3 targets, 1 repeat (numbers mean nothing)")
    parser.add_argument("--repeats", type=int, default=None, help="(b) repeats (default 3, smoke 1)")
    args = parser.parse_args(argv)
    tick = time.perf_counter()
    result = run(args.smoke, args.repeats or (1 if args.smoke else 3))
    result["bench_wall_s"] = time.perf_counter() - tick
    result["markdown"] = markdown(result)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "section-trials.json").write_text(json.dumps(result, indent=2))
    path = OUT_DIR / "RESULTS.trials-smoke.md" if args.smoke else RESULTS
    text = path.read_text() if path.is_file() else ""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = (
        f"## Trials: a sweep across worker processes\n\n_Run {stamp}; benchmark wall time "
        f"{result['bench_wall_s']:.0f} s._\n\n{result['markdown']}"
    )
    path.write_text(replace_block(text, "trials", body))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
