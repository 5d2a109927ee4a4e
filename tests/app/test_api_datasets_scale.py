"""Datasets at scale, API side (issue 20): new upload kinds, references under SECATEURS_DATASET_SOURCES, the
dataset statuses jobs respect, the spec's data fields, and the database/reaper plumbing the worker relies on.
No TensorFlow: the worker's validation is played by app.db.datasets, as the task would call it."""

from __future__ import annotations

import io
import json
import struct
import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import datasets as dataset_status
from app.db import jobs
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import DatasetRecord, utcnow
from app.main import create_app
from app.maintenance import Maintenance
from app.schemas.datasets import normalise_source, source_allowed
from app.storage import Storage
from tests.app.helpers import (
    SIGNATURES,
    app_of,
    assert_problem,
    dataset_arrays,
    files_under,
    mark_model,
    npz_bytes,
    sent_tasks,
    upload_dataset,
    upload_model,
    zip_bytes,
)

VALIDATE_DATASET = "secateurs.validate_dataset"
SOURCES = {
    "default": ["s3://data/team-a/", "file:///mnt/datasets/"],
    "other": ["s3://data/team-b/"],
    "*": ["s3://public/shared/"],
}


def tfrecord_bytes(*records: bytes) -> bytes:
    """TFRecord framing (length, its CRC, data, data CRC); the CRCs are the worker's to check, zero here."""
    return b"".join(struct.pack("<Q", len(r)) + b"\0" * 4 + r + b"\0" * 4 for r in records)


def parquet_bytes() -> bytes:
    return b"PAR1" + b"\0" * 32 + struct.pack("<I", 8) + b"PAR1"


def tar_bytes(entries: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def post_file(
    client: TestClient,
    filename: str,
    data: bytes,
    description: dict[str, Any] | str | None = None,
    **extra: str,
) -> Any:
    fields = dict(extra)
    if description is not None:
        fields["description"] = description if isinstance(description, str) else json.dumps(description)
    return client.post("/v1/datasets", files={"file": (filename, data)}, data=fields or None)


def record_of(client: TestClient, dataset_id: str) -> DatasetRecord:
    with session_scope(app_of(client).state.session_factory) as session:
        record = session.get(DatasetRecord, dataset_id)
        assert record is not None
        session.expunge(record)
        return record


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, min_free_bytes=0, dataset_sources=SOURCES)


# --- uploads of the new kinds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "data", "fmt", "ext"),
    [
        ("train.tfrecord", tfrecord_bytes(b"example-1", b"example-2"), "tfrecord", ".tfrecord"),
        ("train.tfrecords", tfrecord_bytes(b"e"), "tfrecord", ".tfrecord"),
        ("train.tfrecord.gz", b"\x1f\x8b\x08\x00" + b"\0" * 20, "tfrecord", ".tfrecord.gz"),
        ("table.parquet", parquet_bytes(), "parquet", ".parquet"),
        (
            "flowers.tar",
            tar_bytes({"daisy/1.jpg": b"\xff\xd8jpeg", "rose/2.png": b"\x89PNG"}),
            "image_folder",
            ".tar",
        ),
        ("shards.zip", zip_bytes({"part-0.tfrecord": b"x", "part-1.tfrecord": b"y"}), "tfrecord", ".zip"),
        ("cols.zip", zip_bytes({"a/part-0.parquet": b"x"}), "parquet", ".zip"),
    ],
)
def test_new_kinds_are_kept_as_sent_and_validated_by_a_worker(
    client: TestClient, settings: Settings, filename: str, data: bytes, fmt: str, ext: str
) -> None:
    response = post_file(client, filename, data)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "validating" and body["format"] == fmt
    assert body["source"] is None and body["size_bytes"] == len(data)
    assert body["n_samples"] is None and body["arrays"] is None and body["shards"] is None
    assert body["error"] is None
    stored = settings.data_dir / "datasets" / body["id"] / f"upload{ext}"
    assert stored.read_bytes() == data
    assert [(t.task, t.args) for t in sent_tasks(settings)] == [(VALIDATE_DATASET, [body["id"]])]
    assert client.get(f"/v1/datasets/{body['id']}").json() == body
    if ext == ".tfrecord.gz":
        assert record_of(client, body["id"]).description["compression"] == "GZIP"  # type: ignore[index]


