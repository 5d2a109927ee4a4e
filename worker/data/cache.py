"""The worker's cache of dataset shards fetched from a remote source (``s3://`` references, remote ``blob:``).

The directory mechanism (one ``flock`` per entry, atomic rename, LRU eviction) is
:class:`app.storage.cache.CacheDir`, as for the blob cache. Unlike :class:`app.storage.cache.BlobCache`
(content addressed by a SHA-256 recorded at upload), a shard has no
digest we could check: it is named by what the manifest knows of it, ``sha256(root | key | etag | size)``, so
a changed object (another ETag) is another entry and never served stale. A download streams into ``tmp/`` in
chunks (memory stays bounded whatever the shard's size), is checked for its size, and is renamed into place in
one step, so a reader never sees half a file. One ``flock`` per entry makes processes on the host that want
the same shard wait for the first one's download. Each use touches the entry; above ``max_bytes`` the least
recently used entries go, except those used in the last ``grace_s`` seconds (a tf.data pipeline may be about
to open one; an open file stays readable after its unlink anyway).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from app.storage.cache import CacheDir
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


class ShardCache(CacheDir):
    """A bounded LRU directory of shards (module docstring). ``max_bytes`` 0 = no cap."""

    def path_for(self, root: str, obj: ObjectInfo) -> Path:
        return self.root / entry_name(root, obj)

    def peek(self, root: str, obj: ObjectInfo) -> Path | None:
        """The entry's path when it is cached already (touched, as a use), else None; never downloads."""
        path = self.path_for(root, obj)
        return path if self._touch(path) else None

    def get(self, root: str, obj: ObjectInfo, fill: Callable[[BinaryIO], None]) -> Path:
        """The local path of ``obj``'s bytes; on a miss ``fill(out)`` streams them into an open temp file
        (it raises :class:`SourceError` when the object changed or vanished). The size is checked here."""

        def download(tmp: Path) -> None:
            started = time.monotonic()
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
            log.info("fetched %s%s (%d bytes) in %.1f s", root, obj.key, obj.size, time.monotonic() - started)

        return self.fill_once(self.path_for(root, obj), download)
