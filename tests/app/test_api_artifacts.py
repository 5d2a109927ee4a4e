"""GET /v1/jobs/{id}/artifacts and /artifacts/{name}: the recorded files of a job, served like /artifact, and
the export spec's refusals at job creation. No worker: its part (claim, files, finish) is played through
app.db.jobs and the storage directory, as worker.tasks records them."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app import job_files
from app.db import jobs
from app.db.engine import session_scope
from app.db.tables import JobRecord, utcnow
from tests.app.helpers import app_of, assert_problem, create_job, upload_dataset, upload_model

ZIP = b"PK\x03\x04" + bytes(range(256)) * 16
TFLITE = {"tflite_float32": b"TFL3" + bytes(range(200)) * 20, "tflite_int8": b"TFL3" + b"\x07" * 1500}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def model_id(client: TestClient) -> str:
    return str(upload_model(client)["id"])


def finish_with_exports(app: FastAPI, job_id: str) -> None:
    """What worker.tasks does after a run with two exports: files in place, then one entry per file."""
    job_dir: Path = app.state.storage.job_dir(job_id)
    (job_dir / "artifacts").mkdir(parents=True)
    (job_dir / "pruned.zip").write_bytes(ZIP)
    (job_dir / "metrics.json").write_text(json.dumps({"job_id": job_id}))
    files = [job_files.entry("saved_model", "pruned.zip", len(ZIP), sha(ZIP))]
    for name, data in TFLITE.items():
        (job_dir / "artifacts" / f"{name}.tflite").write_bytes(data)
        files.append(job_files.entry(name, f"artifacts/{name}.tflite", len(data), sha(data)))
    with session_scope(app.state.session_factory) as session:
        assert jobs.claim_job(session, job_id, lease_seconds=600, max_attempts=3).claimed
        assert jobs.finish_job(
            session, job_id, "succeeded", artifact_sha256=sha(ZIP), artifact_bytes=len(ZIP), artifacts=files
        )


def test_the_listing_names_every_recorded_file(client: TestClient, model_id: str) -> None:
    job = create_job(client, model_id)["id"]
    finish_with_exports(app_of(client), job)
    response = client.get(f"/v1/jobs/{job}/artifacts")
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [i["name"] for i in items] == ["saved_model", "tflite_float32", "tflite_int8"]
    assert items[0] == {
        "name": "saved_model",
        "media_type": "application/zip",
        "size_bytes": len(ZIP),
        "sha256": sha(ZIP),
        "href": f"/v1/jobs/{job}/artifacts/saved_model",
    }
    assert items[2]["media_type"] == "application/octet-stream"
    assert items[2]["sha256"] == sha(TFLITE["tflite_int8"])


@pytest.mark.parametrize("name", ["saved_model", "tflite_float32", "tflite_int8"])
def test_each_file_downloads_with_its_digest_and_ranges(client: TestClient, model_id: str, name: str) -> None:
    job = create_job(client, model_id)["id"]
    finish_with_exports(app_of(client), job)
    data = ZIP if name == "saved_model" else TFLITE[name]
    url = f"/v1/jobs/{job}/artifacts/{name}"

    whole = client.get(url)
    assert whole.status_code == 200
    assert whole.content == data
    assert sha(whole.content) == whole.headers["etag"].strip('"')
    assert whole.headers["repr-digest"] == job_files_digest(data)
    suffix = "-pruned.zip" if name == "saved_model" else f"-{name}.tflite"
    assert f"{job}{suffix}" in whole.headers["content-disposition"]

    part = client.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == data[10:100]
    assert part.headers["repr-digest"] == whole.headers["repr-digest"]  # of the whole file, also on a 206
    stale = client.get(url, headers={"Range": "bytes=10-99", "If-Range": '"not-the-etag"'})
    assert stale.status_code == 200 and stale.content == data
    assert client.get(url, headers={"If-None-Match": whole.headers["etag"]}).status_code == 304
    assert client.get(url, headers={"Range": f"bytes={len(data) + 5}-"}).status_code == 416


def job_files_digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def test_artifact_stays_the_saved_model_zip(client: TestClient, model_id: str) -> None:
    job = create_job(client, model_id)["id"]
    finish_with_exports(app_of(client), job)
    legacy = client.get(f"/v1/jobs/{job}/artifact")
    named = client.get(f"/v1/jobs/{job}/artifacts/saved_model")
    assert legacy.content == named.content == ZIP
    assert legacy.headers["etag"] == named.headers["etag"]


def test_unknown_name_is_404_listing_the_names(client: TestClient, model_id: str) -> None:
    job = create_job(client, model_id)["id"]
    finish_with_exports(app_of(client), job)
    body = assert_problem(client.get(f"/v1/jobs/{job}/artifacts/tflite_float16"), 404)
    assert body["artifacts"] == ["saved_model", "tflite_float32", "tflite_int8"]
    assert "tflite_float16" in body["detail"]
    assert_problem(client.get(f"/v1/jobs/{job}/artifacts/..%2Fmetrics.json"), 404)


def test_before_success_409_and_after_retention_410(client: TestClient, model_id: str) -> None:
    app = app_of(client)
    job = create_job(client, model_id)["id"]
    for url in (f"/v1/jobs/{job}/artifacts", f"/v1/jobs/{job}/artifacts/saved_model"):
        assert "queued" in assert_problem(client.get(url), 409)["detail"]
    finish_with_exports(app, job)
    with session_scope(app.state.session_factory) as session:
        record = session.get(JobRecord, job)
        assert record is not None
        record.expired_at = utcnow()
    for url in (f"/v1/jobs/{job}/artifacts", f"/v1/jobs/{job}/artifacts/tflite_int8"):
        assert "retention" in assert_problem(client.get(url), 410)["detail"]


def test_a_job_recorded_before_the_list_shows_its_zip(client: TestClient, model_id: str) -> None:
    app = app_of(client)
    job = create_job(client, model_id)["id"]
    job_dir: Path = app.state.storage.job_dir(job)
    job_dir.mkdir(parents=True)
    (job_dir / "pruned.zip").write_bytes(ZIP)
    with session_scope(app.state.session_factory) as session:
        assert jobs.claim_job(session, job, lease_seconds=600, max_attempts=3).claimed
        assert jobs.finish_job(session, job, "succeeded", artifact_sha256=sha(ZIP), artifact_bytes=len(ZIP))
    items = client.get(f"/v1/jobs/{job}/artifacts").json()["items"]
    assert [(i["name"], i["sha256"]) for i in items] == [("saved_model", sha(ZIP))]
    assert client.get(f"/v1/jobs/{job}/artifacts/saved_model").content == ZIP


# --- the spec ---------------------------------------------------------------------------------------------


def _post(client: TestClient, model_id: str, export: Any, **extra: Any) -> Any:
    spec = {"target_sparsity": 0.5, "export": export}
    return client.post("/v1/jobs", json={"model_id": model_id, "spec": spec, **extra})


def test_int8_without_a_train_dataset_is_422(client: TestClient, model_id: str) -> None:
    body = assert_problem(_post(client, model_id, {"tflite": ["float32", "int8"]}), 422)
    assert body["errors"][0]["loc"] == "train_dataset_id"
    assert "int8" in body["detail"]
    train = upload_dataset(client)["id"]
    accepted = _post(client, model_id, {"tflite": ["int8"]}, train_dataset_id=train)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["spec"]["export"] == {
        "tflite": ["int8"],
        "onnx": False,
        "representative_samples": 200,
        "int8_io": False,
    }
    assert _post(client, model_id, {"tflite": ["float16", "dynamic_range"]}).status_code == 202


def test_onnx_alone_or_beside_tflite_is_accepted(client: TestClient, model_id: str) -> None:
    alone = _post(client, model_id, {"onnx": True})
    assert alone.status_code == 202, alone.text
    assert alone.json()["spec"]["export"]["tflite"] == [] and alone.json()["spec"]["export"]["onnx"] is True
    beside = _post(client, model_id, {"tflite": ["float16"], "onnx": True})
    assert beside.status_code == 202, beside.text


def test_an_onnx_file_is_listed_and_downloads_as_onnx(client: TestClient, model_id: str) -> None:
    """worker.tasks records ``work/artifacts/onnx.onnx`` as ``onnx``: listed, served as bytes, named .onnx."""
    app = app_of(client)
    job = create_job(client, model_id)["id"]
    job_dir: Path = app.state.storage.job_dir(job)
    (job_dir / "artifacts").mkdir(parents=True)
    (job_dir / "pruned.zip").write_bytes(ZIP)
    onnx = b"\x08\x08" + bytes(range(100)) * 7
    (job_dir / "artifacts" / "onnx.onnx").write_bytes(onnx)
    files = [
        job_files.entry("saved_model", "pruned.zip", len(ZIP), sha(ZIP)),
        job_files.entry("onnx", "artifacts/onnx.onnx", len(onnx), sha(onnx)),
    ]
    with session_scope(app.state.session_factory) as session:
        assert jobs.claim_job(session, job, lease_seconds=600, max_attempts=3).claimed
        assert jobs.finish_job(
            session, job, "succeeded", artifact_sha256=sha(ZIP), artifact_bytes=len(ZIP), artifacts=files
        )
    items = client.get(f"/v1/jobs/{job}/artifacts").json()["items"]
    assert [(i["name"], i["media_type"]) for i in items] == [
        ("saved_model", "application/zip"),
        ("onnx", "application/octet-stream"),
    ]
    download = client.get(f"/v1/jobs/{job}/artifacts/onnx")
    assert download.status_code == 200 and download.content == onnx
    assert f"{job}-onnx.onnx" in download.headers["content-disposition"]


@pytest.mark.parametrize(
    ("export", "needle"),
    [
        ({"tflite": []}, "asks for no file"),
        ({}, "asks for no file"),
        ({"onnx": False}, "asks for no file"),
        ({"tflite": ["int8", "float32", "int8"]}, "repeated"),
        ({"tflite": ["int4"]}, "float32"),
        ({"tflite": ["float32"], "int8_io": True}, "int8_io"),
        ({"tflite": ["float32"], "representative_samples": 0}, "greater than or equal to 1"),
        ({"onnx": ["float32"], "tflite": ["float32"]}, "onnx"),
    ],
)
def test_bad_export_specs_are_422(client: TestClient, model_id: str, export: Any, needle: str) -> None:
    body = assert_problem(_post(client, model_id, export), 422)
    assert needle in json.dumps(body), body