def test_small_npz_is_ready_at_once_as_before(client: TestClient, settings: Settings) -> None:
    body = upload_dataset(client)
    assert (body["status"], body["format"], body["n_samples"]) == ("ready", "npz", 12)
    assert sent_tasks(settings) == []


def test_large_npz_goes_to_the_worker_for_conversion(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, min_free_bytes=0, convert_above_bytes=100)
    data = npz_bytes(**dataset_arrays(n=12))
    with TestClient(create_app(settings)) as client:
        body = post_file(client, "big.npz", data).json()
        assert (body["status"], body["format"], body["arrays"]) == ("validating", "npz", None)
        assert (settings.data_dir / "datasets" / body["id"] / "upload.npz").read_bytes() == data
        assert [t.task for t in sent_tasks(settings)] == [VALIDATE_DATASET]
        assert_problem(post_file(client, "big.npz", b"not a zip at all" * 10), 415)


def test_description_travels_to_the_worker(client: TestClient) -> None:
    description = {
        "format": "tfrecord",
        "features": {
            "image": {"kind": "fixed", "dtype": "string", "shape": []},
            "label": {"kind": "fixed", "dtype": "int64", "shape": [], "default": 0},
            "tags": {"kind": "var_len", "dtype": "string"},
        },
        "inputs": {"x": {"feature": "image", "decode": {"image": "png", "channels": 1}}},
        "label": "label",
    }
    response = post_file(client, "mnist.tfrecord", tfrecord_bytes(b"r"), description, name="mnist")
    assert response.status_code == 201, response.text
    record = record_of(client, response.json()["id"])
    assert record.name == "mnist"
    assert record.description == {
        "compression": None,
        "features": {
            "image": {"kind": "fixed", "dtype": "string", "shape": [], "default": None},
            "label": {"kind": "fixed", "dtype": "int64", "shape": [], "default": 0},
            "tags": {"kind": "var_len", "dtype": "string", "shape": [], "default": None},
        },
        "inputs": {
            "x": {
                "feature": "image",
                "column": None,
                "shape": None,
                "decode": {"image": "png", "channels": 1},
            }
        },
        "label": "label",
    }


@pytest.mark.parametrize(
    ("description", "words"),
    [
        ("{not json", "description"),
        ({"lable": "y"}, "description.lable"),
        ({"format": "csv"}, "description.format"),
        ({"features": {"a": {"kind": "fixed", "dtype": "float64"}}}, "description.features.a.dtype"),
        ({"features": {"a": {"kind": "var_len", "dtype": "int64", "shape": [3]}}}, "var_len"),
        ({"inputs": {"x": {"feature": "a", "column": "b"}}}, "exactly one"),
        ({"inputs": {"x": {"feature": "a", "decode": {"image": "gif"}}}}, "decode.image"),
        ({"features": {"a": {"kind": "fixed", "dtype": "int64"}}, "label": "b"}, "label 'b'"),
        ({"format": "parquet"}, "description.format 'parquet' does not match"),
        ({"compression": "GZIP", "format": "parquet"}, "compression applies to TFRecord"),
    ],
)
def test_bad_descriptions_are_422_naming_the_field(
    client: TestClient, settings: Settings, description: Any, words: str
) -> None:
    body = assert_problem(post_file(client, "d.tfrecord", tfrecord_bytes(b"r"), description), 422)
    assert words in body["detail"], body
    assert files_under(settings.data_dir / "datasets") == [] and sent_tasks(settings) == []


