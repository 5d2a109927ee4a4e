"""Trials across workers (issue 23): ``python -m bench.trials [--smoke]``.

The no-shared-disk deployment of bench/storage.py (API and each worker with its own data directory, Redis,
PostgreSQL, a SeaweedFS S3 store), every worker process with one TensorFlow thread, a fast reaper (3 s lease).
The model: the Fashion-MNIST CNN of bench/datasets.py (``cached_fashion_cnn``: 12,000 train images, 3 epochs,
kept in the model cache); the jobs' train set is the next 24,000 train images (unseen by the model; trials of
~5 s, so the service's fixed cost per trial does not decide the ratios), the eval set the first 2,000 test
images, both uploaded as ``.npz``. Every job fine-tunes 3 epochs of batch 32 (seed 1).
Wall time is the job's on the service's clock (``created_at`` to ``finished_at``), with warm workers (one small
job each first). The 1-worker runs come first, then the deployment is scaled to 2 workers and the same jobs
run again:

- (a) a **6-target sweep** (0.5 ... 0.95), 1 worker process vs 2: goal >= 1.8x. A **5-fold
  cross-validation** (``target_sparsity`` 0.8, ``evaluation.cross_validation.folds`` 5: five fold trials and
  the main run), 1 vs 2: goal >= 1.8x. A **search** (``search``: accuracy within 2 points, sparsity 0.3-0.95,
  resolution 0.05; its five one-shot probes are trials side by side, the fine-tuned halving one trial after
  them), 1 vs 2: reported, no goal. The K-fold and search results of the 1- and 2-worker runs must be the
  same (the ``cross_validation`` section, the chosen sparsity, every probe and trial row, the pruned metrics
  and sparsity; seconds left out).
- (b) **overhead**: a one-target sweep (one trial, then the aggregation) against the same single job
  (``target_sparsity``), on one worker, ``--repeats`` times each, interleaved; median ratio. Goal <= 1.10x.
  The (a) sweep and cross-validation run ``rounds`` times per side (3; the side that goes first alternating,
  the workers rescaled and warmed between sides): medians.
- (c) **a worker SIGKILLed mid-sweep** (2 workers, one killed while both run a trial): the job succeeds and
  its points equal the undisturbed 2-worker run's (metric, sparsity, parameters, MACs, Pareto flags).

Sensitivity jobs fan out too but are not measured here. Writes the ``trials`` section of bench/RESULTS.md
(``--smoke``: bench/out/RESULTS.trials-smoke.md; a model of 384 images and 1 epoch, 256 train and 128 eval
images, 3 targets, 3 folds, 1 fine-tuning epoch, 1 repeat: the numbers mean nothing) and
bench/out/section-trials.json. The machine is shared: compare the numbers within one run.
"""

from __future__ import annotations

import argparse
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
from bench.results import write_section
from bench.storage import Deployment

ENDED = ("succeeded", "failed", "canceled")
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}
# (c) needs a dead worker's trial taken back within seconds; every heartbeat and reaper pass is CPU the 2-worker
# side shares with its trials on a 2-core machine (the 1-worker side has a core to spare for it), so no faster
# than that needs (0.5 s each before: ~2x the service's own load).
FAST_REAPER = {
    "SECATEURS_HEARTBEAT_SECONDS": "1",
    "SECATEURS_LEASE_SECONDS": "3",
    "SECATEURS_REAPER_INTERVAL_S": "1",
}
POLL_S = 1.0  # the poller's interval: the wall times are the server's clock, so polling only costs CPU
SAME = ("target", "sparsity", "metric", "params_total", "params_nonzero", "effective_macs", "pareto")
SWEEP_GOAL, FOLDS_GOAL, OVERHEAD_GOAL = 1.8, 1.8, 1.10

