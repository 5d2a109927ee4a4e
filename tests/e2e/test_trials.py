"""Sweeps fanned out as trials (issue 23), through the API with real workers.

- the embedded default (one worker): the trials run one after another; the job body shows them;
- two `secateurs worker` processes on Redis + PostgreSQL + S3 (SeaweedFS), no shared disk: the same points as
  the one-worker run; a worker SIGKILLed mid-trial (the reaper re-sends the trial, attempts counted, the job
  succeeds); cancel mid-sweep;
- the per-tenant cap on running trials (SECATEURS_TENANT_MAX_RUNNING_TRIALS=1 with two workers): the trials
  never overlap, and a single job sent after the sweep is not held behind its queued trials.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Embedded
from tests.e2e.test_flow import digits_files  # noqa: F401  (a fixture)
from tests.support.procs import Service, base_env, children, cmdline, free_port, poll, wait_ready
from tests.support.seaweed import Seaweed

pytestmark = [pytest.mark.e2e, pytest.mark.tf]

TARGETS = [0.5, 0.7, 0.9]
QUICK_LATENCY = {"latency": {"batch_sizes": [1], "runs": 3, "budget_s": 0.2}}
SWEEP = {
    "sweep": {"targets": TARGETS},
    "fine_tune": {"epochs": 2, "batch_size": 32},
    "evaluation": QUICK_LATENCY,
    "seed": 5,
}
ONE_SHOT_SWEEP = {"sweep": {"targets": TARGETS}, "preset": "fast", "evaluation": QUICK_LATENCY}
# Equal wherever a target ran; the zip's size may differ by a few hundred bytes (saved_model.pb numbers the
# functions each process traced), seconds and latency are measurements.
SAME = ("target", "sparsity", "metric", "params_total", "params_nonzero", "effective_macs", "pareto")
ENDED = ("succeeded", "failed", "canceled")
# Fast failure detection: a worker that stops renewing for 3 s is dead; the reaper looks twice a second.
FAST_REAPER = {
    "SECATEURS_HEARTBEAT_SECONDS": "0.5",
    "SECATEURS_LEASE_SECONDS": "3",
    "SECATEURS_REAPER_INTERVAL_S": "0.5",
}


def _upload(http: httpx.Client, files: dict[str, Path]) -> dict[str, str]:
    ids = {}
    with files["model.zip"].open("rb") as fh:
        model = http.post("/v1/models", files={"file": ("model.zip", fh)})
    assert model.status_code == 201, model.text
    ids["model"] = model.json()["id"]
    for name in ("train.npz", "test.npz"):
        with files[name].open("rb") as fh:
            response = http.post("/v1/datasets", files={"file": (name, fh)})
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    ready = poll(
        lambda: http.get(f"/v1/models/{ids['model']}").json(), lambda b: b["status"] != "validating", 120
    )
    assert ready["status"] == "ready", ready
    return ids


def _submit(http: httpx.Client, ids: dict[str, str], spec: dict[str, Any]) -> str:
    created = http.post(
        "/v1/jobs",
        json={
            "model_id": ids["model"],
            "train_dataset_id": ids["train.npz"],
            "eval_dataset_id": ids["test.npz"],
            "spec": spec,
        },
    )
    assert created.status_code == 202, created.text
    return str(created.json()["id"])


def _wait(http: httpx.Client, job_id: str, timeout: float = 240) -> dict[str, Any]:
    return poll(lambda: http.get(f"/v1/jobs/{job_id}").json(), lambda b: b["status"] in ENDED, timeout)


def _same(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: p[k] for k in SAME} for p in points]


def _check_sweep(http: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    """A succeeded sweep: every target a succeeded trial and an artifact; /artifact is the highest's."""
    assert job["status"] == "succeeded", job
    assert [t["label"] for t in job["trials"]] == ["sparsity-0.50", "sparsity-0.70", "sparsity-0.90"]
    assert all(t["status"] == "succeeded" and t["worker"] and t["seconds"] > 0 for t in job["trials"])
    metrics = http.get(f"/v1/jobs/{job['id']}/metrics").json()
    points = metrics["sweep"]["points"]
    assert [p["target"] for p in points] == TARGETS
    assert [t["id"] for t in metrics["trials"]] == [t["id"] for t in job["trials"]]
    names = [item["name"] for item in http.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]]
    assert names == ["saved_model", "sparsity-0.50", "sparsity-0.70", "sparsity-0.90"]
    top = http.get(f"/v1/jobs/{job['id']}/artifact")
    assert top.status_code == 200
    assert top.content == http.get(f"/v1/jobs/{job['id']}/artifacts/sparsity-0.90").content
    assert metrics["pruned"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    return metrics


@pytest.fixture(scope="module")
def one_worker_sweep(digits_files: dict[str, Path], embedded: Embedded) -> dict[str, Any]:  # noqa: F811
    """The sweep on the embedded default (one worker child): the reference the two-worker runs must equal."""
    with httpx.Client(base_url=embedded.url, timeout=60) as http:
        ids = _upload(http, digits_files)
        job_id = _submit(http, ids, SWEEP)
        stages = set()

        def fetch() -> dict[str, Any]:
            body = http.get(f"/v1/jobs/{job_id}").json()
            stages.add(body["stage"])
            return body

        job = poll(fetch, lambda b: b["status"] in ENDED, 300)
        metrics = _check_sweep(http, job)
    return {"job": job, "metrics": metrics, "stages": stages}


def test_the_embedded_default_runs_the_trials_one_after_another(one_worker_sweep: dict[str, Any]) -> None:
    job = one_worker_sweep["job"]
    assert "trials" in one_worker_sweep["stages"]
    assert len({t["worker"] for t in job["trials"]}) == 1  # its one worker
    assert all(t["attempts"] == 1 for t in job["trials"])
    spans = sorted((_at(t["started_at"]), _at(t["finished_at"])) for t in job["trials"])
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # never two at once


def test_sensitivity_measures_in_trials_then_runs_the_suggestion(
    digits_files: dict[str, Path],  # noqa: F811
    embedded: Embedded,
) -> None:
    spec = {"sensitivity": {"sparsities": [0.5, 0.9]}, "evaluation": QUICK_LATENCY}
    with httpx.Client(base_url=embedded.url, timeout=60) as http:
        ids = _upload(http, digits_files)
        job = _wait(http, _submit(http, ids, spec))
        assert job["status"] == "succeeded", job
        labels = [t["label"] for t in job["trials"]]
        assert labels == [*(f"variables-{i}-of-4" for i in range(1, 5)), "suggestion"]
        assert all(t["status"] == "succeeded" for t in job["trials"])
        metrics = http.get(f"/v1/jobs/{job['id']}/metrics").json()
        assert http.get(f"/v1/jobs/{job['id']}/artifact").status_code == 409  # keeps no model
        assert http.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"] == []
    section = metrics["sensitivity"]
    assert len(section["variables"]) == 3 and section["layer_sparsity"]  # three kernels, over four trials


@pytest.mark.slow  # the worker tests check the search's trials give its document (tests/worker)
def test_a_search_probes_in_trials_then_searches_on(
    digits_files: dict[str, Path],  # noqa: F811
    embedded: Embedded,
) -> None:
    spec = {"search": {"max_drop": 0.05, "min_sparsity": 0.05, "max_sparsity": 0.95}, "preset": "fast"}
    with httpx.Client(base_url=embedded.url, timeout=60) as http:
        ids = _upload(http, digits_files)
        job = _wait(http, _submit(http, ids, spec))
        assert job["status"] == "succeeded", job
        assert [t["label"] for t in job["trials"]] == [
            "probe-0.05",
            "probe-0.275",
            "probe-0.5",
            "probe-0.725",
            "probe-0.95",
            "search",
        ]
        items = http.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]
        metrics = http.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [item["name"] for item in items] == ["saved_model"]
    assert metrics["pruned"]["sparsity"] == pytest.approx(metrics["search"]["chosen"]["sparsity"], abs=0.01)