@pytest.mark.parametrize(
    ("filename", "data", "status", "words"),
    [
        ("data.csv", b"a,b\n1,2\n", 415, "accepted: an .npz"),
        ("noext", b"whatever", 415, "accepted"),
        ("t.parquet", b"PAR1 truncated", 415, "PAR1"),
        ("t.tfrecord", struct.pack("<Q", 10**9) + b"\0" * 12, 415, "not a TFRecord"),
        ("t.tfrecord.gz", tfrecord_bytes(b"r"), 415, "not gzip"),
        ("evil.zip", zip_bytes({"../escape/1.jpg": b"x"}), 422, ".."),
        ("abs.tar", tar_bytes({"/etc/cron.d/x.tfrecord": b"x"}), 422, "absolute"),
        ("link.tar", tar_bytes({"a/1.jpg": b"x"}, links={"b/2.jpg": "/etc/passwd"}), 422, "link"),
        ("mixed.zip", zip_bytes({"notes.txt": b"x", "data.bin": b"y"}), 422, "description"),
        ("fake.zip", b"not a zip file at all", 415, "not a zip or tar"),
    ],
)
def test_refused_uploads_keep_nothing(
    client: TestClient, settings: Settings, filename: str, data: bytes, status: int, words: str
) -> None:
    body = assert_problem(post_file(client, filename, data), status)
    assert words in body["detail"], body
    assert files_under(settings.data_dir / "datasets") == []
    assert files_under(settings.data_dir / "tmp") == []
    assert sent_tasks(settings) == []


def test_archive_bomb_is_refused(client: TestClient, settings: Settings) -> None:
    data = zip_bytes({f"c/{i}.png": b"\0" * (1 << 20) for i in range(4)})  # 4 MiB of zeros: ratio ~1000
    body = assert_problem(post_file(client, "bomb.zip", data), 413)
    assert "decompression bomb" in body["detail"]


def test_archive_with_unguessable_content_takes_an_explicit_format(client: TestClient) -> None:
    data = zip_bytes({"train/part-0": b"x", "train/part-1": b"y"})
    response = post_file(client, "shards.zip", data, {"format": "tfrecord", "compression": "GZIP"})
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "tfrecord"


def test_idempotent_upload_of_a_new_kind(client: TestClient, settings: Settings) -> None:
    data = tfrecord_bytes(b"r")
    headers = {"Idempotency-Key": "up-1"}
    first = client.post("/v1/datasets", files={"file": ("a.tfrecord", data)}, headers=headers)
    again = client.post("/v1/datasets", files={"file": ("a.tfrecord", data)}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert len(sent_tasks(settings)) == 1


def test_delete_while_validating_removes_the_upload(client: TestClient, settings: Settings) -> None:
    body = post_file(client, "a.parquet", parquet_bytes()).json()
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert files_under(settings.data_dir / "datasets") == []
    assert_problem(client.get(f"/v1/datasets/{body['id']}"), 404)
    with session_scope(app_of(client).state.session_factory) as session:  # the worker then finds it gone
        assert not dataset_status.begin_dataset_validation(session, body["id"], 3)
        assert not dataset_status.set_dataset_result(
            session, body["id"], status="invalid", error={"code": "x", "message": "y"}
        )


# --- references ---------------------------------------------------------------------------------------------


def register(client: TestClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/datasets", json=body, headers=headers)


@pytest.mark.parametrize(
    "source",
    [
        "s3://data/team-a/mnist/",
        "s3://data/team-a/mnist/part-00000.tfrecord",
        "s3://data/team-a",  # the allowed folder itself
        "file:///mnt/datasets/flowers/",
        "s3://public/shared/x/",  # the "*" entry applies to every tenant
    ],
)
def test_reference_under_an_allowed_prefix(client: TestClient, settings: Settings, source: str) -> None:
    response = register(client, {"source": source, "format": "tfrecord", "label": "label"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["format"], body["source"]) == ("validating", "tfrecord", source)
    assert body["sha256"] is None and body["size_bytes"] is None and body["n_samples"] is None
    assert body["name"] == source
    assert response.headers["location"] == f"/v1/datasets/{body['id']}"
    assert [(t.task, t.args) for t in sent_tasks(settings)] == [(VALIDATE_DATASET, [body["id"]])]
    record = record_of(client, body["id"])
    assert record.description is not None and record.description["label"] == "label"
    assert record.dispatched_at is not None and record.attempts == 0
    assert files_under(settings.data_dir / "datasets") == []  # nothing of ours is stored for a reference


@pytest.mark.parametrize(
    "source",
    [
        "s3://data/team-a-evil/x/",  # a sibling sharing the prefix's characters, not its folder
        "s3://data/team-b/x/",  # another tenant's prefix
        "s3://data/",
        "s3://other-bucket/team-a/",
        "file:///mnt/datasets-old/x/",
        "file:///mnt/",
    ],
)
def test_reference_outside_the_allowed_prefixes_is_403(
    client: TestClient, settings: Settings, source: str
) -> None:
    body = assert_problem(register(client, {"source": source, "format": "parquet"}), 403)
    assert "SECATEURS_DATASET_SOURCES" in body["detail"] and source in body["detail"]
    assert client.get("/v1/datasets").json()["items"] == [] and sent_tasks(settings) == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"source": "file:///mnt/datasets/../../etc/", "format": "tfrecord"}, "'..'"),
        ({"source": "s3://data/team-a/./x/", "format": "tfrecord"}, "'.'"),
        ({"source": "s3://data/team-a//x/", "format": "tfrecord"}, "empty"),
        ({"source": "file:///mnt/datasets/%2e%2e/etc/", "format": "tfrecord"}, "percent"),
        ({"source": "s3://data/team-a/x?versionId=1", "format": "tfrecord"}, "'?'"),
        ({"source": "s3://data/team-a/x#frag", "format": "tfrecord"}, "'#'"),
        ({"source": "file://mnt/datasets/x/", "format": "tfrecord"}, "file:///"),
        ({"source": "http://data/team-a/", "format": "tfrecord"}, "s3://bucket/"),
        ({"source": "s3:///team-a/", "format": "tfrecord"}, "bucket"),
        ({"source": "/mnt/datasets/x/", "format": "tfrecord"}, "s3://bucket/"),
        ({"source": "s3://data/team-a/x/", "format": "csv"}, "format"),
        ({"source": "s3://data/team-a/x/"}, "format"),
        ({"format": "tfrecord"}, "source"),
        ({"source": "s3://data/team-a/x/", "format": "tfrecord", "bucket": "x"}, "bucket"),
        ({"source": "s3://data/team-a/x/", "format": "parquet", "compression": "GZIP"}, "compression"),
        ({"source": "s3://data/team-a/x/", "format": "parquet", "inputs": {"x": {"feature": "a"}}}, "column"),
    ],
)
def test_malformed_reference_is_422(client: TestClient, body: dict[str, Any], words: str) -> None:
    problem = assert_problem(register(client, body), 422)
    assert words in problem["detail"], problem
    assert problem["errors"]


