"""The README's flow over real HTTP: upload a model and datasets, run a fine-tuned pruning job, download the
artifact and check it with TensorFlow. Once on Redis + PostgreSQL with a separate `celery worker` process, once
on the embedded default (one `secateurs serve`, nothing else)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest

from app.auth import create_key
from app.config import Settings
from tests.conftest import Embedded
from tests.support import model_factory
from tests.support.procs import Service, base_env, free_port, poll, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.tf]


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits")
    saved = model_factory.build_keras3_export(root / "saved_model")  # the cached digits CNN every test shares
    train, test = model_factory.digits_datasets()
    return {
        "saved_model": saved,
        "model.zip": model_factory.zip_saved_model(saved, root / "model.zip", top="digits_cnn"),
        "train.npz": model_factory.write_npz(root / "train.npz", train),
        "test.npz": model_factory.write_npz(root / "test.npz", test),
    }


def _run_readme_flow(
    base: str, files: dict[str, Path], tmp_path: Path, api_key: str | None = None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    with httpx.Client(base_url=base, timeout=60, headers=headers) as http:
        with files["model.zip"].open("rb") as fh:
            model = http.post("/v1/models", files={"file": ("model.zip", fh)}, data={"name": "digits"})
        assert model.status_code == 201, model.text
        assert model.json()["status"] == "validating"
        ids = {}
        for name in ("train.npz", "test.npz"):
            with files[name].open("rb") as fh:
                response = http.post("/v1/datasets", files={"file": (name, fh)})
            assert response.status_code == 201, response.text
            ids[name] = response.json()["id"]
        model_id = model.json()["id"]
        ready = poll(
            lambda: http.get(f"/v1/models/{model_id}").json(), lambda b: b["status"] != "validating", 120
        )
        assert ready["status"] == "ready", ready
        assert "serving_default" in ready["signatures"] and ready["params"] > 0

        created = http.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "train_dataset_id": ids["train.npz"],
                "eval_dataset_id": ids["test.npz"],
                "spec": {
                    "target_sparsity": 0.8,
                    "schedule": {"kind": "polynomial"},
                    "fine_tune": {"epochs": 2},
                },
            },
        )
        assert created.status_code == 202, created.text
        location = created.headers["location"]
        stages: set[str] = set()

        def fetch() -> dict[str, Any]:
            body = http.get(location).json()
            if body["stage"]:
                stages.add(body["stage"])
            return body

        job = poll(fetch, lambda b: b["status"] in ("succeeded", "failed", "canceled"), 300)
        assert job["status"] == "succeeded", job
        assert job["progress"] == 1.0 and job["started_at"] and job["finished_at"]
        assert stages, "progress was never visible while running"

        artifact = http.get(f"{location}/artifact")
        assert artifact.status_code == 200
        assert artifact.headers["content-type"] == "application/zip"
        assert int(artifact.headers["content-length"]) == len(artifact.content)
        etag = artifact.headers["etag"]
        assert http.get(f"{location}/artifact", headers={"If-None-Match": etag}).status_code == 304
        metrics = http.get(f"{location}/metrics").json()
        schema = http.get("/v1/schemas/metrics").json()
    jsonschema.validate(metrics, schema)  # the published schema holds for a real job's document
    out = tmp_path / "pruned"
    zipfile.ZipFile(io.BytesIO(artifact.content)).extractall(out)
    return {"metrics": metrics, "artifact_dir": out, "job": job}


def _check_artifact(result: dict[str, Any], original: Path) -> None:
    import tensorflow as tf

    metrics = result["metrics"]
    assert set(metrics) >= {
        "job_id",
        "model_id",
        "spec",
        "baseline",
        "pruned",
        "delta",
        "layers",
        "timings_s",
        "notes",
        "versions",
    }
    assert metrics["pruned"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert metrics["baseline"]["metrics"]["accuracy"] > 0.8
    assert metrics["pruned"]["metrics"]["accuracy"] > 0.7
    assert metrics["pruned"]["size_bytes"]["zip"] < metrics["baseline"]["size_bytes"]["zip"]

    pruned = tf.saved_model.load(str(result["artifact_dir"]))
    before = tf.saved_model.load(str(original))
    assert set(pruned.signatures) == set(before.signatures)
    for name, fn in before.signatures.items():
        assert pruned.signatures[name].structured_input_signature == fn.structured_input_signature
    layer_names = {layer["name"] for layer in metrics["layers"]}
    kernels = [v for v in pruned.signatures["serving_default"].variables if len(v.shape) >= 2]
    zeros = sum(int(np.sum(v.numpy() == 0)) for v in kernels)
    assert zeros / sum(int(np.prod(v.shape)) for v in kernels) == pytest.approx(0.8, abs=0.01)
    assert layer_names


@pytest.mark.redis
@pytest.mark.postgres
def test_readme_flow_on_redis_and_postgres(
    digits_files: dict[str, Path],
    start_service: Callable[..., Service],
    redis_url: str,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    env = base_env(
        tmp_path / "data",
        SECATEURS_ENVIRONMENT="production",
        SECATEURS_BROKER_URL=redis_url,
        SECATEURS_DATABASE_URL=postgres_url,
    )
    # production always requires an API key (there is no default one)
    _, api_key = create_key(
        Settings(environment="production", broker_url=redis_url, database_url=postgres_url), "e2e"
    )
    api = start_service(["serve", "--port", str(port)], env, "api")
    worker = start_service(["worker"], env, "worker")
    wait_ready(f"http://127.0.0.1:{port}", [api, worker])
    result = _run_readme_flow(f"http://127.0.0.1:{port}", digits_files, tmp_path, api_key)
    _check_artifact(result, digits_files["saved_model"])
    assert "celery@" in worker.tail(400) or "ready" in worker.tail(400)


def test_readme_flow_on_the_embedded_default(
    digits_files: dict[str, Path], embedded: Embedded, tmp_path: Path
) -> None:
    result = _run_readme_flow(embedded.url, digits_files, tmp_path)
    _check_artifact(result, digits_files["saved_model"])
    assert (embedded.data_dir / "secateurs.db").is_file()