# Sizes at full size and in smoke mode. model_train / model_epochs: the cached_fashion_cnn key (the datasets
# section's, so the model cache shares it); n_train: the jobs' train images, the ones after the model's.
DEFAULTS: dict[str, Any] = {
    "model_train": 12_000,
    "model_epochs": 3,
    "n_train": 24_000,
    "n_test": 2_000,
    "targets": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
    "fine_tune": {"epochs": 3, "batch_size": 32},
    "folds": 5,
    "search": {"max_drop": 0.02, "min_sparsity": 0.3, "max_sparsity": 0.95, "resolution": 0.05},
    "repeats": 3,
    "rounds": 3,  # (a): sweep and K-fold timed this many times on each side, medians compared
}
SMOKE: dict[str, Any] = {
    "model_train": 384,
    "model_epochs": 1,
    "n_train": 256,
    "n_test": 128,
    "targets": [0.5, 0.7, 0.9],
    "fine_tune": {"epochs": 1, "batch_size": 32},
    "folds": 3,
    "search": {"max_drop": 0.3, "min_sparsity": 0.3, "max_sparsity": 0.95, "resolution": 0.2},
    "repeats": 1,
    "rounds": 1,
}
FOLDS_TARGET = 0.8
SEARCH_BUDGET_S = 3600.0  # never the limit here: a search the budget stops depends on the clock


def _log(message: str) -> None:
    print(f"[trials] {message}", file=sys.stderr, flush=True)


def prepare(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """The Fashion-MNIST CNN (cached) zipped for upload, and the jobs' train and eval sets as ``.npz``."""
    from bench.datasets import cached_fashion_cnn, fashion, write_npz
    from tests.support.model_factory import zip_saved_model

    root, meta = cached_fashion_cnn(cfg["model_train"], cfg["model_epochs"], OUT_DIR / "cache")
    train, test = fashion(cfg["model_train"] + cfg["n_train"], cfg["n_test"])
    train = {k: v[cfg["model_train"] :] for k, v in train.items()}
    return {
        "model": meta,
        "zip": zip_saved_model(root / "saved_model", work / "model.zip"),
        "train": write_npz(work / "train.npz", train),
        "test": write_npz(work / "test.npz", test),
    }


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
        time.sleep(POLL_S)


def _server_s(job: dict[str, Any]) -> float:
    return (
        datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"])
    ).total_seconds()


def _without_seconds(value: Any) -> Any:
    """``value`` with every ``seconds`` key dropped, at any depth (the clock's, not the result's)."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


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
        while (body := self.http.get(f"/v1/models/{model['id']}").json())["status"] == "validating":
            if time.monotonic() > deadline:
                raise BenchError("the model was not validated in time")
            time.sleep(0.2)
        if body["status"] != "ready":
            raise BenchError(f"the model was not accepted: {body}")

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

    def metrics(self, job: dict[str, Any]) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/jobs/{job['id']}/metrics").json())

    def points(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: p.get(k) for k in SAME} for p in self.metrics(job)["sweep"]["points"]]

    def outcome(self, job: dict[str, Any], section: str) -> dict[str, Any]:
        """What must not depend on the number of workers: the kind's section (``cross_validation`` or
        ``search``) and the pruned model's metrics and sparsity, without their seconds."""
        metrics = self.metrics(job)
        return _without_seconds(
            {
                section: metrics[section],
                "pruned_metrics": metrics["pruned"]["metrics"],
                "pruned_sparsity": metrics["pruned"]["sparsity"],
            }
        )

    def close(self) -> None:
        self.http.close()