def test_reference_body_that_is_not_an_object_is_422(client: TestClient) -> None:
    for raw in (b"[1, 2]", b"{not json"):
        response = client.post("/v1/datasets", content=raw, headers={"content-type": "application/json"})
        assert_problem(response, 422)


def test_no_setting_no_references(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, min_free_bytes=0)
    with TestClient(create_app(settings)) as client:
        body = assert_problem(register(client, {"source": "s3://data/team-a/", "format": "parquet"}), 403)
        assert "SECATEURS_DATASET_SOURCES is not set" in body["detail"]


def test_tenant_without_prefixes_is_403(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, min_free_bytes=0, dataset_sources={"other": ["s3://data/team-b/"]})
    with TestClient(create_app(settings)) as client:
        body = assert_problem(register(client, {"source": "s3://data/team-b/x/", "format": "parquet"}), 403)
        assert "tenant 'default'" in body["detail"]


def test_reference_idempotency(client: TestClient, settings: Settings) -> None:
    body = {"source": "s3://data/team-a/x/", "format": "parquet", "name": "tabular"}
    first = register(client, body, **{"Idempotency-Key": "ref-1"})
    again = register(client, dict(reversed(list(body.items()))), **{"Idempotency-Key": "ref-1"})
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert len(sent_tasks(settings)) == 1
    other = register(client, {**body, "name": "changed"}, **{"Idempotency-Key": "ref-1"})
    assert_problem(other, 422)


def test_source_checks_are_on_whole_segments() -> None:
    assert source_allowed("s3://data/team-a/x", ["s3://data/team-a/"])
    assert source_allowed("s3://data/team-a", ["s3://data/team-a/"])
    assert not source_allowed("s3://data/team-a-evil/x", ["s3://data/team-a/"])
    assert not source_allowed("s3://data/team", ["s3://data/team-a/"])
    assert normalise_source("s3://data") == "s3://data/"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        normalise_source("s3://data/a/..")


