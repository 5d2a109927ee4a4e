"""The worker's content-addressed cache of blobs from a remote store (models, datasets), by SHA-256.

A worker host runs several worker processes and many jobs on the same model: the model is fetched once per
host, not once per job. Entries are named ``<sha256><suffix>`` (the suffix keeps ``.keras`` / ``.npz`` loaders
happy); a download goes to ``tmp/`` while it is hashed, is checked against the digest the database recorded,
and is renamed into place in one step, so a reader never sees half a file. One ``flock`` per digest makes
concurrent processes on the host wait for the first one's download instead of fetching again. Each use
touches the entry; above ``max_bytes`` the least recently used entries go, except those used in the last
``grace_s`` seconds (a job may be about to open one; an open file stays readable after its unlink anyway).
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

from app.storage.base import BlobStore

log = logging.getLogger("secateurs.cache")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(r"^(\.[a-z0-9]{1,8}){0,2}$")
_CHUNK = 8 << 20


class CorruptBlob(ValueError):
    """The store's bytes do not hash to the digest recorded when they were uploaded."""


class CacheDir:
    """A bounded LRU directory of files filled once per host: the mechanism both the blob cache (here) and the
    worker's shard cache (``worker.data.cache``) use; they differ only in how an entry is named and checked.

    ``fill_once(path, fill)``: ``fill(tmp)`` writes the entry's bytes to a temp file under one ``flock`` per entry
    (and checks them: it raises to refuse), which is then renamed into place in one step. Each use touches the
    entry; above ``max_bytes`` the least recently used entries go, except those used in the last ``grace_s``."""

    def __init__(self, root: Path, max_bytes: int, grace_s: float = 300.0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        for d in (self.root, self._tmp, self._locks):
            d.mkdir(parents=True, exist_ok=True)

    def fill_once(self, path: Path, fill: Callable[[Path], None]) -> Path:
        """``path``, filled by ``fill`` unless it is there already (another process filling it: wait for it)."""
        if self._touch(path):
            return path
        with open(self._locks / f"{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._touch(path):
                return path
            tmp = self._tmp / f"{path.name}.{uuid.uuid4().hex}.part"
            try:
                fill(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        self.evict(keep=path)
        return path

    @staticmethod
    def _touch(path: Path) -> bool:
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

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


class BlobCache(CacheDir):
    def path_for(self, sha256: str, suffix: str) -> Path:
        if not _DIGEST.fullmatch(sha256) or not _SUFFIX.fullmatch(suffix):
            raise ValueError(f"bad cache entry name {sha256!r}{suffix!r}")
        return self.root / f"{sha256}{suffix}"

    def get(self, store: BlobStore, key: str, sha256: str, suffix: str = "") -> Path:
        """The local path of ``key``'s bytes, fetched (once per host) if not cached yet."""
        return self.fill_once(self.path_for(sha256, suffix), lambda tmp: self._fetch(store, key, sha256, tmp))

    @staticmethod
    def _fetch(store: BlobStore, key: str, sha256: str, tmp: Path) -> None:
        digest = hashlib.sha256()
        started = time.monotonic()
        with store.open(key) as src, tmp.open("wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise CorruptBlob(
                f"the stored {key} hashes to {digest.hexdigest()[:12]}..., not the {sha256[:12]}... recorded at "
                "upload: the object was changed or damaged in the store; upload it again"
            )
        log.info("fetched %s (%d bytes) in %.1f s", key, tmp.stat().st_size, time.monotonic() - started)
