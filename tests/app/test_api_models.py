"""POST/GET/DELETE /v1/models against the real app: SQLite, real storage, the embedded file broker."""

from __future__ import annotations

import gzip
import random
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.helpers import (
    RUN_JOB,
    SAVED_MODEL,
    SIGNATURES,
    VALIDATE_MODEL,
    app_of,
    assert_problem,
    create_job,
    files_under,
    keras_bytes,
    mark_model,
    multipart,
    saved_model_zip,
    sent_tasks,
    sha256,
    targz_bytes,
    upload_model,
    zip_bytes,
)


def assert_nothing_kept(client: TestClient, settings: Settings) -> None:
    """A refused upload leaves no record, no blob, no temp file and no task behind."""
    listing = client.get("/v1/models").json()
    assert listing == {"items": [], "next_cursor": None}
    assert files_under(settings.data_dir / "models") == []
    assert files_under(settings.data_dir / "tmp") == []
    assert sent_tasks(settings) == []


@pytest.fixture
def small_client(data_dir: Path) -> Iterator[tuple[TestClient, Settings]]:
    """An app that accepts models of at most 1000 bytes."""
    settings = Settings(data_dir=data_dir, min_free_bytes=0, max_model_bytes=1000)
    with TestClient(create_app(settings)) as client:
        yield client, settings


# --- accepted uploads -------------------------------------------------------------------------------------


def test_upload_saved_model_zip(client: TestClient, settings: Settings) -> None:
    data = saved_model_zip()
    response = client.post("/v1/models", files={"file": ("resnet.zip", data, "application/zip")})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("mdl_")
    assert body["name"] == "resnet.zip"
    assert body["format"] == "saved_model"
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == sha256(data)
    assert body["status"] == "validating"
    created = datetime.fromisoformat(body["created_at"])
    assert created.tzinfo is not None and created.utcoffset() is not None
    assert created.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert response.headers["location"] == f"/v1/models/{body['id']}"

    stored = files_under(settings.data_dir / "models" / body["id"])
    assert len(stored) == 1 and stored[0].read_bytes() == data
    assert files_under(settings.data_dir / "tmp") == []

    tasks = sent_tasks(settings)
    assert [(t.task, t.args, t.queue) for t in tasks] == [(VALIDATE_MODEL, [body["id"]], "secateurs")]


def test_upload_takes_the_optional_name_field(client: TestClient) -> None:
    body = upload_model(client, name="my classifier")
    assert body["name"] == "my classifier"
    assert client.get(f"/v1/models/{body['id']}").json()["name"] == "my classifier"


def test_long_name_is_cut_to_256_characters(client: TestClient) -> None:
    assert upload_model(client, name="n" * 300)["name"] == "n" * 256


def test_name_longer_than_the_text_limit_is_400(client: TestClient, settings: Settings) -> None:
    response = client.post(
        "/v1/models", files={"file": ("m.zip", saved_model_zip())}, data={"name": "n" * 5000}
    )
    body = assert_problem(response, 400)
    assert "'name'" in body["detail"]
    assert_nothing_kept(client, settings)


def test_client_file_path_is_reduced_to_a_display_name(client: TestClient, settings: Settings) -> None:
    body = upload_model(client, filename="../../etc/cron.d/model.zip")
    assert body["name"] == "model.zip"
    stored = files_under(settings.data_dir)
    assert all(p.is_relative_to(settings.data_dir) for p in stored)
    assert [p.relative_to(settings.data_dir).as_posix() for p in stored if "models" in p.parts] == [
        f"models/{body['id']}/upload.zip"
    ]


@pytest.mark.parametrize("top", ["", "export"], ids=["at-root", "in-top-folder"])
def test_upload_saved_model_tar_gz(client: TestClient, settings: Settings, top: str) -> None:
    data = targz_bytes(SAVED_MODEL, top=top)
    response = client.post("/v1/models", files={"file": ("model.tar.gz", data)})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "saved_model"
    assert body["sha256"] == sha256(data)
    assert body["size_bytes"] == len(data)
    assert [(t.task, t.args) for t in sent_tasks(settings)] == [(VALIDATE_MODEL, [body["id"]])]


