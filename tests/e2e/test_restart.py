"""The embedded default survives a hard stop: a job that was running when `secateurs serve` was SIGKILLed is
re-queued on restart (attempts + 1) and runs again; cancel then stops the running job at its next report."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import model_factory
from tests.support.procs import Service, base_env, free_port, poll, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.tf]


def test_killed_service_requeues_running_job_and_cancel_stops_it(
    start_service: Callable[..., Service], tmp_path: Path
) -> None:
    saved = model_factory.build_tf_module(tmp_path / "module", steps=50)
    train, _ = model_factory.digits_datasets(flat=True)
    files = {
        "model.tar.gz": model_factory.tar_saved_model(saved, tmp_path / "model.tar.gz"),
        "train.npz": model_factory.write_npz(
            tmp_path / "train.npz", {"x.pixels": train["x"], "y": train["y"]}
        ),
    }
    env = base_env(tmp_path / "data")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    first = start_service(["serve", "--port", str(port)], env, "first")
    wait_ready(base, [first])
    with httpx.Client(base_url=base, timeout=60) as http:
        with files["model.tar.gz"].open("rb") as fh:
            model_id = http.post("/v1/models", files={"file": ("model.tar.gz", fh)}).json()["id"]
        with files["train.npz"].open("rb") as fh:
            train_id = http.post("/v1/datasets", files={"file": ("train.npz", fh)}).json()["id"]
        created = http.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "train_dataset_id": train_id,
                # long enough to be caught mid-run: thousands of tiny steps
                "spec": {"target_sparsity": 0.5, "fine_tune": {"epochs": 400, "batch_size": 8}},
            },
        )
        assert created.status_code == 202, created.text
        job_url = created.headers["location"]

        def get() -> dict[str, Any]:
            return http.get(job_url).json()

        poll(get, lambda b: b["stage"] == "fine_tuning" or b["status"] not in ("queued", "running"), 180)
        assert get()["status"] == "running", get()

    os.killpg(first.process.pid, signal.SIGKILL)  # API and its worker child die together, mid-job
    first.process.wait()

    second = start_service(["serve", "--port", str(port)], env, "second")
    wait_ready(base, [second])
    with httpx.Client(base_url=base, timeout=60) as http:
        after = http.get(job_url).json()
        assert after["status"] in ("queued", "running"), after
        rerun = poll(
            lambda: http.get(job_url).json(), lambda b: b["attempts"] == 2 and b["status"] == "running", 120
        )
        assert rerun["attempts"] == 2
        assert "recovered after restart: re-sent 1 job(s)" in second.log_path.read_text()
        assert http.post(f"{job_url}/cancel").status_code == 202
        ended = poll(
            lambda: http.get(job_url).json(), lambda b: b["status"] not in ("queued", "running"), 120
        )
    assert ended["status"] == "canceled", ended
    assert ended["error"]["code"] == "canceled"