# --- settings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("{not json", "not valid JSON"),
        ('["s3://data/"]', "JSON object mapping a tenant"),
        ('{"default": "s3://data/"}', "JSON object mapping a tenant"),
        ('{"default": ["s3://data/team-a"]}', 'must end with "/"'),
        ('{"default": ["file://relative/"]}', "file:///"),
        ('{"default": ["https://data/x/"]}', "s3://bucket/"),
        ('{"default": ["s3://Bad_Bucket/x/"]}', "bucket"),
        ('{"default": ["file:///mnt/../etc/"]}', "'..'"),
        ('{"default": ["s3://data/x?a/"]}', "'?'"),
    ],
)
def test_bad_dataset_sources_refuse_to_start(monkeypatch: pytest.MonkeyPatch, raw: str, words: str) -> None:
    monkeypatch.setenv("SECATEURS_DATASET_SOURCES", raw)
    with pytest.raises(ValueError, match="SECATEURS_DATASET_SOURCES") as info:
        Settings()
    assert words in str(info.value)


def test_dataset_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECATEURS_DATASET_SOURCES", json.dumps(SOURCES))
    monkeypatch.setenv("SECATEURS_CONVERT_ABOVE_BYTES", "1000")
    settings = Settings()
    assert settings.dataset_sources == SOURCES and settings.convert_above_bytes == 1000
    monkeypatch.delenv("SECATEURS_DATASET_SOURCES")
    monkeypatch.delenv("SECATEURS_CONVERT_ABOVE_BYTES")
    defaults = Settings()
    assert defaults.dataset_sources == {}
    assert defaults.max_dataset_bytes == 16 * 2**30 and defaults.convert_above_bytes == 2**30
    assert (defaults.dataset_max_objects, defaults.dataset_shard_bytes) == (100_000, 128 * 2**20)
    assert defaults.dataset_cache_max_bytes == 20 * 2**30


# --- jobs on datasets ---------------------------------------------------------------------------------------


def ready_model(client: TestClient) -> str:
    model = upload_model(client)
    mark_model(app_of(client), model["id"], "ready", signatures=SIGNATURES)
    return model["id"]


def job(client: TestClient, model_id: str, spec: dict[str, Any] | None = None, **extra: Any) -> Any:
    return client.post(
        "/v1/jobs", json={"model_id": model_id, "spec": spec or {"target_sparsity": 0.5}, **extra}
    )


def test_job_on_a_pending_dataset_is_409_then_invalid_422_then_ready_202(client: TestClient) -> None:
    model_id = ready_model(client)
    dataset_id = register(
        client, {"source": "s3://data/team-a/x/", "format": "tfrecord", "label": "y"}
    ).json()["id"]
    spec = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}
    body = assert_problem(job(client, model_id, spec, train_dataset_id=dataset_id), 409)
    assert f"dataset {dataset_id} is validating; wait until its status is ready" in body["detail"]
    sessions = app_of(client).state.session_factory
    with session_scope(sessions) as session:
        assert dataset_status.begin_dataset_validation(session, dataset_id, 3)
        assert dataset_status.set_dataset_progress(session, dataset_id, "converting", 0.25)
    assert client.get(f"/v1/datasets/{dataset_id}").json()["progress"] == 0.25
    assert "is converting" in assert_problem(job(client, model_id, eval_dataset_id=dataset_id), 409)["detail"]

    other = register(client, {"source": "s3://data/team-a/bad/", "format": "tfrecord"}).json()["id"]
    with session_scope(sessions) as session:
        error = {"code": "record_unparsable", "message": "shard part-0 record 3 does not parse"}
        assert dataset_status.set_dataset_result(session, other, status="invalid", error=error)
    body = assert_problem(job(client, model_id, eval_dataset_id=other), 422)
    assert "shard part-0 record 3 does not parse" in body["detail"]

    manifest = {"root": "s3://data/team-a/x/", "format": "tfrecord", "shards": []}
    arrays = {"x": {"shape": [-1, 64], "dtype": "float32"}, "y": {"shape": [-1], "dtype": "int64"}}
    with session_scope(sessions) as session:
        assert dataset_status.set_dataset_result(
            session, dataset_id, status="ready", manifest=manifest, shards=4, arrays=arrays, size_bytes=4096
        )
    shown = client.get(f"/v1/datasets/{dataset_id}").json()
    assert (shown["status"], shown["shards"], shown["n_samples"], shown["size_bytes"]) == (
        "ready",
        4,
        None,
        4096,
    )
    assert shown["arrays"] == arrays and shown["progress"] == 1.0
    response = job(client, model_id, spec, train_dataset_id=dataset_id)
    assert response.status_code == 202, response.text


