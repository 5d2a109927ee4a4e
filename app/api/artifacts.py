"""Serving artifact files: ``Repr-Digest`` (RFC 9530) and Range requests that follow RFC 9110 14.

Starlette's FileResponse already does single and multiple ranges, ``If-Range`` (strong comparison with our
ETag) and ``Content-Length``. Two of its answers break our contract, so they are fixed up before it runs:

- a Range it cannot parse, or in a unit other than bytes, gets a plain-text 400 there; RFC 9110 14.2 says a
  server ignores such a header (MUST, for an unknown unit), so it is dropped and the whole file is sent (200);
- an unsatisfiable range gets a plain-text 416 there; here it is problem+json like every other error, still with
  ``Content-Range: bytes */<size>`` (RFC 9110 15.5.17).

The route opens the file itself (:func:`open_output`) and the response reads from that descriptor, never from
the path again: retention may delete a job's outputs at any time, and a download that already opened its file
then still finishes (POSIX keeps an unlinked file readable), while one that comes later gets 410 Gone.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, BinaryIO

import anyio
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from app.config import Settings
from app.db.tables import JobRecord, as_utc
from app.errors import PROBLEM_BASE, ArtifactExpired, NotFound
from app.job_files import download_filename
from app.storage import Storage
from app.storage.base import file_stat

PROBLEM = "application/problem+json"
PATHSEND = "http.response.pathsend"  # an ASGI extension that sends by path: not for a file we hold open


def repr_digest(sha256_hex: str) -> str:
    """The ``Repr-Digest`` field value for a SHA-256 we hold as hex: ``sha-256=:<base64 of the raw digest>:``."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


class ArtifactResponse(FileResponse):
    """A FileResponse over an already open file whose Range edge cases follow RFC 9110 and our problem+json
    contract (module docstring). It owns ``file`` and closes it once sent."""

    def __init__(
        self, file: BinaryIO, *, media_type: str, filename: str, headers: dict[str, str] | None = None
    ) -> None:
        self._file = file
        # Size and Last-Modified from the descriptor, so the path is never looked at again.
        super().__init__(
            file.name,
            media_type=media_type,
            filename=filename,
            headers=headers,
            stat_result=file_stat(file),  # a local file's fstat, or a remote object's size and time
        )
        if getattr(file, "size_bytes", None) is not None:
            # A remote object: each read is a thread hop into the S3 reader. 1 MiB reads instead of 64 KiB took
            # API downloads from 0.33x to 0.72x of a direct read (bench/storage.py); memory: one chunk + 4 MiB.
            self.chunk_size = 1 << 20

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            extensions = {k: v for k, v in scope.get("extensions", {}).items() if k != PATHSEND}
            scope = {**scope, "extensions": extensions}
            assert self.stat_result is not None  # set in __init__
            headers = Headers(scope=scope)
            http_range = headers.get("range")
            if_range = headers.get("if-range")
            if http_range is not None and (if_range is None or self._should_use_range(if_range)):
                size = self.stat_result.st_size
                try:
                    # Starlette's own parser, so this check and the response it then builds cannot disagree.
                    self._parse_range_header(http_range, size)
                except MalformedRangeHeader:
                    scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
                except RangeNotSatisfiable:
                    await self._unsatisfiable(size)(scope, receive, send)
                    return
            await super().__call__(scope, receive, send)
        finally:
            self._file.close()

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        """Starlette opens ``self.path`` here; we hand it the descriptor the route opened instead."""
        yield anyio.AsyncFile(self._file)

    def _unsatisfiable(self, size: int) -> JSONResponse:
        body = {
            "type": PROBLEM_BASE + "range-not-satisfiable",
            "title": "Range not satisfiable",
            "status": 416,
            "detail": f"no requested range starts inside the artifact, which is {size} bytes; "
            "ask for bytes=<first>-<last> with first below the size",
        }
        headers = {"Content-Range": f"bytes */{size}"}
        for name in ("etag", "repr-digest"):
            if name in self.headers:
                headers[name] = self.headers[name]
        return JSONResponse(body, status_code=416, media_type=PROBLEM, headers=headers)


