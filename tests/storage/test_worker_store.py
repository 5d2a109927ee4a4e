"""The worker against a store that does not answer: retried, then the job fails with a reason (no TensorFlow
runs: the failure comes while fetching the model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import JobRecord, ModelRecord
from app.errors import StoreUnavailable
from app.storage import Storage
from app.storage.cache import BlobCache
from app.storage.s3 import S3BlobStore
from tests.support.seaweed import free_ports
from worker import blobs


def test_with_retries_retries_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(blobs.time, "sleep", sleeps.append)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise StoreUnavailable("store down", retry_after=5)
        return "ok"

    assert blobs.with_retries("fetching x", flaky, window_s=100) == "ok"
    assert sleeps == [1.0, 2.0]

    def down() -> None:
        raise StoreUnavailable("store down", retry_after=5)

    with pytest.raises(StoreUnavailable, match=r"fetching y; tried \d+ times"):
        blobs.with_retries("fetching y", down, window_s=3.5)


@pytest.mark.tf
def test_a_job_fails_with_store_unavailable_after_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.tasks as tasks

    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    settings = Settings(data_dir=tmp_path / "worker", heartbeat_seconds=0.5, lease_seconds=5)
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.db_url)
    init_db(engine)
    sessions = make_session_factory(engine)
    store = S3BlobStore("s3://b/p", endpoint_url=f"http://127.0.0.1:{port}", max_retries=0, retry_timeout_s=1)
    storage = Storage(settings.data_dir, store, BlobCache(tmp_path / "cache", 0))
    monkeypatch.setattr(tasks, "_context", lambda: (settings, sessions, storage))
    monkeypatch.setattr(blobs, "RETRY_WINDOW_S", 2.0)
    sleeps: list[float] = []
    monkeypatch.setattr(blobs.time, "sleep", sleeps.append)
    with session_scope(sessions) as session:
        session.add(
            ModelRecord(
                id="mdl_s",
                name="m",
                format="saved_model",
                filename="m.zip",
                size_bytes=10,
                sha256="a" * 64,
                status="ready",
            )
        )
        session.add(JobRecord(id="job_s", model_id="mdl_s", spec={"target_sparsity": 0.5}, status="queued"))
    tasks._run("job_s")
    with session_scope(sessions) as session:
        job = session.get(JobRecord, "job_s")
        assert job is not None and job.status == "failed"
        assert job.error is not None and job.error["code"] == "store_unavailable"
        assert (
            "submit the job again" in job.error["message"] and "fetching model mdl_s" in job.error["message"]
        )
        assert job.timings is not None and "loading" in job.timings
    assert sleeps  # it was retried before it gave up
    engine.dispose()


def test_a_worker_host_keeps_only_recent_extracted_models(tmp_path: Path) -> None:
    import os

    store = S3BlobStore("s3://b/p", endpoint_url="http://127.0.0.1:9")  # never contacted here
    storage = Storage(tmp_path / "host", store, BlobCache(tmp_path / "cache", 0))
    for i in range(12):
        path = storage.model_dir(f"mdl_{i:02d}")
        (path / "saved_model").mkdir(parents=True)
        os.utime(path, (1000 + i, 1000 + i))
    blobs._touch_and_prune_models(storage, "mdl_00")  # the oldest, used again now
    kept = sorted(p.name for p in storage.models_dir.iterdir())
    assert len(kept) == blobs.MAX_LOCAL_MODELS
    assert "mdl_00" in kept and "mdl_11" in kept and "mdl_01" not in kept