def test_upload_zip_with_single_top_folder(client: TestClient) -> None:
    data = zip_bytes({f"my_model/{k}": v for k, v in SAVED_MODEL.items()})
    body = upload_model(client, data)
    assert body["format"] == "saved_model"


def test_upload_keras_file(client: TestClient, settings: Settings) -> None:
    data = keras_bytes()
    response = client.post("/v1/models", files={"file": ("net.keras", data)})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "keras"
    assert body["status"] == "validating"
    assert body["sha256"] == sha256(data)
    assert [(t.task, t.args) for t in sent_tasks(settings)] == [(VALIDATE_MODEL, [body["id"]])]


def test_keras_zip_without_keras_name_is_checked_as_a_saved_model(client: TestClient) -> None:
    """Only the .keras suffix makes a zip a Keras file; otherwise it must hold saved_model.pb."""
    body = assert_problem(client.post("/v1/models", files={"file": ("net.zip", keras_bytes())}), 422)
    assert "saved_model.pb" in body["detail"]
    assert ".keras" in body["detail"]  # the hint names the fix


# --- read, list, delete -----------------------------------------------------------------------------------


def test_get_model_returns_the_upload(client: TestClient) -> None:
    created = upload_model(client)
    response = client.get(f"/v1/models/{created['id']}")
    assert response.status_code == 200
    got = response.json()
    for key in ("id", "name", "format", "size_bytes", "sha256", "status", "created_at"):
        assert got[key] == created[key]


def test_get_model_after_worker_verdict_shows_signatures(client: TestClient) -> None:
    created = upload_model(client)
    mark_model(app_of(client), created["id"], "ready", signatures=SIGNATURES)
    got = client.get(f"/v1/models/{created['id']}").json()
    assert got["status"] == "ready"
    assert got["signatures"] == SIGNATURES
    assert got["params"] == 1234
    assert got["error"] is None


@pytest.mark.parametrize("model_id", ["mdl_00000000000000000000", "not an id", "x" * 80])
def test_get_unknown_model_is_404(client: TestClient, model_id: str) -> None:
    body = assert_problem(client.get(f"/v1/models/{model_id}"), 404)
    assert "GET /v1/models" in body["detail"]