class Specs:
    """The jobs of this run, from its sizes."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg

    def _base(self) -> dict[str, Any]:
        return {"fine_tune": self.cfg["fine_tune"], "seed": 1}

    def sweep(self, targets: list[float] | None = None) -> dict[str, Any]:
        return {"sweep": {"targets": targets or self.cfg["targets"]}, **self._base()}

    def single(self, target: float) -> dict[str, Any]:
        return {"target_sparsity": target, **self._base()}

    def folds(self) -> dict[str, Any]:
        cross_validation = {"cross_validation": {"folds": self.cfg["folds"]}}
        return {"target_sparsity": FOLDS_TARGET, "evaluation": cross_validation, **self._base()}

    def search(self) -> dict[str, Any]:
        return {"search": {**self.cfg["search"], "budget_s": SEARCH_BUDGET_S}, **self._base()}


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


def _timed(client: Client, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    tick = time.perf_counter()
    job = client.run(spec)
    _log(f"{name}: {_server_s(job):.1f} s on the service's clock ({time.perf_counter() - tick:.1f} s here)")
    return job


def _trial_summary(job: dict[str, Any]) -> dict[str, Any]:
    trials = job.get("trials") or []
    return {
        "trials": len(trials),
        "workers": sorted({t["worker"] for t in trials if t.get("worker")}),
        "trial_s": [t.get("seconds") for t in trials],
    }


def _more_rounds(
    client: Client, dep: Deployment, specs: Specs, jobs: dict[str, dict[str, Any]], count: int
) -> dict[str, list[float]]:
    """The sweep and the K-fold job again, ``count - 1`` more rounds of both sides, the side that goes first
    alternating (2 workers first in round 2): one run each is at the mercy of the shared cores' neighbours,
    so (a) compares medians. Scaling restarts the workers, which are warmed again before they are timed."""
    walls = {name: [_server_s(jobs[name])] for name in ("sweep_one", "sweep_two", "folds_one", "folds_two")}
    current = 2
    for index in range(1, count):
        for workers in (current, 3 - current):
            if workers != current:
                dep.scale(workers)
                client.warm(workers)
                current = workers
            side = "one" if workers == 1 else "two"
            label = f"{workers} worker{'s' if workers > 1 else ''}, round {index + 1}"
            walls[f"sweep_{side}"].append(_server_s(_timed(client, f"sweep, {label}", specs.sweep())))
            walls[f"folds_{side}"].append(_server_s(_timed(client, f"K-fold, {label}", specs.folds())))
    return walls


def run(cfg: dict[str, Any], smoke: bool) -> dict[str, Any]:
    specs = Specs(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-trials-") as tmp:
        tick = time.perf_counter()
        files = prepare(cfg, Path(tmp))
        _log(f"model {files['model']} and data ready in {time.perf_counter() - tick:.0f} s")
        dep = Deployment(Path(tmp) / "deployment", workers=1, **FAST_REAPER, **ONE_THREAD)
        try:
            client = Client(dep, files)
            client.warm(1)
            jobs: dict[str, dict[str, Any]] = {}
            jobs["sweep_one"] = _timed(client, "sweep, 1 worker", specs.sweep())
            # (b) on the one warm worker: a one-target sweep vs the same single job, interleaved
            single_s, sweep1_s = [], []
            for _ in range(cfg["repeats"]):
                single_s.append(_server_s(_timed(client, "single job", specs.single(0.8))))
                sweep1_s.append(_server_s(_timed(client, "one-target sweep", specs.sweep([0.8]))))
            jobs["folds_one"] = _timed(client, "K-fold, 1 worker", specs.folds())
            jobs["search_one"] = _timed(client, "search, 1 worker", specs.search())
            dep.scale(2)
            client.warm(2)
            jobs["sweep_two"] = _timed(client, "sweep, 2 workers", specs.sweep())
            jobs["folds_two"] = _timed(client, "K-fold, 2 workers", specs.folds())
            jobs["search_two"] = _timed(client, "search, 2 workers", specs.search())
            killed = _kill_mid_sweep(client, dep, specs.sweep())
            _log(f"sweep with a worker killed: {_server_s(killed['job']):.1f} s")
            rounds = _more_rounds(client, dep, specs, jobs, cfg["rounds"])
            points = {
                "one": client.points(jobs["sweep_one"]),
                "two": client.points(jobs["sweep_two"]),
                "killed": client.points(killed["job"]),
            }
            outcomes = {
                name: client.outcome(jobs[name], section)
                for name, section in (
                    ("folds_one", "cross_validation"),
                    ("folds_two", "cross_validation"),
                    ("search_one", "search"),
                    ("search_two", "search"),
                )
            }
            client.close()
        finally:
            dep.close()
    search = outcomes["search_two"]["search"]
    return {
        "smoke": smoke,
        "config": cfg,
        "model": files["model"],
        "targets": cfg["targets"],
        "fine_tune": cfg["fine_tune"],
        "wall_s": {
            name: statistics.median(rounds[name]) if name in rounds else _server_s(job)
            for name, job in jobs.items()
        },
        "wall_rounds": rounds,
        "trials": {name: _trial_summary(job) for name, job in jobs.items()},
        "single_job_s": single_s,
        "one_target_sweep_s": sweep1_s,
        "killed": {
            "trial": killed["killed_trial"],
            "attempts": killed["attempts"],
            "s": _server_s(killed["job"]),
        },
        "points_equal_one_vs_two": points["one"] == points["two"],
        "points_equal_killed_vs_two": points["killed"] == points["two"],
        "folds_equal_one_vs_two": outcomes["folds_one"] == outcomes["folds_two"],
        "search_equal_one_vs_two": outcomes["search_one"] == outcomes["search_two"],
        "folds_accuracy": outcomes["folds_two"]["cross_validation"]["summary"]["pruned"]["accuracy"],
        "search_chosen": search["chosen"],
        "search_counts": {"probes": search["probes"], "trials": search["trial_count"]},
        "points": points,
        "outcomes": outcomes,
    }


def _met(flag: bool) -> str:
    return "met" if flag else "**missed**"


def markdown(result: dict[str, Any]) -> str:
    wall, cfg = result["wall_s"], result["config"]
    speedup = {kind: wall[f"{kind}_one"] / wall[f"{kind}_two"] for kind in ("sweep", "folds", "search")}
    overhead = statistics.median(result["one_target_sweep_s"]) / statistics.median(result["single_job_s"])
    n_targets, k = len(result["targets"]), cfg["folds"]
    names = {
        "sweep": f"{n_targets}-target sweep",
        "folds": f"{k}-fold cross-validation",
        "search": "search",
    }
    counts = result["search_counts"]
    chosen = result["search_chosen"]
    killed = result["killed"]
    equal = {
        "sweep": result["points_equal_one_vs_two"],
        "folds": result["folds_equal_one_vs_two"],
        "search": result["search_equal_one_vs_two"],
    }
    rows = []
    for kind, goal in (("sweep", SWEEP_GOAL), ("folds", FOLDS_GOAL), ("search", None)):
        trials = result["trials"][f"{kind}_two"]["trials"]
        rows.append(
            [
                f"(a) {names[kind]}, 2 worker processes vs 1 ({trials} trials)",
                f"**{speedup[kind]:.2f}x** ({wall[f'{kind}_one']:.1f} s -> {wall[f'{kind}_two']:.1f} s)",
                f">= {goal:.1f}x" if goal else "reported",
                _met(speedup[kind] >= goal) if goal else "—",
            ]
        )
    rows += [
        [
            "(b) one-target sweep / the same single job, 1 worker",
            f"**{overhead:.2f}x** (median of {len(result['single_job_s'])}: "
            f"{statistics.median(result['one_target_sweep_s']):.1f} s vs "
            f"{statistics.median(result['single_job_s']):.1f} s)",
            f"<= {OVERHEAD_GOAL:.2f}x",
            _met(overhead <= OVERHEAD_GOAL),
        ],
        [
            f"(c) a worker SIGKILLed mid-sweep ({killed['trial']}, {killed['attempts']} attempts): the job "
            "succeeds with the undisturbed run's points",
            f"succeeded in {killed['s']:.1f} s; points equal **{result['points_equal_killed_vs_two']}**",
            "equal",
            _met(result["points_equal_killed_vs_two"]),
        ],
    ]
    for kind in ("sweep", "folds", "search"):
        rows.append(
            [
                f"{names[kind]}: the same results on 1 and 2 workers (seed 1)",
                f"**{equal[kind]}**",
                "equal",
                _met(equal[kind]),
            ]
        )
    goals = md_table(["what", "measured", "goal", "status"], rows)
    walls = md_table(
        ["run", "worker processes", "job wall (s)", "vs 1 worker"],
        [
            *(
                row
                for kind in ("sweep", "folds", "search")
                for row in (
                    [names[kind], 1, f"{wall[f'{kind}_one']:.1f}", "1.00x"],
                    [names[kind], 2, f"{wall[f'{kind}_two']:.1f}", f"{speedup[kind]:.2f}x"],
                )
            ),
            [
                f"{names['sweep']}, one worker SIGKILLed mid-trial ({killed['trial']}, "
                f"{killed['attempts']} attempts)",
                2,
                f"{killed['s']:.1f}",
                f"{wall['sweep_one'] / killed['s']:.2f}x",
            ],
        ],
    )
    model, ft = result["model"], result["fine_tune"]
    accuracy = result["folds_accuracy"]
    return (
        "Trials across workers (bench/trials.py): the deployment of the storage section (S3, Redis, PostgreSQL, "
        "separate data directories), one TensorFlow thread per worker process, warm workers. The Fashion-MNIST "
        f"CNN of bench/datasets.py ({model.get('params', 0):,} parameters, {model.get('n_train', 0):,} train "
        f"images, {model.get('epochs', 0)} epoch(s), test accuracy {model.get('test_accuracy', 0):.4f}); the jobs "
        f"train on the next {cfg['n_train']:,} train images and are scored on the first {cfg['n_test']:,} test "
        f"images; every job fine-tunes {ft['epochs']} epoch(s) of batch {ft['batch_size']}, seed 1. Wall time is "
        "the job's on the service's clock (created to finished); the sweep's and the cross-validation's are "
        f"medians of {len(result.get('wall_rounds', {}).get('sweep_one', [0]))} round(s) per side (the side "
        f"that goes first alternating; every round: {_rounds_text(result.get('wall_rounds', {}))}). "
        "The cross-validation prunes to "
        f"{FOLDS_TARGET} ({k} fold trials and the main run; pruned accuracy over the folds "
        f"{accuracy['mean']:.4f} +- {accuracy['std']:.4f}); the search keeps accuracy within "
        f"{cfg['search']['max_drop']:g} of the baseline over sparsity {cfg['search']['min_sparsity']:g}-"
        f"{cfg['search']['max_sparsity']:g} (resolution {cfg['search']['resolution']:g}): "
        f"{result['trials']['search_two']['trials'] - 1} one-shot probes side by side (the search keeps the "
        f"{counts['probes']} up to the first that failed), then one trial runs {counts['trials']} fine-tuned "
        f"trial(s) and the final run one after another; it chose {chosen['sparsity']:g} (accuracy {chosen['metric']:.4f}). The API, "
        "Redis, PostgreSQL, SeaweedFS and the poller (every 1 s; heartbeats and reaper every 1 s) share the cores "
        "with the workers.\n\n"
        f"{goals}\n{walls}\n"
        "Sensitivity jobs fan out as well; not measured here.\n"
    )


def _rounds_text(rounds: dict[str, list[float]]) -> str:
    return "; ".join(
        f"{name.replace('_one', ', 1 worker').replace('_two', ', 2 workers')} "
        + " / ".join(f"{s:.1f}" for s in walls)
        + " s"
        for name, walls in rounds.items()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trials", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat (numbers mean nothing)")
    parser.add_argument("--repeats", type=int, default=None, help="(b) repeats (default 3, smoke 1)")
    parser.add_argument("--n-train", type=int, default=None, help="the jobs' train images (default 24000)")
    parser.add_argument("--rounds", type=int, default=None, help="(a) rounds per side (default 3, smoke 1)")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else DEFAULTS)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.n_train:
        cfg["n_train"] = args.n_train
    tick = time.perf_counter()
    result = run(cfg, args.smoke)
    result["bench_wall_s"] = time.perf_counter() - tick
    result["markdown"] = markdown(result)
    write_section("trials", result, args.smoke)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