def test_ready_dataset_with_unknown_arrays_skips_the_fit_checks(client: TestClient) -> None:
    model_id = ready_model(client)
    dataset_id = register(client, {"source": "s3://data/team-a/x/", "format": "parquet"}).json()["id"]
    with session_scope(app_of(client).state.session_factory) as session:
        assert dataset_status.set_dataset_result(session, dataset_id, status="ready", manifest={"root": "x"})
    assert job(client, model_id, eval_dataset_id=dataset_id).status_code == 202


def test_fit_checks_still_apply_to_streamed_datasets(client: TestClient) -> None:
    model_id = ready_model(client)
    dataset_id = register(client, {"source": "s3://data/team-a/x/", "format": "tfrecord"}).json()["id"]
    arrays = {"x": {"shape": [-1, 32], "dtype": "float32"}, "y": {"shape": [-1], "dtype": "int64"}}
    with session_scope(app_of(client).state.session_factory) as session:
        dataset_status.set_dataset_result(
            session, dataset_id, status="ready", manifest={"root": "x"}, arrays=arrays
        )
    body = assert_problem(job(client, model_id, eval_dataset_id=dataset_id), 422)
    assert "does not fit" in body["detail"]


def test_unlabelled_streamed_train_dataset_says_how_to_label(client: TestClient) -> None:
    model_id = ready_model(client)
    dataset_id = register(client, {"source": "s3://data/team-a/x/", "format": "tfrecord"}).json()["id"]
    with session_scope(app_of(client).state.session_factory) as session:
        arrays = {"x": {"shape": [-1, 64], "dtype": "float32"}}
        dataset_status.set_dataset_result(
            session, dataset_id, status="ready", manifest={"root": "x"}, arrays=arrays
        )
    spec = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}
    body = assert_problem(job(client, model_id, spec, train_dataset_id=dataset_id), 422)
    assert '"label"' in body["detail"]


# --- spec fields --------------------------------------------------------------------------------------------

AUGMENT = [
    {"kind": "random_flip", "mode": "horizontal"},
    {"kind": "random_crop", "height": 24, "width": 24},
    {"kind": "random_rotation", "factor": 0.1},
    {"kind": "random_zoom", "height_factor": 0.2},
    {"kind": "random_translation", "height_factor": 0.1, "width_factor": 0.1},
    {"kind": "random_contrast", "factor": 0.2},
]


def test_augmentation_and_data_fields_are_kept_in_the_job_spec(client: TestClient) -> None:
    model_id = ready_model(client)
    train = upload_dataset(client)
    spec = {
        "target_sparsity": 0.5,
        "augmentation": AUGMENT,
        "on_bad_record": "skip",
        "fine_tune": {"epochs": 1, "steps_per_epoch": 50, "max_samples": 1000},
        "evaluation": {"max_samples": 500},
    }
    response = job(client, model_id, spec, train_dataset_id=train["id"])
    assert response.status_code == 202, response.text
    kept = response.json()["spec"]
    assert kept["augmentation"][3] == {"kind": "random_zoom", "height_factor": 0.2, "width_factor": None}
    assert kept["on_bad_record"] == "skip"
    assert (kept["fine_tune"]["steps_per_epoch"], kept["fine_tune"]["max_samples"]) == (50, 1000)
    assert kept["evaluation"]["max_samples"] == 500
    defaults = job(client, model_id).json()["spec"]
    assert (defaults["augmentation"], defaults["on_bad_record"]) == (None, "fail")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"augmentation": [{"kind": "random_blur", "factor": 0.1}]}, "random_blur"),
        ({"augmentation": [{"kind": "random_flip", "mode": "horizontal", "seed": 3}]}, "seed"),
        ({"augmentation": [{"kind": "random_flip"}]}, "mode"),
        ({"augmentation": [{"kind": "random_flip", "mode": "diagonal"}]}, "mode"),
        ({"augmentation": [{"kind": "random_crop", "height": 0, "width": 8}]}, "height"),
        ({"augmentation": [{"mode": "horizontal"}]}, "kind"),
        ({"on_bad_record": "ignore"}, "on_bad_record"),
        ({"fine_tune": {"steps_per_epoch": 0}}, "steps_per_epoch"),
        ({"fine_tune": {"max_samples": 0}}, "max_samples"),
        ({"evaluation": {"max_samples": 0}}, "max_samples"),
    ],
)
def test_bad_data_spec_fields_are_422_naming_them(
    client: TestClient, spec: dict[str, Any], words: str
) -> None:
    model_id = ready_model(client)
    train = upload_dataset(client)
    body = assert_problem(
        job(client, model_id, {"target_sparsity": 0.5, **spec}, train_dataset_id=train["id"]), 422
    )
    assert words in body["detail"], body