@pytest.mark.slow  # tests/e2e/test_crossval.py runs a K-fold job through its trials in the default suite
def test_kfold_folds_and_the_main_run_are_trials(digits_files: dict[str, Path], embedded: Embedded) -> None:  # noqa: F811
    spec = {
        "target_sparsity": 0.6,
        "preset": "fast",
        "evaluation": {
            "cross_validation": {"folds": 2},
            **QUICK_LATENCY,
        },
    }
    with httpx.Client(base_url=embedded.url, timeout=60) as http:
        ids = _upload(http, digits_files)
        job = _wait(http, _submit(http, ids, spec))
        assert job["status"] == "succeeded", job
        assert [(t["label"], t["status"]) for t in job["trials"]] == [
            ("fold-1", "succeeded"),
            ("fold-2", "succeeded"),
            ("main", "succeeded"),
        ]
        metrics = http.get(f"/v1/jobs/{job['id']}/metrics").json()
        items = http.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]
    assert [item["name"] for item in items] == ["saved_model"]
    assert metrics["cross_validation"]["folds"] == 2 and metrics["pruned"]["sparsity"] == pytest.approx(
        0.6, abs=0.01
    )


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _deployment(
    start: Callable[..., Service], tmp_path: Path, shared: dict[str, str], *, own_disks: bool
) -> tuple[str, list[Service]]:
    """API + two `secateurs worker` processes; with ``own_disks`` each has its own data directory."""
    port = free_port()

    def home(name: str) -> Path:
        return tmp_path / (name if own_disks else "data")

    api = start(["serve", "--port", str(port)], base_env(home("api-host"), **shared), "api")
    workers = [start(["worker"], base_env(home(f"worker-{i}"), **shared), f"worker-{i}") for i in (1, 2)]
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, [api, *workers])
    return base, workers


