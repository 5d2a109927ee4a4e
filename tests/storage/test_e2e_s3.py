"""No shared disk: `secateurs serve` and `secateurs worker` with DIFFERENT data directories, Redis, PostgreSQL and
a real S3 server (SeaweedFS) between them. The README flow end to end, then the store stopped and restarted
while jobs run: no job lost, no 500, every 503 says when to retry."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.helpers import files_under
from tests.e2e.test_flow import _check_artifact, _run_readme_flow, digits_files  # noqa: F401  (a fixture)
from tests.support import model_factory
from tests.support.procs import Service, base_env, free_port, poll, wait_ready
from tests.support.seaweed import Seaweed

pytestmark = [pytest.mark.e2e, pytest.mark.tf, pytest.mark.redis, pytest.mark.postgres]


def split_deployment(
    start: Callable[..., Service],
    tmp_path: Path,
    redis_url: str,
    postgres_url: str,
    store: Seaweed,
    **extra: str,
) -> tuple[str, Service, Service]:
    """API and worker as on two machines: each its own data directory, only Redis, PostgreSQL and S3 shared."""
    shared = {"SECATEURS_BROKER_URL": redis_url, "SECATEURS_DATABASE_URL": postgres_url, **store.env(), **extra}
    port = free_port()
    api = start(["serve", "--port", str(port)], base_env(tmp_path / "api-host", **shared), "api")
    worker = start(["worker"], base_env(tmp_path / "worker-host", **shared), "worker")
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, [api, worker])
    return base, api, worker


def bucket_keys(store: Seaweed) -> set[str]:
    listed = store.client().list_objects_v2(Bucket=store.bucket, Prefix="secateurs/")
    return {item["Key"].removeprefix("secateurs/") for item in listed.get("Contents", [])}


def test_readme_flow_with_no_shared_files(
    digits_files: dict[str, Path],  # noqa: F811
    start_service: Callable[..., Service],
    redis_url: str,
    own_postgres_url: str,
    tmp_path: Path,
) -> None:
    store = Seaweed(tmp_path / "s3").start()
    try:
        base, api, worker = split_deployment(
            start_service, tmp_path, redis_url, own_postgres_url, store, SECATEURS_LOG_FORMAT="json"
        )
        result = _run_readme_flow(base, digits_files, tmp_path)
        _check_artifact(result, digits_files["saved_model"])
        job_id = result["job"]["id"]
        keys = bucket_keys(store)
        assert {f"jobs/{job_id}/pruned.zip", f"jobs/{job_id}/metrics.json"} <= keys
        assert any(k.startswith("models/") and k.endswith("/upload.zip") for k in keys)
        assert sum(k.startswith("datasets/") for k in keys) == 2
        # the API's host keeps no blob; the worker's keeps only its cache and scratch space
        api_host = tmp_path / "api-host"
        assert [
            p for p in files_under(api_host) if p.parts[len(api_host.parts)] in ("models", "datasets", "jobs")
        ] == []
        cached = {p.name for p in (tmp_path / "worker-host" / "cache").iterdir() if p.is_file()}
        assert any(name.endswith(".zip") for name in cached) and sum(n.endswith(".npz") for n in cached) == 2
        assert not (tmp_path / "worker-host" / "jobs" / job_id / "pruned.zip").exists()  # moved to the store
        assert "Traceback" not in worker.tail(400)
        # JSON logs from both processes, carrying the job and its stage / the request's job id and tenant
        worker_lines = json_lines(worker)
        assert any(e.get("job_id") == job_id and e.get("stage") for e in worker_lines), worker_lines[-5:]
        api_lines = json_lines(api)
        assert any(e.get("job_id") == job_id and e.get("tenant") == "default" for e in api_lines), api_lines[-5:]
    finally:
        store.stop()


def json_lines(service: Service) -> list[dict[str, Any]]:
    out = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def test_store_outage_under_load_loses_no_job(
    start_service: Callable[..., Service], redis_url: str, own_postgres_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "model"
    saved = model_factory.build_keras3_export(root / "saved_model")  # cached: shared with the other tests
    model_zip = model_factory.zip_saved_model(saved, root / "model.zip").read_bytes()
    _, test = model_factory.digits_datasets()
    data = model_factory.write_npz(root / "test.npz", test).read_bytes()

    store = Seaweed(tmp_path / "s3").start()
    statuses: list[int] = []
    try:
        base, _, worker = split_deployment(start_service, tmp_path, redis_url, own_postgres_url, store)

        def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
            response = http.request(method, url, **kwargs)
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.headers.get("retry-after"), response.text
            return response

        with httpx.Client(base_url=base, timeout=60) as http:
            model = call("POST", "/v1/models", files={"file": ("m.zip", model_zip)}).json()
            dataset = call("POST", "/v1/datasets", files={"file": ("t.npz", data)}).json()
            poll(
                lambda: call("GET", f"/v1/models/{model['id']}").json(), lambda b: b["status"] == "ready", 180
            )
            jobs = [
                call(
                    "POST",
                    "/v1/jobs",
                    json={
                        "model_id": model["id"],
                        "eval_dataset_id": dataset["id"],
                        "spec": {"target_sparsity": s},
                    },
                ).json()["id"]
                for s in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
            ]
            store.stop()  # while the worker runs them: their outputs cannot be stored for a while
            outage_end = time.monotonic() + 8
            refused = 0
            while time.monotonic() < outage_end:
                for job_id in jobs:
                    assert call("GET", f"/v1/jobs/{job_id}").status_code == 200  # the database answers polls
                upload = call("POST", "/v1/datasets", files={"file": ("t.npz", data)})
                refused += upload.status_code == 503
                time.sleep(1)
            assert refused >= 1  # the outage was seen, and answered 503 + Retry-After
            store.start()
            finished = [
                poll(
                    lambda j=job_id: call("GET", f"/v1/jobs/{j}").json(),
                    lambda b: b["status"] not in ("queued", "running"),
                    300,
                )
                for job_id in jobs
            ]
            assert [j["status"] for j in finished] == ["succeeded"] * len(jobs), [
                j.get("error") for j in finished
            ]
            for job_id in jobs:
                artifact = call("GET", f"/v1/jobs/{job_id}/artifact")
                assert artifact.status_code == 200
                assert artifact.headers["etag"] == f'"{hashlib.sha256(artifact.content).hexdigest()}"'
        assert 500 not in statuses and all(s < 500 or s == 503 for s in statuses), sorted(set(statuses))
        assert "Traceback" not in worker.tail(600)
    finally:
        store.stop()