def test_augmentation_needs_a_train_dataset(client: TestClient) -> None:
    model_id = ready_model(client)
    spec = {"target_sparsity": 0.5, "augmentation": AUGMENT[:1]}
    body = assert_problem(job(client, model_id, spec), 422)
    assert "train_dataset_id" in body["detail"] and body["errors"][0]["loc"] == "spec.augmentation"


def test_published_spec_schema_has_the_new_fields(client: TestClient) -> None:
    schema = client.get("/v1/schemas/spec").json()
    assert {"augmentation", "on_bad_record"} <= schema["properties"].keys()
    assert "steps_per_epoch" in schema["$defs"]["FineTune"]["properties"]
    assert "max_samples" in schema["$defs"]["Evaluation"]["properties"]


def test_openapi_documents_both_dataset_bodies(client: TestClient) -> None:
    content = client.get("/openapi.json").json()["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert "description" in content["multipart/form-data"]["schema"]["properties"]
    reference = content["application/json"]["schema"]
    assert set(reference["required"]) == {"source", "format"}
    assert "$ref" not in json.dumps(reference)  # inlined: nothing dangles


# --- database and reaper ------------------------------------------------------------------------------------


@pytest.fixture
def sessions(store_sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    return store_sessions


def pending(session: Session, status: str = "validating", **values: Any) -> str:
    record = DatasetRecord(
        id=f"ds_{utcnow().timestamp():.6f}".replace(".", ""),
        name="d",
        format="tfrecord",
        status=status,
        **values,
    )
    session.add(record)
    session.flush()
    return record.id


def test_validation_attempts_are_capped(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as s:
        dataset_id = pending(s, source="s3://data/x/")
    for _ in range(2):
        with session_scope(sessions) as s:
            assert dataset_status.begin_dataset_validation(s, dataset_id, max_attempts=2)
    with session_scope(sessions) as s:
        assert not dataset_status.begin_dataset_validation(s, dataset_id, max_attempts=2)
        error = {"code": "worker_died", "message": "validating this dataset stopped the worker twice"}
        assert dataset_status.set_dataset_result(s, dataset_id, status="invalid", error=error)
    with session_scope(sessions) as s:
        record = s.get(DatasetRecord, dataset_id)
        assert record is not None and (record.status, record.attempts, record.error) == ("invalid", 2, error)
        assert not dataset_status.set_dataset_progress(s, dataset_id, "converting", 0.5)  # decided: no change
    with pytest.raises(ValueError, match="manifest"):
        dataset_status.set_dataset_result(Session(), "ds_x", status="ready")


def test_reaper_resends_pending_datasets_whose_message_is_old(sessions: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_scope(sessions) as s:
        old = pending(s, dispatched_at=now - timedelta(seconds=3600))
        converting = pending(s, "converting", dispatched_at=now - timedelta(seconds=3600))
        fresh = pending(s, dispatched_at=now)
        pending(s, "ready", dispatched_at=now - timedelta(seconds=3600))
    with session_scope(sessions) as s:
        reaped = jobs.reap(s, lease_seconds=60, max_attempts=3, redispatch_after_s=600)
    assert sorted(reaped.resend_datasets) == sorted([old, converting])
    with session_scope(sessions) as s:
        assert dataset_status.set_dataset_progress(s, old, "converting", 0.5)  # a live worker reports...
        jobs.mark_dispatched(s, dataset_ids=[converting])
    with session_scope(sessions) as s:
        reaped = jobs.reap(s, lease_seconds=60, max_attempts=3, redispatch_after_s=600)
    assert reaped.resend_datasets == []  # ...so its dataset is not sent twice
    with session_scope(sessions) as s:
        everything = jobs.reap(
            s, lease_seconds=60, max_attempts=3, redispatch_after_s=600, resend_all_queued=True
        )
    assert sorted(everything.resend_datasets) == sorted([old, converting, fresh])


def test_maintenance_sends_validate_dataset(client: TestClient, settings: Settings) -> None:
    dataset_id = register(client, {"source": "s3://data/team-a/x/", "format": "tfrecord"}).json()["id"]
    app = app_of(client)
    with session_scope(app.state.session_factory) as s:
        record = s.get(DatasetRecord, dataset_id)
        assert record is not None
        record.dispatched_at = utcnow() - timedelta(seconds=settings.redispatch_after_s + 1)
    storage = Storage(settings.data_dir)
    report = Maintenance(settings, app.state.celery, app.state.session_factory, storage).run_once()
    assert report.sent_datasets == [dataset_id]
    assert [t.task for t in sent_tasks(settings)] == [VALIDATE_DATASET, VALIDATE_DATASET]


def test_storage_keys_and_removal(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    assert storage.dataset_upload_key("ds_1", ".tfrecord.gz") == "datasets/ds_1/upload.tfrecord.gz"
    assert storage.dataset_shard_prefix("ds_1") == "datasets/ds_1/shards/"
    with pytest.raises(ValueError, match="extension"):
        storage.dataset_upload_key("ds_1", ".exe")
    shard = tmp_path / storage.dataset_shard_prefix("ds_1") / "part-00000.tfrecord"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"x")
    (tmp_path / storage.dataset_key("ds_1")).write_bytes(b"npz")
    storage.remove_dataset("ds_1")
    assert files_under(tmp_path / "datasets") == []


def test_old_databases_get_the_new_columns_and_nullable_ones(tmp_path: Path) -> None:
    """A datasets table from before issue 20 (NOT NULL sha256/arrays/...) is upgraded in place, rows kept."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    with old.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE datasets (id VARCHAR(64) PRIMARY KEY, tenant VARCHAR(64) DEFAULT 'default', "
            "name VARCHAR(256) NOT NULL, size_bytes BIGINT NOT NULL, sha256 VARCHAR(64) NOT NULL, "
            "arrays JSON NOT NULL, n_samples BIGINT NOT NULL, created_at DATETIME NOT NULL)"
        )
        conn.exec_driver_sql("CREATE INDEX ix_datasets_created ON datasets (created_at, id)")
        conn.exec_driver_sql(
            "INSERT INTO datasets VALUES ('ds_old', 'default', 'old.npz', 10, 'ab', '{\"x\": {}}', 5, "
            "'2026-01-01 00:00:00')"
        )
    old.dispose()
    engine = make_engine(url)
    init_db(engine)
    init_db(engine)  # idempotent
    columns = {c["name"]: c for c in inspect(engine).get_columns("datasets")}
    assert all(columns[name]["nullable"] for name in ("size_bytes", "sha256", "arrays", "n_samples"))
    assert {"format", "status", "manifest", "attempts", "dispatched_at"} <= columns.keys()
    assert {i["name"] for i in inspect(engine).get_indexes("datasets")} >= {"ix_datasets_created"}
    sessions = make_session_factory(engine)
    with session_scope(sessions) as s:
        kept = s.get(DatasetRecord, "ds_old")
        assert kept is not None
        assert (kept.format, kept.status, kept.attempts, kept.n_samples) == ("npz", "ready", 0, 5)
        s.add(
            DatasetRecord(id="ds_new", name="ref", format="parquet", status="validating", source="s3://d/x/")
        )
    engine.dispose()


def test_other_media_types_are_415_naming_both_bodies(client: TestClient) -> None:
    response = client.post("/v1/datasets", content=b"a,b", headers={"content-type": "text/csv"})
    body = assert_problem(response, 415)
    assert "multipart/form-data" in body["detail"] and "application/json" in body["detail"]
