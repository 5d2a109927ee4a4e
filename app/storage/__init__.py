"""Blob storage (the data directory, or a remote store) and the streamed multipart upload receiver.

:class:`Storage` is the one object routes, retention and workers use: the data directory's layout (uploads in
flight, a worker's scratch space) and, behind it, the blob store ``SECATEURS_STORAGE_URL`` chooses
(``app.storage.blobs``): with none, blobs are the data directory's files as they always were; with
``s3://...``, the API and workers share no disk and blobs travel through the store (workers keep a
content-addressed cache, ``app.storage.cache``).

Paths are built only from ids we generated (checked against ``ID_PATTERN``), never from user input.
Uploads go straight from ``request.stream()`` through python-multipart's low-level ``MultipartParser`` into a
temp file on the same filesystem as their destination, hashed on the way, so a multi-GB upload costs about one
flush buffer of memory and is moved into place with one atomic ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import InsufficientStorage, NotFound, PayloadTooLarge, UnsupportedMediaType, UploadError
from app.storage.blobs import BlobStore, LocalBlobStore, open_blob_store
from app.storage.cache import BlobCache

if TYPE_CHECKING:
    from app.config import Settings

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# File data is handed to a worker thread (write + sha256) in batches of about this size: bounds memory and
# keeps disk I/O and hashing off the event loop without a thread hop per 64 KiB network chunk.
_FLUSH_BYTES = 1 << 20
# Boundaries, part headers and epilogue on top of the file and text fields; anything beyond is not a form.
_FRAMING_ALLOWANCE = 64 << 10
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# A full disk, or the service account's quota used up: either way nothing more can be written.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"
_PG_DISK_FULL = "53100"  # SQLSTATE disk_full


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` is a full disk however it surfaced: an OSError from a write, or a database driver's
    error (SQLite's SQLITE_FULL, PostgreSQL's SQLSTATE 53100), also when wrapped (SQLAlchemy's ``.orig``,
    ``raise ... from``). Such a failure deserves 507 and "free some space", not 503 "retry shortly"."""
    current: BaseException | None = exc
    for _ in range(8):  # a short chain; never loops on a cycle
        if current is None:
            return False
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if getattr(current, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if getattr(current, "sqlstate", None) == _PG_DISK_FULL:
            return True
        current = getattr(current, "orig", None) or current.__cause__
    return False


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path``, so uploads are refused (507) before the disk fills."""
    return shutil.disk_usage(path).free


class Storage:
    """The data directory's layout: models/<id>/, datasets/<id>.npz, jobs/<id>/, tmp/ (uploads in flight),
    and the blob store behind it (local: these same files; remote: the keys below, named the same way)."""

    def __init__(
        self, root: Path | str, blobs: BlobStore | None = None, cache: BlobCache | None = None
    ) -> None:
        self.root = Path(root).resolve()
        self.blobs: BlobStore = blobs if blobs is not None else LocalBlobStore(self.root)
        self.cache = cache
        self.models_dir = self.root / "models"
        self.datasets_dir = self.root / "datasets"
        self.jobs_dir = self.root / "jobs"
        self.tmp_dir = self.root / "tmp"  # same filesystem as the others, so commits are atomic renames
        for d in (self.models_dir, self.datasets_dir, self.jobs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def model_dir(self, model_id: str) -> Path:
        return self.models_dir / _checked_id(model_id, "model")

    def dataset_path(self, dataset_id: str) -> Path:
        return self.datasets_dir / f"{_checked_id(dataset_id, 'dataset')}.npz"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / _checked_id(job_id, "job")

    @classmethod
    def from_settings(cls, settings: Settings, *, worker: bool = False) -> Storage:
        """The configured store; ``worker`` adds the blob cache a remote store needs."""
        blobs = open_blob_store(settings)
        cache = None
        if worker and not isinstance(blobs, LocalBlobStore):
            cache = BlobCache(settings.cache_dir or settings.data_dir / "cache", settings.cache_max_bytes)
        return cls(settings.data_dir, blobs, cache)

    @property
    def remote(self) -> bool:
        """Blobs live elsewhere than this host's data directory (then nothing here is shared)."""
        return not (isinstance(self.blobs, LocalBlobStore) and self.blobs.root == self.root)

    # --- keys: relative, built from our ids only --------------------------------------------------------

    def model_key(self, model_id: str, filename: str) -> str:
        return f"models/{_checked_id(model_id, 'model')}/{filename}"

    def dataset_key(self, dataset_id: str) -> str:
        return f"datasets/{_checked_id(dataset_id, 'dataset')}.npz"

    def job_key(self, job_id: str, file: str) -> str:
        return f"jobs/{_checked_id(job_id, 'job')}/{file}"

    # --- blobs ------------------------------------------------------------------------------------------

    def commit_upload(self, upload: Upload, key: str) -> None:
        """Keep a received (and checked) upload under ``key``: a rename into the data directory, or a streamed
        multipart upload into the remote store (the temp file goes either way)."""
        if not self.remote:
            upload.commit(self.root / key)
            return
        try:
            self.blobs.put_file(key, upload.path)
        finally:
            upload.discard()
        upload.committed = True

    def open_blob(self, key: str) -> BinaryIO:
        """A reader over a stored blob; FileNotFoundError when it is not there, StoreUnavailable when the
        store does not answer."""
        return self.blobs.open(key)

    def local_blob(self, key: str, sha256: str, suffix: str = "") -> Path:
        """A path on this host holding ``key``'s bytes: the data directory's file, or the worker cache's copy
        (fetched once per host, checked against ``sha256``)."""
        if not self.remote:
            return self.root / key
        if self.cache is None:
            raise RuntimeError(
                "a remote blob store needs a cache to read blobs as files (Storage.from_settings)"
            )
        return self.cache.get(self.blobs, key, sha256, suffix)

    def publish(self, key: str, path: Path) -> None:
        """A worker's result file into the store under ``key`` (moved when the store is the data directory)."""
        if not self.remote:
            dest = self.root / key
            if dest != path:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
            return
        self.blobs.put_file(key, path)

    def stored_ids(self, prefix: str, suffix: str = "") -> dict[str, float]:
        """{id: last write} of the remote store's ``<prefix><id><suffix>`` entries (files or ``<id>/``
        folders), for retention's leftover sweep; ids that are not ours are skipped."""
        found: dict[str, float] = {}
        for blob in self.blobs.list(prefix):
            rest = blob.key[len(prefix) :]
            name = rest.split("/", 1)[0]
            if suffix:
                if "/" in rest or not name.endswith(suffix):
                    continue
                name = name[: -len(suffix)]
            if ID_PATTERN.fullmatch(name):
                found[name] = max(found.get(name, 0.0), blob.modified)
        return found

    def check(self) -> None:
        """For start-up and /readyz: StoreMisconfigured (refuse to start) or StoreUnavailable (not ready)."""
        self.blobs.check()

    def remove_model(self, model_id: str) -> None:
        self._remove(self.model_dir(model_id))
        if self.remote:
            self.blobs.delete_prefix(f"models/{model_id}/")

    def remove_dataset(self, dataset_id: str) -> None:
        self._remove(self.dataset_path(dataset_id))
        if self.remote:
            self.blobs.delete_prefix(self.dataset_key(dataset_id))

    def remove_job(self, job_id: str) -> None:
        self._remove(self.job_dir(job_id))
        if self.remote:
            self.blobs.delete_prefix(f"jobs/{job_id}/")

    def _remove(self, path: Path) -> None:
        """Rename into tmp/ first, so readers see the whole blob or nothing, then delete; missing is fine."""
        trash = self.tmp_dir / f"trash-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)

    def sweep_tmp(self, older_than_s: float = 24 * 3600) -> int:
        """Delete temp entries left by crashed uploads/deletes, untouched for ``older_than_s``; returns how many
        went. An upload in flight rewrites its file every flush, so only a stalled or orphaned one is old.

        Another process may sweep (or finish a delete) at the same moment: an entry that vanishes under us is
        simply not counted, never an error.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in list(self.tmp_dir.iterdir()):
            try:
                if entry.lstat().st_mtime >= cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                    if entry.exists():
                        continue  # not ours to force (permissions); left for the operator to see
                else:
                    entry.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed


def _checked_id(value: str, kind: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise NotFound(f"{str(value)[:80]!r} is not a valid {kind} id, so no such {kind} exists")
    return value


# ----------------------------------------------------------------------------------------------------------
# uploads


@dataclass
class Upload:
    """A fully received upload sitting in the temp dir; ``commit`` moves it into place."""

    filename: str  # sanitised basename, for display and suffix sniffing only
    path: Path
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)
    committed: bool = field(default=False, init=False)

    def commit(self, dest: Path) -> Path:
        """Atomically move the file to ``dest`` (same filesystem), creating parent directories."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, dest)
        self.path = dest
        self.committed = True
        return dest

    def discard(self) -> None:
        """Delete the temp file (e.g. after a failed check); never touches a committed file."""
        if not self.committed:
            self.path.unlink(missing_ok=True)


async def receive_upload(
    request: Request,
    tmp_dir: Path,
    *,
    file_field: str = "file",
    text_fields: frozenset[str] = frozenset({"name"}),
    max_bytes: int,
    max_text_bytes: int = 4096,
) -> Upload:
    """Stream a multipart/form-data body with exactly one file part into ``tmp_dir``; see module docstring.

    Refuses at the first sign of trouble and leaves no temp file behind: wrong content type (415), unknown or
    repeated fields, missing or empty file, truncated body or disconnect (400), file over ``max_bytes`` (413,
    also up front from Content-Length), disk full (507).
    """
    boundary = _boundary(request.headers.get("content-type"), file_field)
    body_limit = max_bytes + len(text_fields) * max_text_bytes + _FRAMING_ALLOWANCE
    _check_content_length(request.headers.get("content-length"), body_limit, max_bytes, file_field)
    form = _FormReceiver(tmp_dir, file_field, text_fields, max_bytes, max_text_bytes)
    try:
        parser = MultipartParser(boundary, form.callbacks())
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise _too_large(max_bytes, file_field)
            parser.write(chunk)
            if form.pending_bytes >= _FLUSH_BYTES:
                await anyio.to_thread.run_sync(form.flush)
        if received == 0:
            raise UploadError(f"the request body is empty; send the file as multipart field {file_field!r}")
        return await anyio.to_thread.run_sync(form.finish)
    except BaseException as exc:
        form.abort()
        if isinstance(exc, ClientDisconnect):
            raise UploadError("the client disconnected before the upload finished; nothing was kept") from exc
        if isinstance(exc, FormParserError):
            raise UploadError(f"the multipart body is malformed ({exc}); nothing was kept") from exc
        if is_disk_full(exc):
            raise InsufficientStorage(
                "the server's disk filled up while receiving the upload; nothing was kept, retry later"
            ) from exc
        raise


def _boundary(content_type: str | None, file_field: str) -> bytes:
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        shown = content_type.split(";")[0][:80] if content_type else "none"
        raise UnsupportedMediaType(
            f"expected a multipart/form-data body (got Content-Type {shown}); "
            f"send the file as form field {file_field!r}, e.g. curl -F {file_field}=@model.zip"
        )
    boundary = params.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 200:
        raise UnsupportedMediaType("the multipart/form-data Content-Type has no usable boundary parameter")
    return boundary


def _check_content_length(value: str | None, body_limit: int, max_bytes: int, file_field: str) -> None:
    if value is None:
        return
    try:
        length = int(value)
    except ValueError:
        raise UploadError(f"the Content-Length header {value[:40]!r} is not a number") from None
    if length > body_limit:
        raise _too_large(max_bytes, file_field)


def _too_large(max_bytes: int, file_field: str) -> PayloadTooLarge:
    mb = max_bytes / 2**20
    shown = f"{mb:,.0f}" if mb >= 10 else f"{mb:.2g}"
    return PayloadTooLarge(
        f"the {file_field!r} upload is larger than the {shown} MB limit; nothing was kept",
        extra={"limit_bytes": max_bytes},
    )


def _display_name(raw: bytes | None) -> str:
    """Basename, no control characters: the client's name is for display and suffix sniffing, never I/O."""
    if not raw:
        return ""
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = _CONTROL.sub("", name).strip()
    return "" if name in (".", "..") else name[:255]


class _FormReceiver:
    """State machine behind MultipartParser's callbacks; file data is buffered until ``flush`` writes it.

    Callbacks run inside ``parser.write`` on the event loop, so they only validate and buffer; the disk writes
    and hashing happen in ``flush`` on a worker thread.
    """

    def __init__(
        self, tmp_dir: Path, file_field: str, text_fields: frozenset[str], max_bytes: int, max_text_bytes: int
    ) -> None:
        self.tmp_dir = tmp_dir
        self.file_field = file_field
        self.text_fields = text_fields
        self.max_bytes = max_bytes
        self.max_text_bytes = max_text_bytes
        self.fields: dict[str, str] = {}
        self.filename = ""
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.path: Path | None = None
        self.out: IO[bytes] | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part: str | None = None  # None between parts, file_field, or a text field name
        self._text = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_field).strip().lower()] = bytes(self._header_value).strip()
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in params:
            raise UploadError("a multipart part lacks a 'Content-Disposition: form-data; name=...' header")
        name = params[b"name"].decode("utf-8", "replace")
        if name == self.file_field:
            if self.path is not None:
                raise UploadError(f"the form has more than one {name!r} part; send exactly one file")
            self.filename = _display_name(params.get(b"filename"))
            fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.tmp_dir)
            self.path = Path(tmp)
            self.out = os.fdopen(fd, "wb")
        elif b"filename" in params:
            raise UploadError(
                f"unexpected file in form field {name[:80]!r}; "
                f"send exactly one file, in field {self.file_field!r}"
            )
        elif name in self.text_fields:
            if name in self.fields:
                raise UploadError(f"form field {name!r} was sent more than once")
            self._text.clear()
        else:
            accepted = ", ".join(repr(f) for f in sorted({self.file_field, *self.text_fields}))
            raise UploadError(f"unknown form field {name[:80]!r}; accepted fields: {accepted}")
        self._part = name

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == self.file_field:
            self.size += end - start
            if self.size > self.max_bytes:
                raise _too_large(self.max_bytes, self.file_field)
            self.pending.append(data[start:end])
            self.pending_bytes += end - start
        elif self._part is not None:
            self._text += data[start:end]
            if len(self._text) > self.max_text_bytes:
                raise UploadError(f"form field {self._part!r} is longer than {self.max_text_bytes} bytes")

    def _on_part_end(self) -> None:
        if self._part is not None and self._part != self.file_field:
            try:
                self.fields[self._part] = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise UploadError(f"form field {self._part!r} is not valid UTF-8 text") from None
        self._part = None

    def _on_end(self) -> None:
        self.ended = True

    def flush(self) -> None:
        """Write and hash the buffered file data (runs on a worker thread)."""
        chunks, self.pending, self.pending_bytes = self.pending, [], 0
        if self.out is None:  # nothing can be pending before the file part opened its temp file
            return
        for chunk in chunks:
            self.out.write(chunk)
            self.sha256.update(chunk)

    def finish(self) -> Upload:
        """Check the form was complete, make the file durable and describe it (runs on a worker thread)."""
        if not self.ended:
            raise UploadError("the multipart body ended before its closing boundary; the upload was cut off")
        if self.path is None or self.out is None:
            raise UploadError(
                f"the form has no {self.file_field!r} field; "
                f"send the file as multipart field {self.file_field!r}"
            )
        if self.size == 0:
            raise UploadError(f"the {self.file_field!r} field is empty; nothing was uploaded")
        self.flush()
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        self.out = None
        return Upload(self.filename, self.path, self.size, self.sha256.hexdigest(), dict(self.fields))

    def abort(self) -> None:
        """Drop everything received so far; safe to call at any point, including twice."""
        self.pending, self.pending_bytes = [], 0
        if self.out is not None:
            with contextlib.suppress(OSError):  # e.g. ENOSPC flushing the last buffer: the file goes anyway
                self.out.close()
            self.out = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
