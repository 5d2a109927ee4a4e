"""Servers that go away: Redis restarted (losing every message) during submissions, PostgreSQL stopped under a
running API.

- ``test_redis_restart_mid_submissions_loses_no_accepted_job``: production topology (serve + `secateurs worker`,
  a test-own redis-server that keeps nothing on disk, a throwaway PostgreSQL database). Jobs are submitted in
  a loop; Redis is stopped mid-way with messages still in its queue. While it is down /readyz, POST /v1/jobs
  and POST /v1/models answer 503 with Retry-After, and a refused job or model is not kept. Redis is started
  again on the same port, empty (our marker key gone too): the reaper re-sends every queued job, and every
  job that got a 202 ends ``succeeded``.
- ``test_api_answers_503_while_its_database_is_down``: the app (with its reaper thread) on a test-own PostgreSQL
  cluster that the test stops and starts again: reads, writes and uploads answer 503 with Retry-After (never
  500) and keep nothing, /readyz names the database; after the start the same app answers 200 again and its
  reaper thread goes on.

Figures (accepted / refused / lost) are printed (-s) and recorded as junit properties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.queue import QUEUE
from tests.faults.conftest import TinyFiles
from tests.faults.procs import (
    PostgresCluster,
    Processes,
    Recorder,
    RedisServer,
    Stack,
    report_figures,
    wait_ready,
    wait_until,
)
from tests.support import model_factory

PROBLEM_JSON = "application/problem+json"
SHORT_SPEC = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}
FIRST_SPEC = {"target_sparsity": 0.5, "fine_tune": {"epochs": 10, "batch_size": 8}}
WAIT_S = 240.0


def _assert_unavailable(response: httpx.Response, what: str) -> None:
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text}"
    assert int(response.headers["retry-after"]) > 0, f"{what}: no Retry-After"
    assert response.headers["content-type"].startswith(PROBLEM_JSON), f"{what}: {response.headers}"


def _listed_job_ids(api: httpx.Client) -> set[str]:
    response = api.get("/v1/jobs", params={"limit": 200})
    assert response.status_code == 200, response.text
    return {job["id"] for job in response.json()["items"]}


@pytest.mark.e2e
@pytest.mark.tf
@pytest.mark.redis
@pytest.mark.postgres
def test_redis_restart_mid_submissions_loses_no_accepted_job(
    redis_server: RedisServer,
    pg_database: str,
    tiny_files: TinyFiles,
    processes: Processes,  # requested last: torn down first, while Redis and the database still answer
    tmp_path: Path,
    record_property: Recorder,
) -> None:
    stack = Stack(
        processes, tmp_path / "data", redis_server.url(), pg_database, tiny_files.model, tiny_files.train
    )
    http = stack.api.http
    accepted: list[str] = []
    refused = 0
    try:
        # Redis up: the first job keeps the worker busy for a few seconds, the next ones wait in Redis's queue
        accepted.append(stack.submit(FIRST_SPEC))
        stack.api.wait_job(accepted[0], lambda b: b["status"] != "queued", "to start")
        accepted += [stack.submit(SHORT_SPEC) for _ in range(4)]
        in_dead_redis = int(redis_server.client().llen(QUEUE))
        run_id = redis_server.run_id()
        redis_server.stop()  # --save "": every queued message dies with it

        # Redis down: refused with 503 + Retry-After, nothing kept
        _assert_unavailable(http.get("/readyz"), "/readyz with Redis down")
        assert "broker" in http.get("/readyz").json()["down"]
        for _ in range(3):
            _assert_unavailable(stack.post_job(SHORT_SPEC), "POST /v1/jobs with Redis down")
            refused += 1
        assert _listed_job_ids(http) == set(accepted), "a refused job was kept"
        with tiny_files.model.open("rb") as fh:
            upload = http.post("/v1/models", files={"file": ("model.tar.gz", fh)})
        _assert_unavailable(upload, "POST /v1/models with Redis down")
        refused += 1
        models = [m["id"] for m in http.get("/v1/models").json()["items"]]
        assert models == [stack.model_id], f"a refused model was kept: {models}"
        model_dirs = list((tmp_path / "data" / "models").iterdir())
        assert [d.name for d in model_dirs] == [stack.model_id], model_dirs

        # Redis back on the same port, empty, with a new run id
        redis_server.start()
        assert redis_server.run_id() != run_id
        wait_ready(stack.api, [stack.serve, stack.worker])
        accepted += [stack.submit(SHORT_SPEC) for _ in range(2)]
        ended = stack.api.settle(accepted, WAIT_S)
        listed = _listed_job_ids(http)
    finally:
        stack.close()

    lost = [job_id for job_id, body in ended.items() if body["status"] != "succeeded"]
    figures = {
        "accepted": len(accepted),
        "refused_503": refused,
        "queued_in_redis_at_stop": in_dead_redis,
        "lost": len(lost),
    }
    report_figures(record_property, "redis_restart", figures)
    assert lost == [], f"accepted jobs that did not succeed: { {j: ended[j]['status'] for j in lost} }"
    assert listed == set(accepted)
    assert in_dead_redis > 0, "no message was in Redis when it stopped: the test proved nothing"
    # once when serve first met this (fresh) Redis, once after the restart: the marker key went with the data
    detected = stack.serve.log_path.read_text().count("the broker restarted or was flushed")
    assert detected >= 2, stack.serve.tail()


@pytest.mark.postgres
def test_api_answers_503_while_its_database_is_down(
    pg_cluster: PostgresCluster, tmp_path: Path, record_property: Recorder
) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(
        data_dir=data_dir, database_url=pg_cluster.url(), min_free_bytes=0, reaper_interval_s=0.5
    )
    npz = model_factory.npz_bytes(model_factory.digits_datasets(flat=True)[1])
    app = create_app(settings, maintenance=True)
    unavailable = 0
    with TestClient(app) as client:
        created = client.post("/v1/datasets", files={"file": ("test.npz", npz)})
        assert created.status_code == 201, created.text
        dataset_id = created.json()["id"]
        wait_until(lambda: app.state.maintenance.passes > 0, "a first reaper pass")

        pg_cluster.stop()
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", "/v1/datasets", {}),
            ("GET", f"/v1/datasets/{dataset_id}", {}),
            ("GET", "/v1/jobs", {}),
            ("POST", "/v1/jobs", {"json": {"model_id": "mdl_x", "spec": {"target_sparsity": 0.5}}}),
            ("POST", "/v1/datasets", {"files": {"file": ("again.npz", npz)}}),
            ("DELETE", f"/v1/datasets/{dataset_id}", {}),
        ]
        for method, path, kwargs in requests:
            _assert_unavailable(
                client.request(method, path, **kwargs), f"{method} {path} with the database down"
            )
            unavailable += 1
        ready = client.get("/readyz")
        _assert_unavailable(ready, "/readyz with the database down")
        assert ready.json()["down"] == ["database"], ready.json()
        passes_while_down = app.state.maintenance.passes
        # the refused upload kept nothing: no second dataset file, no temp file
        assert sorted(p.name for p in (data_dir / "datasets").iterdir()) == [f"{dataset_id}.npz"]
        assert list((data_dir / "tmp").iterdir()) == []

        pg_cluster.start()
        back = wait_until(
            lambda: (r := client.get(f"/v1/datasets/{dataset_id}")).status_code == 200 and r,
            "the same app to answer 200 once PostgreSQL is back",
            60,
        )
        assert back.json()["id"] == dataset_id  # the DELETE above was refused, not half-done
        assert client.get("/readyz").status_code == 200
        wait_until(
            lambda: app.state.maintenance.passes > passes_while_down, "the reaper thread to run again", 60
        )
    report_figures(record_property, "database_down", {"requests_503": unavailable + 1, "recovered": 1})
