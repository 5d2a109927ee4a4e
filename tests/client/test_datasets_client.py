"""Datasets at scale through the client and the CLI: references, new upload kinds, waiting for a verdict, against
the real app (no worker: its verdict is written with app.db.datasets, as the task would) and FakeService."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from app.cli import main
from app.client import Client, Conflict, DatasetInvalid, Forbidden, Unprocessable
from app.client.testing import FakeService
from app.config import Settings
from app.db import datasets as dataset_status
from app.db.engine import make_engine, make_session_factory, session_scope
from tests.client.conftest import ServeApp

SOURCES = {"default": ["s3://data/team-a/", "file:///mnt/datasets/"]}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [k for k in os.environ if k.startswith("SECATEURS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(tmp_path / "cli-var"))


def decide(data_dir: Path, dataset_id: str, **verdict: object) -> None:
    """What the worker's validate_dataset task writes at the end."""
    engine = make_engine(Settings(data_dir=data_dir).db_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            assert dataset_status.set_dataset_result(session, dataset_id, **verdict)  # type: ignore[arg-type]
    finally:
        engine.dispose()


def tfrecord_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.tfrecord"
    path.write_bytes(struct.pack("<Q", 3) + b"\0" * 4 + b"abc" + b"\0" * 4)
    return path


def test_client_registers_uploads_and_waits(serve_app: ServeApp, data_dir: Path, tmp_path: Path) -> None:
    with serve_app(dataset_sources=SOURCES) as url, Client(url) as client:
        ref = client.register_dataset(
            "s3://data/team-a/mnist/", format="tfrecord", label="label", name="mnist"
        )
        assert (ref.status, ref.format, ref.source, ref.name, ref.pending) == (
            "validating",
            "tfrecord",
            "s3://data/team-a/mnist/",
            "mnist",
            True,
        )
        assert ref.sha256 is None and ref.n_samples is None and ref.arrays == {}
        with pytest.raises(Forbidden, match="SECATEURS_DATASET_SOURCES"):
            client.register_dataset("s3://data/team-a-evil/", format="tfrecord")
        with pytest.raises(Unprocessable, match=r"'\.\.'"):
            client.register_dataset("file:///mnt/datasets/../etc/", format="parquet")

        up = client.upload_dataset(tfrecord_file(tmp_path), description={"label": "label"}, name="t")
        assert (up.status, up.format, up.name, up.size_bytes) == ("validating", "tfrecord", "t", 19)

        arrays = {"x": {"shape": [-1, 8], "dtype": "float32"}, "y": {"shape": [-1], "dtype": "int64"}}
        decide(
            data_dir,
            ref.id,
            status="ready",
            manifest={"root": ref.source},
            arrays=arrays,
            n_samples=70,
            shards=2,
        )
        ready = client.wait_dataset(ref.id, timeout=10, poll=0.05)
        assert (ready.status, ready.n_samples, ready.shards, ready.arrays) == ("ready", 70, 2, arrays)

        decide(
            data_dir,
            up.id,
            status="invalid",
            error={"code": "record_unparsable", "message": "record 0 is bad"},
        )
        with pytest.raises(DatasetInvalid) as info:
            client.wait_dataset(up.id, timeout=10, poll=0.05)
        assert (info.value.code, info.value.message) == ("record_unparsable", "record 0 is bad")
        assert [d.id for d in client.list_datasets()] == [up.id, ref.id]


def test_cli_datasets_commands(
    capsys: pytest.CaptureFixture[str], serve_app: ServeApp, data_dir: Path, tmp_path: Path
) -> None:
    with serve_app(dataset_sources=SOURCES) as url:
        features = json.dumps({"image": {"kind": "fixed", "dtype": "string", "shape": []}})
        inputs = '{"x": {"feature": "image"}}'
        argv = ["datasets", "add", "file:///mnt/datasets/flowers/", "--format", "tfrecord", "--url", url]
        code = main([*argv, "--json", "--features", features, "--inputs", inputs, "--compression", "GZIP"])
        out, _ = capsys.readouterr()
        assert code == 0, out
        added = json.loads(out)
        assert (added["status"], added["source"]) == ("validating", "file:///mnt/datasets/flowers/")

        code = main(["datasets", "add", "s3://elsewhere/x/", "--format", "parquet", "--url", url])
        _, err = capsys.readouterr()
        assert code == 2 and "403" in err and "SECATEURS_DATASET_SOURCES" in err

        code = main(
            ["datasets", "upload", str(tfrecord_file(tmp_path)), "--url", url, "--description", "{bad"]
        )
        _, err = capsys.readouterr()
        assert code == 2 and "--description is not valid JSON" in err

        code = main(["datasets", "upload", str(tfrecord_file(tmp_path)), "--url", url])
        out, _ = capsys.readouterr()
        assert code == 0 and "tfrecord, validating" in out

        decide(data_dir, added["id"], status="ready", manifest={"root": added["source"]}, shards=3)
        code = main(["datasets", "show", added["id"], "--url", url])
        out, _ = capsys.readouterr()
        assert (
            code == 0
            and "ready" in out
            and "shards: 3" in out
            and "source: file:///mnt/datasets/flowers/" in out
        )
        code = main(["datasets", "list", "--url", url])
        out, _ = capsys.readouterr()
        assert code == 0 and added["id"] in out and "ready" in out


def test_fake_service_follows_the_dataset_statuses(tmp_path: Path) -> None:
    service = FakeService(dataset_sources=SOURCES)
    model = tmp_path / "model.zip"
    model.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with service.client() as client:
        model_id = client.upload_model(model).id
        ref = client.register_dataset("s3://data/team-a/x/", format="parquet")
        assert ref.status == "validating"
        with pytest.raises(Conflict, match="wait until its status is ready"):
            client.create_job(model_id, {"target_sparsity": 0.5}, eval_dataset_id=ref.id)
        assert client.wait_dataset(ref.id).status == "ready"
        client.create_job(model_id, {"target_sparsity": 0.5}, eval_dataset_id=ref.id)
        with pytest.raises(Forbidden):
            client.register_dataset("s3://data/team-b/x/", format="parquet")
        up = client.upload_dataset(tfrecord_file(tmp_path), description={"format": "tfrecord"})
        service.fail_dataset(up.id, "record_unparsable", "no")
        with pytest.raises(DatasetInvalid):
            client.wait_dataset(up.id)
        with pytest.raises(Unprocessable, match="invalid"):
            client.create_job(model_id, {"target_sparsity": 0.5}, eval_dataset_id=up.id)
    assert FakeService().client().register_dataset("file:///anything/", format="npz").status == "validating"