def test_list_is_newest_first_and_pages_cover_everything(client: TestClient) -> None:
    ids = [upload_model(client, name=f"m{i}")["id"] for i in range(5)]

    everything = client.get("/v1/models").json()
    assert [m["id"] for m in everything["items"]] == ids[::-1]
    assert everything["next_cursor"] is None

    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/models", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) <= 2
        seen += [m["id"] for m in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10, "pagination does not end"
    assert pages == 3
    assert seen == ids[::-1]
    assert len(set(seen)) == 5


@pytest.mark.parametrize("cursor", ["garbage!!", "bm90LWpzb24", "WzEsMiwzXQ"])
def test_bad_cursor_is_400(client: TestClient, cursor: str) -> None:
    upload_model(client)
    body = assert_problem(client.get("/v1/models", params={"cursor": cursor}), 400)
    assert "cursor" in body["detail"]


@pytest.mark.parametrize("limit", [0, -1, 201, "many"])
def test_bad_limit_is_422(client: TestClient, limit: int | str) -> None:
    body = assert_problem(client.get("/v1/models", params={"limit": limit}), 422)
    assert [e["loc"] for e in body["errors"]] == ["query.limit"]


def test_delete_model(client: TestClient, settings: Settings) -> None:
    created = upload_model(client)
    assert files_under(settings.data_dir / "models" / created["id"])

    response = client.delete(f"/v1/models/{created['id']}")
    assert response.status_code == 204
    assert response.content == b""

    assert_problem(client.get(f"/v1/models/{created['id']}"), 404)
    assert_problem(client.delete(f"/v1/models/{created['id']}"), 404)
    assert client.get("/v1/models").json()["items"] == []
    assert files_under(settings.data_dir / "models") == []


def test_delete_model_used_by_a_queued_job_is_409(client: TestClient) -> None:
    model = upload_model(client)
    job = create_job(client, model["id"])

    body = assert_problem(client.delete(f"/v1/models/{model['id']}"), 409)
    assert "cancel" in body["detail"]
    assert client.get(f"/v1/models/{model['id']}").status_code == 200

    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204


# --- refused uploads: the right 4xx problem, and nothing kept ---------------------------------------------


REFUSED_FILES = {
    "random-bytes": ("model.zip", bytes(range(256)) * 4, 415, "not a zip or gzip"),
    "hdf5": ("model.h5", b"\x89HDF\r\n\x1a\n" + bytes(100), 415, "HDF5"),
    "plain-tar": ("model.tar", bytes(257) + b"ustar" + bytes(250), 415, "uncompressed tar"),
    "keras-name-not-zip": ("model.keras", b"\x1f\x8b" + bytes(100), 415, ".keras"),
    "zip-without-saved-model-pb": (
        "model.zip",
        zip_bytes({"variables/variables.index": b"i", "README": b"hello"}),
        422,
        "saved_model.pb",
    ),
    "zip-dotdot-path": ("model.zip", zip_bytes({**SAVED_MODEL, "../evil.sh": b"rm -rf"}), 422, ".."),
    "zip-absolute-path": ("model.zip", zip_bytes({**SAVED_MODEL, "/etc/passwd": b"x"}), 422, "absolute"),
    "targz-dotdot-path": ("m.tar.gz", targz_bytes({**SAVED_MODEL, "../../evil": b"x"}), 422, ".."),
    "saved-model-too-deep": (
        "model.zip",
        zip_bytes({f"a/b/{k}": v for k, v in SAVED_MODEL.items()}),
        422,
        "saved_model.pb",
    ),
    "corrupt-zip": ("model.zip", saved_model_zip()[:-40], 422, "zip"),
    "gzip-not-tar": ("model.tar.gz", gzip.compress(b"just some text, not a tar" * 20), 422, "tar"),
    "tar-symlink": (
        "model.tar.gz",
        targz_bytes(SAVED_MODEL, links={"variables/escape": "/etc/passwd"}),
        422,
        "symbolic link",
    ),
    "zip-bomb": ("model.zip", saved_model_zip(zeros=bytes(4 << 20)), 413, "decompression bomb"),
    "keras-without-config": ("net.keras", zip_bytes({"model.weights.h5": b"w"}), 422, "config.json"),
}


@pytest.mark.parametrize("case", list(REFUSED_FILES), ids=list(REFUSED_FILES))
def test_refused_file_gives_problem_and_keeps_nothing(
    client: TestClient, settings: Settings, case: str
) -> None:
    filename, data, status, words = REFUSED_FILES[case]
    body = assert_problem(client.post("/v1/models", files={"file": (filename, data)}), status)
    assert words in body["detail"]
    assert_nothing_kept(client, settings)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"file": "model.zip"}', "application/json"),
        (saved_model_zip(), "application/zip"),
        (b"file=model.zip", "application/x-www-form-urlencoded"),
        (b"--x--\r\n", "multipart/form-data"),  # no boundary parameter
    ],
    ids=["json", "raw-zip", "urlencoded", "no-boundary"],
)
def test_not_multipart_is_415(
    client: TestClient, settings: Settings, content: bytes, content_type: str
) -> None:
    response = client.post("/v1/models", content=content, headers={"content-type": content_type})
    body = assert_problem(response, 415)
    assert "multipart/form-data" in body["detail"]
    assert_nothing_kept(client, settings)


def test_no_content_type_is_415(client: TestClient, settings: Settings) -> None:
    body = assert_problem(client.post("/v1/models"), 415)
    assert "multipart" in body["detail"]
    assert_nothing_kept(client, settings)


