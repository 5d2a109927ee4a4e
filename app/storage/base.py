"""The blob-store interface the local and the S3 store implement (``app.storage.registry`` picks one).

Keys are relative (``models/<id>/upload.zip``, ``datasets/<id>.npz``, ``jobs/<id>/pruned.zip``), never host
paths: the database holds keys, sizes and SHA-256 digests; the store holds bytes. Each implementation maps its
own errors, once:

- a missing key -> ``FileNotFoundError`` (what the local store raises too, so callers handle one thing);
- the store unreachable or answering 5xx after its client's retries -> :class:`app.errors.StoreUnavailable`
  (503 with Retry-After at the API; a retried, then failed job at the worker);
- wrong credentials or a missing bucket -> :class:`StoreMisconfigured`, whose message names the setting to fix
  (the API and workers refuse to start with it).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol


class StoreMisconfigured(RuntimeError):
    """The store answered, and said no: wrong credentials, no such bucket. Retrying will not help."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: float = 0.0  # POSIX time of the last write


class BlobStore(Protocol):
    """What the API and workers need from a blob store. Keys are ``/``-separated, relative, ours (never user
    input). Every method raises FileNotFoundError for a missing key and StoreUnavailable when it cannot ask."""

    url: str

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key`` (whole or not at all) and consume it (the caller's temp file
        is moved, or deleted once uploaded)."""

    def open(self, key: str) -> BinaryIO:
        """A seekable reader with ``.name`` and ``size_bytes``: local files are opened, S3 objects read in
        ranged GETs as the reader advances (bounded memory, Range requests are seeks)."""

    def head(self, key: str) -> BlobInfo: ...

    def list(self, prefix: str) -> list[BlobInfo]: ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (a ``models/<id>/``-style directory, or one key); returns how
        many went. Missing is fine."""

    def presign_get(self, key: str, expires_s: int, filename: str | None = None) -> str | None:
        """A short-lived URL a client may GET without credentials; None where the store has none (local)."""

    def check(self) -> None:
        """Raise StoreMisconfigured / StoreUnavailable unless the store answers a cheap request."""


def file_stat(file: IO[bytes]) -> os.stat_result:
    """What a download response needs to know of an open blob (size, modification time): the descriptor's
    own for a local file, the object's metadata for a remote one."""
    size = getattr(file, "size_bytes", None)
    if size is None:
        return os.fstat(file.fileno())
    mtime = float(getattr(file, "mtime", 0.0))
    return os.stat_result((stat.S_IFREG | 0o644, 0, 0, 1, 0, 0, int(size), mtime, mtime, mtime))
