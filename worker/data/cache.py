"""The worker's cache of dataset shards fetched from a remote source (``s3://`` references, remote ``blob:``).

Unlike :class:`app.storage.cache.BlobCache` (content addressed by a SHA-256 recorded at upload), a shard has no
digest we could check: it is named by what the manifest knows of it, ``sha256(root | key | etag | size)``, so
a changed object (another ETag) is another entry and never served stale. A download streams into ``tmp/`` in
chunks (memory stays bounded whatever the shard's size), is checked for its size, and is renamed into place in
one step, so a reader never sees half a file. One ``flock`` per entry makes processes on the host that want
the same shard wait for the first one's download. Each use touches the entry; above ``max_bytes`` the least
recently used entries go, except those used in the last ``grace_s`` seconds (a tf.data pipeline may be about
to open one; an open file stays readable after its unlink anyway).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from worker.data.errors import SourceError


class ObjectInfo(Protocol):
    """What the cache needs of a listed object (``worker.data.sources.ObjectInfo``, which imports this module)."""

    @property
    def key(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def etag(self) -> str | None: ...


log = logging.getLogger("secateurs.data.cache")
_SUFFIX = re.compile(r"(\.[A-Za-z0-9]{1,10}){1,2}$")


def entry_name(root: str, obj: ObjectInfo) -> str:
    """The entry's file name: the digest of what identifies this version of the object, plus its suffix (so a
    reader that looks at extensions, e.g. ``.gz``, still can)."""
    digest = hashlib.sha256(f"{root}|{obj.key}|{obj.etag or ''}|{obj.size}".encode()).hexdigest()
    match = _SUFFIX.search(obj.key.rsplit("/", 1)[-1])
    return digest + (match.group(0).lower() if match else "")


class ShardCache:
    """A bounded LRU directory of shards (module docstring). ``max_bytes`` 0 = no cap."""

    def __init__(self, root: Path, max_bytes: int, grace_s: float = 300.0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        for d in (self.root, self._tmp, self._locks):
            d.mkdir(parents=True, exist_ok=True)

    def path_for(self, root: str, obj: ObjectInfo) -> Path:
        return self.root / entry_name(root, obj)

    def peek(self, root: str, obj: ObjectInfo) -> Path | None:
        """The entry's path when it is cached already (touched, as a use), else None; never downloads."""
        path = self.path_for(root, obj)
        return path if self._touch(path) else None

    def get(self, root: str, obj: ObjectInfo, fill: Callable[[BinaryIO], None]) -> Path:
        """The local path of ``obj``'s bytes; on a miss ``fill(out)`` streams them into an open temp file
        (it raises :class:`SourceError` when the object changed or vanished). The size is checked here."""
        path = self.path_for(root, obj)
        if self._touch(path):
            return path
        with open(self._locks / f"{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process fetching the same shard: wait for it
            if self._touch(path):
                return path
            self._fetch(root, obj, path, fill)
        self.evict(keep=path)
        return path

    @staticmethod
    def _touch(path: Path) -> bool:
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def _fetch(self, root: str, obj: ObjectInfo, path: Path, fill: Callable[[BinaryIO], None]) -> None:
        tmp = self._tmp / f"{path.name}.{uuid.uuid4().hex}.part"
        started = time.monotonic()
        try:
            with tmp.open("wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            size = tmp.stat().st_size
            if size != obj.size:
                raise SourceError(
                    "shard_changed",
                    f"the shard {obj.key!r} of {root} is {size} bytes now, not the {obj.size} bytes listed in "
                    "the dataset's manifest: it changed after registration; register the dataset again",
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("fetched %s%s (%d bytes) in %.1f s", root, obj.key, obj.size, time.monotonic() - started)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every entry, least recently used first."""
        out = []
        for p in self.root.iterdir():
            if p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the cache fits ``max_bytes``; returns how many went."""
        if not self.max_bytes:
            return 0
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = 0
        recent = time.time() - self.grace_s
        for used, size, path in entries:
            if total <= self.max_bytes:
                break
            if path == keep or used > recent:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # the lock file stays: unlinking it could let two processes lock two inodes
                total -= size
                removed += 1
        return removed
