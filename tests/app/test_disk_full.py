"""A full disk during an upload: 507 problem+json, and nothing left behind (no temp file, no blob, no record, no
task, no held Idempotency-Key). ENOSPC cannot be provoked on this machine's disk, so the writes fail the way a
full disk makes them fail: write(2) stores what still fits, then ENOSPC."""

from __future__ import annotations

import errno
import os
import sqlite3
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from app.api import multipart as multipart_module
from app.archive import extract_archive
from app.config import Settings
from app.db import records
from app.disk import free_bytes, is_disk_full
from app.errors import InsufficientStorage
from app.main import create_app
from tests.app.helpers import (
    assert_problem,
    files_under,
    npz_bytes,
    saved_model_zip,
    sent_tasks,
)

MiB = 2**20


def big_model() -> bytes:
    return saved_model_zip(**{"variables/big": os.urandom(3 * MiB)})


def big_dataset() -> bytes:
    rng = np.random.default_rng(0)
    return npz_bytes(x=rng.normal(size=(12_000, 64)).astype(np.float32), y=np.zeros(12_000, np.int64))


UPLOADS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "models": ("model.zip", big_model),
    "datasets": ("train.npz", big_dataset),
}


class FillingFile:
    """A file on a disk with ``room`` bytes left: a write stores what fits, then fails with ENOSPC."""

    def __init__(self, inner: Any, room: int) -> None:
        self.inner = inner
        self.room = room

    def write(self, data: bytes) -> int:
        fits = min(len(data), self.room)
        self.inner.write(data[:fits])
        self.room -= fits
        if fits < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fits

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, min_free_bytes=0)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """Every upload's temp file gets ``room`` bytes, then the disk is full."""
    opened = multipart_module._FormReceiver._on_headers_finished

    def on_headers_finished(self: multipart_module._FormReceiver) -> None:
        opened(self)
        if self.out is not None and not isinstance(self.out, FillingFile):
            self.out = FillingFile(self.out, room)  # type: ignore[assignment]

    monkeypatch.setattr(multipart_module._FormReceiver, "_on_headers_finished", on_headers_finished)


def post(client: TestClient, kind: str, key: str | None = None) -> Any:
    filename, make = UPLOADS[kind]
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(f"/v1/{kind}", files={"file": (filename, make())}, headers=headers)


def assert_nothing_left(client: TestClient, settings: Settings, kind: str) -> None:
    assert client.get(f"/v1/{kind}").json()["items"] == []
    for folder in ("tmp", "models", "datasets"):
        assert files_under(settings.data_dir / folder) == [], folder
    assert [p for p in (settings.data_dir / "models").iterdir()] == []  # no empty model directory either
    assert sent_tasks(settings) == []


@pytest.mark.parametrize("kind", UPLOADS)
def test_enospc_mid_upload_is_507_and_leaves_nothing(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    fill_disk_after(monkeypatch, room=MiB + MiB // 2)  # part of the file is on disk when it fills

    body = assert_problem(post(client, kind, key="retry-me"), 507)

    assert "disk" in body["detail"] and "nothing was kept" in body["detail"]
    assert_nothing_left(client, settings, kind)
    monkeypatch.undo()  # space was freed: the same Idempotency-Key runs the upload afresh, not a replay
    retried = post(client, kind, key="retry-me")
    assert retried.status_code == 201, retried.text
    assert "idempotent-replayed" not in retried.headers


@pytest.mark.parametrize("kind", UPLOADS)
def test_enospc_at_the_last_flush_or_fsync_is_507_and_leaves_nothing(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Filesystems with delayed allocation report a full disk only when the data is forced out."""

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(multipart_module.os, "fsync", fsync)
    assert_problem(post(client, kind), 507)
    assert_nothing_left(client, settings, kind)


def test_no_inode_left_for_the_temp_file_is_507(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(multipart_module.tempfile, "mkstemp", mkstemp)
    assert_problem(post(client, "models"), 507)
    assert_nothing_left(client, settings, "models")


@pytest.mark.parametrize("kind", UPLOADS)
def test_a_full_database_keeps_no_blob(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The upload is moved into place, then recording it fails (SQLite: "database or disk is full"): the blob
    is removed again, and the answer is a problem, not a half-created resource."""

    def add(session: Any, record: Any) -> Any:
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = 13  # type: ignore[attr-defined]
        raise OperationalError("INSERT INTO ...", {}, error)

    monkeypatch.setattr(records, "add", add)
    response = post(client, kind)
    body = assert_problem(response, 507)  # not 503 "retry shortly": retrying cannot help until space is freed
    assert "disk is full" in body["detail"]
    assert_nothing_left(client, settings, kind)


def test_is_disk_full_recognises_every_way_it_surfaces() -> None:
    sqlite_full = sqlite3.OperationalError("database or disk is full")
    sqlite_full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    sqlite_locked = sqlite3.OperationalError("database is locked")
    sqlite_locked.sqlite_errorcode = 5  # type: ignore[attr-defined]

    class PgDiskFull(Exception):
        sqlstate = "53100"

    wrapped = InsufficientStorage("x")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(wrapped)
    assert is_disk_full(OperationalError("INSERT", {}, sqlite_full))
    assert is_disk_full(OperationalError("INSERT", {}, PgDiskFull()))
    assert not is_disk_full(OperationalError("INSERT", {}, sqlite_locked))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("no"))


def test_extraction_that_fills_the_disk_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's extraction (app.archive) builds in a staging directory: on ENOSPC it is all removed."""
    archive = tmp_path / "upload.zip"
    archive.write_bytes(big_model())
    dest = tmp_path / "models" / "mdl_1" / "saved_model"
    real_fdopen = os.fdopen

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = real_fdopen(fd, mode, *args, **kwargs)
        return FillingFile(file, MiB) if "w" in mode else file

    monkeypatch.setattr("app.archive.os.fdopen", fdopen)
    with pytest.raises(InsufficientStorage):
        extract_archive(archive, dest)
    monkeypatch.undo()
    assert list(dest.parent.iterdir()) == []  # no staging directory, no half-extracted model
    with zipfile.ZipFile(archive) as zf:  # and the upload itself is untouched
        assert zf.testzip() is None


def test_free_bytes(tmp_path: Path) -> None:
    free = free_bytes(tmp_path)
    assert 0 < free <= os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
