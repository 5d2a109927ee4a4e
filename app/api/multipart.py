"""The streamed multipart upload receiver: one file part (and a few short text fields) straight to disk.

Uploads go from ``request.stream()`` through python-multipart's low-level ``MultipartParser`` into a temp file
on the same filesystem as their destination (the data directory's ``tmp/``), hashed on the way, so a multi-GB
upload costs about one flush buffer of memory and is kept with one atomic ``os.replace`` (or one streamed put
into a remote store, :meth:`app.storage.Storage.commit_upload`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.disk import is_disk_full
from app.errors import InsufficientStorage, PayloadTooLarge, UnsupportedMediaType, UploadError
from app.storage import Storage

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

# File data is handed to a worker thread (write + sha256) in batches of about this size: bounds memory and
# keeps disk I/O and hashing off the event loop without a thread hop per 64 KiB network chunk.
_FLUSH_BYTES = 1 << 20
# Boundaries, part headers and epilogue on top of the file and text fields; anything beyond is not a form.
_FRAMING_ALLOWANCE = 64 << 10
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class Upload:
    """A fully received upload sitting in the temp dir; ``commit`` moves it into place."""

    filename: str  # sanitised basename, for display and suffix sniffing only
    path: Path
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)
    committed: bool = field(default=False, init=False)

    def commit(self, storage: Storage, key: str) -> None:
        """Keep the file under ``key``: a rename into the data directory, or a put into the remote store."""
        storage.commit_upload(self.path, key)
        self.committed = True

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
