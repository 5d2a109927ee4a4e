"""Webhooks delivered for real by the embedded default: one `secateurs serve` (API + Celery worker child on the
file transport), a receiver on 127.0.0.1 in this process (allowed with SECATEURS_WEBHOOK_ALLOW) that checks
every request with the spec-only verifier of tests/webhook_receiver.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import Client
from tests.support import model_factory
from tests.support.procs import ROOT, Service, base_env, free_port, poll, wait_ready
from tests.webhook_receiver import Answer, Receiver, verify_standard_webhook

pytestmark = [pytest.mark.e2e, pytest.mark.tf]
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Hooked:
    url: str
    data_dir: Path
    model_id: str
    train_id: str
    eval_id: str
    secret: str


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hooked]:
    """`secateurs serve` with loopback webhooks allowed and 0.3 s retry backoff; a tiny model uploaded."""
    root = tmp_path_factory.mktemp("webhooks")
    saved = model_factory.build_tf_module(root / "saved_model", steps=60, hidden=16)
    model_zip = model_factory.zip_saved_model(saved, root / "tiny.zip")
    train, test = model_factory.digits_datasets(flat=True)
    name = f"x.{model_factory.MODULE_INPUT}"
    files = {
        "train.npz": model_factory.write_npz(
            root / "train.npz", {name: train["x"][:400], "y": train["y"][:400]}
        ),
        "eval.npz": model_factory.write_npz(root / "eval.npz", {name: test["x"][:200], "y": test["y"][:200]}),
    }
    port = free_port()
    env = base_env(
        root / "data",
        SECATEURS_WEBHOOK_ALLOW="127.0.0.1/32",
        SECATEURS_WEBHOOK_BACKOFF_S="0.3",
        SECATEURS_WEBHOOK_TIMEOUT_S="5",
    )
    service = Service(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], env, root / "serve.log"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, [service])
        with httpx.Client(base_url=url, timeout=60) as http:
            with model_zip.open("rb") as fh:
                model_id = http.post("/v1/models", files={"file": ("tiny.zip", fh)}).json()["id"]
            ids = {}
            for key, path in files.items():
                with path.open("rb") as fh:
                    ids[key] = http.post("/v1/datasets", files={"file": (key, fh)}).json()["id"]
            ready = poll(
                lambda: http.get(f"/v1/models/{model_id}").json(), lambda b: b["status"] != "validating", 90
            )
            assert ready["status"] == "ready", ready
        with Client(url) as client:
            secret = client.webhook_secret()
        yield Hooked(url, root / "data", model_id, ids["train.npz"], ids["eval.npz"], secret)
    finally:
        service.stop()


def start(hooked: Hooked, webhook_url: str, spec: dict[str, Any], train: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model_id": hooked.model_id, "spec": spec, "eval_dataset_id": hooked.eval_id}
    if train:
        body["train_dataset_id"] = hooked.train_id
    response = httpx.post(f"{hooked.url}/v1/jobs", json={**body, "webhook_url": webhook_url}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def settled(hooked: Hooked, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """The job once it ended and its webhook is no longer pending or in flight."""
    return poll(
        lambda: httpx.get(f"{hooked.url}/v1/jobs/{job_id}", timeout=30).json(),
        lambda b: b["status"] in TERMINAL and b["webhook_status"] in ("delivered", "failed", "gone"),
        timeout,
    )


def test_a_succeeded_job_is_delivered_once_and_verifies(hooked: Hooked) -> None:
    with Receiver() as receiver:
        created = start(hooked, receiver.url("/hooks/secateurs"), {"target_sparsity": 0.5})
        job = settled(hooked, created["id"])
        time.sleep(1.0)  # room for a duplicate, had there been one
        requests = list(receiver.requests)
    assert job["status"] == "succeeded", job
    assert len(requests) == 1, requests
    (request,) = requests
    payload = verify_standard_webhook(hooked.secret, request.headers, request.body)
    assert abs(time.time() - int(request.headers["webhook-timestamp"])) < 60
    assert request.path == "/hooks/secateurs" and request.headers["webhook-id"] == job["webhook_id"]
    assert payload["type"] == "job.succeeded" and payload["timestamp"] == job["finished_at"]
    assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
    assert payload["data"]["progress"] == 1.0 and "webhook_deliveries" not in payload["data"]
    (attempt,) = job["webhook_deliveries"]
    assert attempt["attempt"] == 1 and attempt["status_code"] == 200 and attempt["error"] is None
    # The admin CLI shows the same secret the tenant got from the API.
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "webhooks",
            "secret",
            "--tenant",
            "default",
            "--json",
            "--data-dir",
            str(hooked.data_dir),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert json.loads(shown.stdout)["secret"] == hooked.secret


def test_a_500_is_retried_with_the_same_webhook_id(hooked: Hooked) -> None:
    """A job that fails fast (no variable matches `include`); its first delivery gets a 500, the retry 200."""
    with Receiver([Answer(500)]) as receiver:
        created = start(hooked, receiver.url(), {"target_sparsity": 0.5, "include": ["^no_such_variable$"]})
        job = settled(hooked, created["id"])
        first, second = receiver.wait_for(2)
        time.sleep(0.5)
        assert len(receiver.requests) == 2
    assert job["status"] == "failed" and job["webhook_status"] == "delivered"
    for request in (first, second):
        payload = verify_standard_webhook(hooked.secret, request.headers, request.body)
        assert payload["type"] == "job.failed" and payload["data"]["error"]["code"] == "invalid_spec"
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == job["webhook_id"]
    assert second.at - first.at >= 0.25  # the backoff (0.3 s, +10% jitter at most)
    attempts = job["webhook_deliveries"]
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 200)]
    assert attempts[0]["error"] == "HTTP 500" and attempts[0]["next_retry_at"] is not None


def test_canceled_jobs_queued_or_running_deliver_job_canceled(hooked: Hooked) -> None:
    """A queued job canceled by the API never reaches the worker: the API publishes its webhook. While the
    solo worker runs the long job, that delivery waits (documented); it goes out once the long job ends."""
    long_spec = {"target_sparsity": 0.5, "fine_tune": {"epochs": 200, "batch_size": 16}}
    with Receiver() as receiver:
        running = start(hooked, receiver.url("/running"), long_spec, train=True)
        poll(
            lambda: httpx.get(f"{hooked.url}/v1/jobs/{running['id']}").json(),
            lambda b: b["status"] == "running",
            60,
        )
        queued = start(hooked, receiver.url("/queued"), {"target_sparsity": 0.5})
        canceled = httpx.post(f"{hooked.url}/v1/jobs/{queued['id']}/cancel").json()
        assert canceled["status"] == "canceled" and canceled["webhook_status"] == "pending"
        assert httpx.post(f"{hooked.url}/v1/jobs/{running['id']}/cancel").status_code == 202
        queued_job, running_job = settled(hooked, queued["id"]), settled(hooked, running["id"])
        requests = {r.path: r for r in receiver.wait_for(2)}
    assert running_job["status"] == "canceled", running_job
    for path, job in (("/queued", queued_job), ("/running", running_job)):
        payload = verify_standard_webhook(hooked.secret, requests[path].headers, requests[path].body)
        assert payload["type"] == "job.canceled" and payload["data"]["id"] == job["id"]
        assert payload["data"]["error"]["code"] == "canceled"
        assert [a["status_code"] for a in job["webhook_deliveries"]] == [200]