def ensure_kept(record: JobRecord, settings: Settings) -> None:
    """410 once retention deleted the job's outputs: they existed and will not come back (404 would suggest
    a wrong id, and a client might keep retrying)."""
    expired_at = as_utc(record.expired_at)
    if expired_at is None:
        return
    policy = "SECATEURS_ARTIFACT_TTL_DAYS"
    if settings.artifact_ttl_days > 0:
        policy = f"a finished job's outputs are kept {settings.artifact_ttl_days:g} days, {policy}"
    raise ArtifactExpired(
        f"the artifact and metrics of job {record.id} were deleted on {expired_at:%Y-%m-%d %H:%M} UTC under the "
        f"retention policy ({policy}); run the job again for new ones, and download them sooner",
        extra={"expired_at": expired_at.isoformat().replace("+00:00", "Z")},  # as the job body writes it
    )


def open_output(
    session: Session, record: JobRecord, storage: Storage, name: str, settings: Settings
) -> BinaryIO:
    """Open one of a succeeded job's output files for reading, or raise 410 (expired) / 404 (missing).

    The file is opened here, once: if retention removes it a moment later, the open descriptor still reads it
    whole. If it is already gone, the record is read again, since the sweep marks it expired before it deletes
    the files: a download racing the sweep then answers 410 too, not 404.
    """
    ensure_kept(record, settings)
    try:
        return storage.open_blob(storage.job_key(record.id, name))
    except FileNotFoundError:
        session.refresh(record)
        ensure_kept(record, settings)
        raise NotFound(f"the {name} of job {record.id} is gone from storage; run the job again") from None


def serve_file(
    session: Session,
    record: JobRecord,
    storage: Storage,
    settings: Settings,
    item: dict[str, Any],
    if_none_match: str | None,
) -> Response:
    """One recorded file of a succeeded job (``app.job_files`` entry): 410 once expired, 304 when
    ``If-None-Match`` matches, else the file with ``ETag`` (its SHA-256), ``Repr-Digest`` (RFC 9530: the digest
    of the whole file, also on a 206, so a client that resumed with Range can check what it assembled) and
    Range/If-Range. ``/artifact`` and ``/artifacts/{name}`` both answer through here."""
    ensure_kept(record, settings)  # before the 304: an expired artifact is no longer "current"
    etag = '"' + str(item["sha256"]) + '"'
    validators = {"ETag": etag}
    if item["sha256"]:
        validators["Repr-Digest"] = repr_digest(item["sha256"])
    # RFC 9110 13.1.2: "*" matches any current representation; If-None-Match uses weak comparison.
    if if_none_match and (
        if_none_match.strip() == "*"
        or etag in [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    ):
        return Response(status_code=304, headers=validators)
    if settings.presigned_downloads and storage.remote:
        return presigned_redirect(session, record, storage, item, settings, validators)
    file = open_output(session, record, storage, item["file"], settings)
    return ArtifactResponse(
        file, media_type=item["media_type"], filename=download_filename(record.id, item), headers=validators
    )


def presigned_redirect(
    session: Session,
    record: JobRecord,
    storage: Storage,
    item: dict[str, Any],
    settings: Settings,
    validators: dict[str, str],
) -> Response:
    """``SECATEURS_PRESIGNED_DOWNLOADS``: 302 to a short-lived URL of the object itself, so the bytes go from
    the store to the client without passing through the API. The redirect carries the ETag and Repr-Digest,
    so the client checks what the store sent against the digest the worker recorded."""
    key = storage.job_key(record.id, item["file"])
    try:
        storage.blobs.head(key)  # a missing object is our 404/410, not the store's XML error after the redirect
    except FileNotFoundError:
        session.refresh(record)
        ensure_kept(record, settings)
        raise NotFound(f"the {item['file']} of job {record.id} is gone from storage; run the job again") from None
    url = storage.blobs.presign_get(key, settings.presign_expiry_s, download_filename(record.id, item))
    headers = {**validators, "Location": str(url), "Cache-Control": "private, no-store"}
    return Response(status_code=302, headers=headers)