def _worker_pid(name: str, workers: list[Service]) -> int:
    """The pid in ``secateurs-<pid>@<host>``: a `celery worker` child of one of our supervisors."""
    pid = int(name.split("@", 1)[0].removeprefix("secateurs-"))
    assert "celery" in cmdline(pid), (name, cmdline(pid))
    assert any(pid in children(w.process.pid) for w in workers)
    return pid


@pytest.mark.redis
@pytest.mark.postgres
def test_two_workers_equal_one_survive_a_kill_and_cancel(
    digits_files: dict[str, Path],  # noqa: F811
    one_worker_sweep: dict[str, Any],
    start_service: Callable[..., Service],
    redis_url: str,
    own_postgres_url: str,
    tmp_path: Path,
) -> None:
    store = Seaweed(tmp_path / "s3").start()
    try:
        shared = {
            "SECATEURS_BROKER_URL": redis_url,
            "SECATEURS_DATABASE_URL": own_postgres_url,
            **store.env(),
            **FAST_REAPER,
        }
        base, workers = _deployment(start_service, tmp_path, shared, own_disks=True)
        with httpx.Client(base_url=base, timeout=60) as http:
            ids = _upload(http, digits_files)
            job_id = _submit(http, ids, SWEEP)
            both = poll(  # both workers busy with a trial each: the sweep runs in parallel
                lambda: http.get(f"/v1/jobs/{job_id}").json(),
                lambda b: (
                    b["status"] in ENDED or sum(t["status"] == "running" for t in b["trials"] or []) == 2
                ),
                120,
            )
            busy = [t for t in both["trials"] if t["status"] == "running"]
            assert len({t["worker"] for t in busy}) == 2, both
            victim = busy[0]
            os.kill(_worker_pid(victim["worker"], workers), signal.SIGKILL)  # mid-trial
            job = _wait(http, job_id)
            metrics = _check_sweep(http, job)
            retried = next(t for t in job["trials"] if t["id"] == victim["id"])
            assert retried["attempts"] == 2, job["trials"]
            reference = one_worker_sweep["metrics"]["sweep"]["points"]
            assert _same(metrics["sweep"]["points"]) == _same(reference)
            for ours, theirs in zip(metrics["sweep"]["points"], reference, strict=True):
                assert abs(ours["zip_bytes"] - theirs["zip_bytes"]) <= 2048

            # Cancel mid-sweep: queued trials end at once, the running ones at their next progress report
            job_id = _submit(http, ids, SWEEP)
            poll(
                lambda: http.get(f"/v1/jobs/{job_id}").json(),
                lambda b: any(t["status"] == "running" for t in b["trials"] or []),
                120,
            )
            canceled = http.post(f"/v1/jobs/{job_id}/cancel")
            assert canceled.status_code == 202, canceled.text
            assert not any(t["status"] == "queued" for t in canceled.json()["trials"])
            job = _wait(http, job_id, 60)
            assert job["status"] == "canceled", job
            assert {t["status"] for t in job["trials"]} <= {"canceled", "succeeded"}
            assert any(t["status"] == "canceled" for t in job["trials"])
        for worker in workers:
            assert "Traceback" not in worker.tail(400), worker.tail(400)
    finally:
        store.stop()


@pytest.mark.redis
@pytest.mark.postgres
def test_tenant_cap_keeps_trials_apart_and_single_jobs_go_ahead(
    digits_files: dict[str, Path],  # noqa: F811
    start_service: Callable[..., Service],
    redis_url: str,
    own_postgres_url: str,
    tmp_path: Path,
) -> None:
    shared = {
        "SECATEURS_BROKER_URL": redis_url,
        "SECATEURS_DATABASE_URL": own_postgres_url,
        "SECATEURS_TENANT_MAX_RUNNING_TRIALS": "1",
        "SECATEURS_TRIAL_REQUEUE_COUNTDOWN_S": "0.5",
        **FAST_REAPER,
    }
    base, _ = _deployment(start_service, tmp_path, shared, own_disks=False)
    with httpx.Client(base_url=base, timeout=60) as http:
        ids = _upload(http, digits_files)
        sweep_id = _submit(http, ids, ONE_SHOT_SWEEP)
        poll(lambda: http.get(f"/v1/jobs/{sweep_id}").json(), lambda b: b["stage"] == "trials", 60)
        single_id = _submit(
            http, ids, {"target_sparsity": 0.6, "preset": "fast", "evaluation": QUICK_LATENCY}
        )
        single = _wait(http, single_id)
        sweep = _wait(http, sweep_id)
    assert single["status"] == "succeeded", single
    assert sweep["status"] == "succeeded", sweep
    spans = sorted((_at(t["started_at"]), _at(t["finished_at"])) for t in sweep["trials"])
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans  # one at a time
    assert _at(single["finished_at"]) < spans[-1][1]  # not held behind the sweep's queued trials
