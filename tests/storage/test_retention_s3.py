"""Retention on S3: expired records take their objects with them, and objects without a record are swept."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from app import retention
from app.cli import main as cli_main
from app.config import Settings
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import DatasetRecord, JobRecord, ModelRecord, utcnow
from app.storage import Storage
from app.storage.s3 import S3BlobStore


def test_sweep_deletes_objects_in_the_store(s3_store: S3BlobStore, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "api", model_ttl_days=30, dataset_ttl_days=0, artifact_ttl_days=0)
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.db_url)
    init_db(engine)
    sessions = make_session_factory(engine)
    storage = Storage(settings.data_dir, s3_store)
    for key in (
        "models/mdl_old/upload.zip",
        "datasets/ds_keep.npz",
        "datasets/ds_orphan.npz",
        "jobs/job_gone/pruned.zip",
    ):
        (tmp_path / "blob").write_bytes(b"bytes of " + key.encode())
        s3_store.put_file(key, tmp_path / "blob")
    now = utcnow()
    with session_scope(sessions) as session:
        session.add(
            ModelRecord(
                id="mdl_old",
                name="m",
                format="saved_model",
                filename="m.zip",
                size_bytes=1,
                sha256="a" * 64,
                status="ready",
                created_at=now,
            )
        )
        session.add(
            DatasetRecord(
                id="ds_keep", name="d", size_bytes=1, sha256="b" * 64, arrays={}, n_samples=1, created_at=now
            )
        )
    report = retention.sweep(settings, sessions, storage, now=now + timedelta(days=31))
    assert report.models == 1 and report.leftovers == 2
    assert sorted(
        b.key for b in s3_store.list("models/") + s3_store.list("datasets/") + s3_store.list("jobs/")
    ) == ["datasets/ds_keep.npz"]
    again = retention.sweep(settings, sessions, storage, now=now + timedelta(days=31))
    assert again.total == 0
    engine.dispose()


def test_cleanup_command_deletes_objects_in_the_configured_store(
    s3_env: dict[str, str],
    s3_store: S3BlobStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`secateurs cleanup` sweeps the store the settings name, not the local data directory it runs beside."""
    data_dir = tmp_path / "api"
    for name, value in {**s3_env, "SECATEURS_ARTIFACT_TTL_DAYS": "7", "SECATEURS_MODEL_TTL_DAYS": "30"}.items():
        monkeypatch.setenv(name, value)
    settings = Settings(data_dir=data_dir)
    data_dir.mkdir(parents=True)
    engine = make_engine(settings.db_url)
    init_db(engine)
    long_ago = utcnow() - timedelta(days=40)
    with session_scope(make_session_factory(engine)) as session:
        session.add(
            JobRecord(
                id="job_done",
                model_id="mdl_kept",
                spec={"target_sparsity": 0.5},
                status="succeeded",
                created_at=long_ago,
                finished_at=long_ago,
            )
        )
    engine.dispose()
    for key in ("jobs/job_done/pruned.zip", "jobs/job_done/metrics.json"):
        (tmp_path / "blob").write_bytes(b"bytes of " + key.encode())
        s3_store.put_file(key, tmp_path / "blob")

    assert cli_main(["cleanup", "--data-dir", str(data_dir), "--json"]) == 0

    assert json.loads(capsys.readouterr().out)["artifacts"] == 1
    assert s3_store.list("jobs/") == []
