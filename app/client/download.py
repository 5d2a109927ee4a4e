"""Streamed, verified, resumable artifact downloads.

Artifacts can be large (a pruned ResNet is ~100 MB), so the body goes to ``<dest>.part`` in chunks, hashed as it
is written, and only replaces ``dest`` once its length and digest match what the server announced: a reader of
``dest`` never sees a partial or corrupt file. A connection cut mid-body is resumed with ``Range: bytes=N-``
(guarded by ``If-Range: <etag>``, so a changed artifact restarts from zero instead of splicing two versions).

What is verified (RFC 9110 / RFC 9530):
- ``Content-Length`` of the full (200) response: the byte count;
- ``Repr-Digest`` / ``Content-Digest`` ``sha-256=:<base64>:``: the SHA-256 of the whole file;
- a strong ``ETag`` that is 64 hex digits: Secateurs' ETag is the artifact's SHA-256, so it is checked too.
  Other ETags are opaque (as RFC 9110 says) and only used for ``If-Range``.

Without a strong ETag a resume sends Range alone; the digest check above is then what would catch a file that
changed between the two requests.

A redirect (a server with ``SECATEURS_PRESIGNED_DOWNLOADS``: 302 to a presigned URL of its object store) is
followed by hand: the digests come from the redirect (the server's record), the bytes and the ETag used for
``If-Range`` from the store, and the API key is not sent to the store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import httpx

from app.client.errors import ConnectionFailed, DigestMismatch, connection_failed, raise_for_problem

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Expected:
    """What the full response promised about the file; None where the server said nothing."""

    size: int | None = None
    sha256_etag: str | None = None
    sha256_digest: str | None = None
    etag: str | None = None

    @classmethod
    def from_headers(cls, headers: httpx.Headers) -> Expected:
        size = headers.get("content-length")
        etag = headers.get("etag")
        strong = etag if etag and not etag.startswith("W/") else None
        tag_value = strong.strip('"').lower() if strong else None
        return cls(
            size=int(size) if size and size.isdigit() else None,
            sha256_etag=tag_value if tag_value and _HEX64.fullmatch(tag_value) else None,
            sha256_digest=_sha256_from_digest(headers.get("repr-digest") or headers.get("content-digest")),
            etag=strong,
        )


def _sha256_from_digest(value: str | None) -> str | None:
    """The hex SHA-256 from an RFC 9530 digest field (``sha-256=:<base64>:, sha-512=:...:``), if it has one."""
    if not value:
        return None
    for member in value.split(","):
        algorithm, _, encoded = member.strip().partition("=")
        if algorithm.strip().lower() == "sha-256" and encoded.startswith(":") and encoded.endswith(":"):
            try:
                return base64.b64decode(encoded[1:-1], validate=True).hex()
            except (binascii.Error, ValueError):
                return None
    return None


def verify(expected: Expected, size: int, sha256_hex: str) -> list[str]:
    """Human-readable mismatches between what arrived and what was promised (empty = all good)."""
    problems = []
    if expected.size is not None and size != expected.size:
        problems.append(f"got {size} bytes, Content-Length said {expected.size}")
    if expected.sha256_digest is not None and sha256_hex != expected.sha256_digest:
        problems.append(f"sha-256 {sha256_hex} does not match Repr-Digest {expected.sha256_digest}")
    if expected.sha256_etag is not None and sha256_hex != expected.sha256_etag:
        problems.append(f"sha-256 {sha256_hex} does not match ETag {expected.sha256_etag}")
    return problems


def artifact_filename(job_id: str, name: str) -> str:
    """The file name a download of artifact ``name`` gets in a directory (what the server's
    Content-Disposition says): ``<job>-pruned.zip``, ``<job>-tflite_int8.tflite``, ``<job>-onnx.onnx``,
    ``<job>-<name>`` else."""
    if name == "saved_model":
        return f"{job_id}-pruned.zip"
    if name.startswith("tflite_"):
        return f"{job_id}-{name}.tflite"
    if name == "onnx":
        return f"{job_id}-onnx.onnx"
    return f"{job_id}-{name.replace('/', '_')}"


def download_to(http: httpx.Client, url: str, dest: Path, *, max_resumes: int = 3) -> Path:
    """GET ``url`` into ``dest`` (streamed, verified, resumed up to ``max_resumes`` times). Returns ``dest``.

    Raises ApiError subclasses for problem answers, ConnectionFailed when the resumes are used up, and
    DigestMismatch when the bytes are wrong. On any failure ``dest`` is untouched (a previous file there
    survives) and ``dest.part`` is removed.
    """
    part = dest.with_name(dest.name + ".part")
    done = False
    try:
        with part.open("wb") as fh:
            _fetch(http, url, fh, max_resumes=max_resumes, dest=dest)
        part.replace(dest)
        done = True
    finally:
        if not done:
            part.unlink(missing_ok=True)
    return dest


def _fetch(http: httpx.Client, url: str, fh: BinaryIO, *, max_resumes: int, dest: Path) -> None:
    """Fill ``fh`` with the whole body, hashing as it goes; a 206 appends, any 200 starts over (so a server
    that ignores Range, or an If-Range that no longer matches, still yields one consistent file)."""
    hasher = hashlib.sha256()
    written = 0
    expected: Expected | None = None
    promised: Expected | None = None  # what a redirect said about the file it points at
    target, redirects = url, 0
    attempts = 0
    while True:
        attempts += 1
        # identity: the digests and Content-Length describe the file itself, not a compressed transfer of it
        headers = {"Accept-Encoding": "identity"}
        if written and expected is not None:
            headers["Range"] = f"bytes={written}-"
            if expected.etag:
                headers["If-Range"] = expected.etag
        try:
            with _open(http, target, headers, foreign=target != url) as response:
                if response.is_redirect and "location" in response.headers and redirects < 3:
                    response.read()
                    promised = Expected.from_headers(response.headers)
                    target = str(response.url.join(response.headers["location"]))
                    redirects += 1
                    attempts -= 1  # not a failed attempt
                    continue
                if response.status_code >= 400:
                    response.read()
                    raise_for_problem(response)
                if response.status_code == 200 or "Range" not in headers:
                    # first request, or the server ignored our Range / If-Range saw a new ETag: from zero
                    if response.status_code != 200:
                        raise ConnectionFailed(
                            f"GET {url} answered {response.status_code}, expected 200", url=url
                        )
                    expected = _with_promised(Expected.from_headers(response.headers), promised)
                    fh.seek(0)
                    fh.truncate()
                    hasher, written = hashlib.sha256(), 0
                elif response.status_code != 206 or _range_start(response) != written:
                    raise ConnectionFailed(
                        f"GET {url} with Range bytes={written}- answered {response.status_code} "
                        f"(Content-Range {response.headers.get('content-range')!r}); cannot resume",
                        url=url,
                    )
                # as they arrive: a re-chunking buffer would drop the bytes it holds when the connection is cut
                for chunk in response.iter_bytes():
                    fh.write(chunk)
                    hasher.update(chunk)
                    written += len(chunk)
        except httpx.TransportError as exc:  # cut mid-body (or before it): resume from what we have
            if attempts > max_resumes:
                failure = connection_failed(exc)
                raise ConnectionFailed(
                    f"download failed after {attempts} attempts; last: {failure}", url=failure.url
                ) from exc
            continue
        if expected is not None and expected.size is not None and written < expected.size:
            if attempts > max_resumes:  # the body ended early without a transport error
                raise ConnectionFailed(
                    f"download of {url} failed after {attempts} attempts: the body ended at {written} of "
                    f"{expected.size} bytes",
                    url=url,
                )
            continue
        break
    fh.flush()
    assert expected is not None  # the loop only breaks after a 200 set it
    problems = verify(expected, written, hasher.hexdigest())
    if problems:
        raise DigestMismatch(f"download of {url} to {dest} is corrupt: " + "; ".join(problems))


def _open(http: httpx.Client, url: str, headers: dict[str, str], *, foreign: bool) -> closing[httpx.Response]:
    """A streamed GET; to a redirect's target (another host: the object store) without our Authorization."""
    request = http.build_request("GET", url, headers=headers)
    if foreign:
        request.headers.pop("authorization", None)
    return closing(http.send(request, stream=True))


def _with_promised(got: Expected, promised: Expected | None) -> Expected:
    """The store's answer, checked against the digests the redirect (the API's record) promised."""
    if promised is None:
        return got
    return replace(
        got,
        sha256_digest=promised.sha256_digest or got.sha256_digest,
        sha256_etag=promised.sha256_etag,  # the store's own ETag (an MD5 or so) is only good for If-Range
        size=got.size if got.size is not None else promised.size,
    )


def _range_start(response: httpx.Response) -> int | None:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    return int(match.group(1)) if match else None