BAD_FORMS: dict[str, tuple[list[tuple[str, str | None, bytes]], str]] = {
    "missing-file-field": ([("name", None, b"my model")], "no 'file' field"),
    "unknown-text-field": (
        [("file", "model.zip", saved_model_zip()), ("colour", None, b"blue")],
        "unknown form field 'colour'",
    ),
    "unknown-file-field": (
        [("file", "model.zip", saved_model_zip()), ("extra", "b.zip", b"PK")],
        "unexpected file in form field 'extra'",
    ),
    "two-files": (
        [("file", "a.zip", saved_model_zip()), ("file", "b.zip", saved_model_zip())],
        "more than one 'file'",
    ),
    "name-twice": (
        [("name", None, b"a"), ("name", None, b"b"), ("file", "a.zip", saved_model_zip())],
        "more than once",
    ),
    "empty-file": ([("file", "model.zip", b"")], "empty"),
}


@pytest.mark.parametrize("case", list(BAD_FORMS), ids=list(BAD_FORMS))
def test_malformed_form_is_400(client: TestClient, settings: Settings, case: str) -> None:
    parts, words = BAD_FORMS[case]
    content, content_type = multipart(parts)
    response = client.post("/v1/models", content=content, headers={"content-type": content_type})
    body = assert_problem(response, 400)
    assert words in body["detail"]
    assert_nothing_kept(client, settings)


def test_body_cut_before_closing_boundary_is_400(client: TestClient, settings: Settings) -> None:
    content, content_type = multipart([("file", "model.zip", saved_model_zip())])
    cut = content[: content.rindex(b"--b0undary-xyz--")]
    body = assert_problem(client.post("/v1/models", content=cut, headers={"content-type": content_type}), 400)
    assert "closing boundary" in body["detail"]
    assert_nothing_kept(client, settings)


def test_too_large_by_content_length_is_413(small_client: tuple[TestClient, Settings]) -> None:
    client, settings = small_client
    data = saved_model_zip(padding=random.Random(0).randbytes(100_000))
    assert len(data) > 1000 + 4096 + 64 * 1024  # past the whole-body limit: refused from Content-Length
    body = assert_problem(client.post("/v1/models", files={"file": ("big.zip", data)}), 413)
    assert "limit" in body["detail"]
    assert body["limit_bytes"] == 1000
    assert_nothing_kept(client, settings)


def test_too_large_while_streaming_is_413(small_client: tuple[TestClient, Settings]) -> None:
    """Without Content-Length (chunked), the receiver stops at the limit and removes the partial file."""
    client, settings = small_client
    content, content_type = multipart([("file", "big.zip", saved_model_zip(padding=bytes(5000)))])

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(content), 512):
            yield content[i : i + 512]

    response = client.post("/v1/models", content=chunks(), headers={"content-type": content_type})
    assert_problem(response, 413)
    assert_nothing_kept(client, settings)


def test_just_under_the_limit_is_accepted(data_dir: Path) -> None:
    data = saved_model_zip()
    settings = Settings(data_dir=data_dir, min_free_bytes=0, max_model_bytes=len(data))
    with TestClient(create_app(settings)) as client:
        assert upload_model(client, data)["size_bytes"] == len(data)
        assert_problem(client.post("/v1/models", files={"file": ("m.zip", data + b"\0")}), 413)


def test_low_disk_is_507_and_keeps_nothing(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, min_free_bytes=2**62)
    with TestClient(create_app(settings)) as client:
        body = assert_problem(client.post("/v1/models", files={"file": ("m.zip", saved_model_zip())}), 507)
        assert "free disk" in body["detail"]
        assert_nothing_kept(client, settings)


def test_refusal_between_good_uploads_does_not_disturb_them(client: TestClient, settings: Settings) -> None:
    first = upload_model(client)
    assert_problem(client.post("/v1/models", files={"file": ("bad.zip", b"nope" * 10)}), 415)
    second = upload_model(client)
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == [second["id"], first["id"]]
    assert sorted(t.args[0] for t in sent_tasks(settings) if t.task == VALIDATE_MODEL) == sorted(
        [first["id"], second["id"]]
    )
    assert not [t for t in sent_tasks(settings) if t.task == RUN_JOB]
