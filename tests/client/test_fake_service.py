"""``app.client.testing.FakeService`` used the way a user's own tests would: upload, create, wait, download,
all in memory; and the errors a script must handle arrive as the same exceptions the real service gives."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.client import (
    Conflict,
    JobCanceled,
    JobFailed,
    NotFound,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
    WaitTimeout,
)
from app.client.testing import FakeService


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model.zip"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("saved_model.pb", bytes(range(256)) * 40 + b"\r\n--boundary-looking\r\n")
    train = tmp_path / "train.npz"
    np.savez(train, **{"x.pixels": np.zeros((12, 64), np.float32), "y": np.arange(12, dtype=np.int64)})
    return {"model": model, "train": train}


def test_upload_create_wait_download(files: dict[str, Path], tmp_path: Path) -> None:
    service = FakeService()
    seen: list[tuple[str, str | None]] = []
    with service.client() as client:
        model = client.upload_model(files["model"], name="digits")
        train = client.upload_dataset(files["train"])
        job = client.create_job(model.id, {"target_sparsity": 0.8}, train_dataset_id=train.id)
        assert (job.status, job.retry_after) == ("queued", 2.0)
        job = job.wait(on_progress=lambda j: seen.append((j.status, j.stage)))
        path = client.download_artifact(job.id, tmp_path)
        metrics = client.metrics(job.id)
        assert client.wait_model_ready(model.id).status == "ready"
        assert [j.id for j in client.list_jobs(status="succeeded")] == [job.id]

    assert (model.status, model.format, model.name) == ("validating", "saved_model", "digits")
    assert model.sha256 == hashlib.sha256(files["model"].read_bytes()).hexdigest()  # multipart kept every byte
    assert train.arrays == {
        "x.pixels": {"shape": [12, 64], "dtype": "float32"},
        "y": {"shape": [12], "dtype": "int64"},
    }
    assert train.n_samples == 12
    assert seen == [("running", "loading"), ("running", "pruning"), ("running", "saving"), ("succeeded", None)]
    assert job.status == "succeeded" and job.progress == 1.0 and job.finished_at is not None
    assert path == tmp_path / f"{job.id}-pruned.zip" and path.read_bytes() == service.artifact
    assert zipfile.ZipFile(io.BytesIO(path.read_bytes())).namelist()[0] == "saved_model.pb"
    assert metrics["job_id"] == job.id and metrics["pruned"]["sparsity"] == 0.8
    assert service.jobs[job.id]["status"] == "succeeded"
    assert [r.url.path for r in service.requests][:3] == ["/v1/models", "/v1/datasets", "/v1/jobs"]


def test_errors_come_as_the_real_services_exceptions(files: dict[str, Path]) -> None:
    service = FakeService()
    with service.client() as client:
        model = client.upload_model(files["model"])
        job = client.create_job(model.id, {"target_sparsity": 0.5})
        with pytest.raises(Conflict, match="no output yet"):
            client.metrics(job.id)
        service.fail_job(job.id, "out_of_memory", "the model does not fit")
        with pytest.raises(JobFailed) as failed:
            job.wait()
        assert (failed.value.code, failed.value.message) == ("out_of_memory", "the model does not fit")

        running = client.create_job(model.id, {"target_sparsity": 0.5})
        client.get_job(running.id)  # now running: a cancel takes effect at the next poll
        assert client.cancel_job(running.id).status == "running"
        with pytest.raises(JobCanceled):
            running.wait()
        with pytest.raises(WaitTimeout):  # virtual time: no real second passes
            client.create_job(model.id, {"target_sparsity": 0.5}).wait(timeout=0.5)

        with pytest.raises(NotFound):
            client.create_job("mdl_missing", {"target_sparsity": 0.5})
        with pytest.raises(UnsupportedMediaType):
            client.upload_model(files["train"])  # not a model archive
        with pytest.raises(Unprocessable, match="neither only"):
            client.upload_dataset(files["model"])  # a zip, but of no shards or images
    with FakeService(api_key="sk_test").client(api_key="sk_wrong") as client, pytest.raises(Unauthorized):
        client.list_models()
