"""Where a dataset's bytes live: a ``file://`` root, an ``s3://`` prefix, or our own blob store (``blob:``).

One :class:`Source` per root. ``list`` gives the objects under it (sorted by key, with size and ETag);
``fetch`` gives a local file holding one object's bytes (the file itself for local roots, a
:class:`~worker.data.cache.ShardCache` entry for remote ones) and re-checks that the object is the one listed
(size, ETag): a shard that changed between registration and a job is refused (``shard_changed``), never read
half old, half new. ``open`` gives a seekable reader (Parquet footers are read with ranged GETs, not whole).

A root ending in ``/`` is a prefix; any other names one object, and its key is then its base name (keys resolve
against the root as URLs do: ``blob:datasets/d1/upload.tfrecord`` + ``upload.tfrecord``).

Safety: a ``file://`` root is resolved (``realpath``) and must stay under one of the operator's allowed
prefixes, resolved the same way; ``..`` is refused outright, and so is any symlink met while listing or
fetching whose target leaves those prefixes (or, with no allow-list, the root itself). ``s3://`` roots are
checked against the allowed ``s3://`` prefixes as strings. Clients of the S3 store are created lazily, in the
process that uses them (obstore, like the AWS SDK, is not fork-safe).
"""

from __future__ import annotations

import collections
import io
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

from app.errors import StoreUnavailable
from worker.data.cache import ShardCache
from worker.data.errors import SourceError

if TYPE_CHECKING:
    from app.config import Settings
    from app.storage import Storage

MAX_OBJECTS_SETTING = "SECATEURS_DATASET_MAX_OBJECTS"
SOURCES_SETTING = "SECATEURS_DATASET_SOURCES"
_CHUNK = 8 << 20
_FETCH_ATTEMPTS = 3
READ_WINDOW = 16  # objects read at once when converting an image folder in object storage
_BLOB_KEY = re.compile(r"^datasets/[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9._-]+)*/?$")


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a root: ``key`` relative to it, ``size`` in bytes, ``etag`` as the store gives it
    (None where there is none: our own blobs are written once)."""

    key: str
    size: int
    etag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "etag": self.etag}


class Source(Protocol):
    """What the manifest builder and the stream reader need of a dataset's storage (module docstring)."""

    root: str
    local: bool  # fetch is free (no download): the bytes are files on this host already

    def list(self, max_objects: int) -> list[ObjectInfo]:
        """Objects under the root, sorted by key; SourceError too_many_objects / source_empty."""

    def fetch(self, obj: ObjectInfo) -> Path:
        """A local file with ``obj``'s bytes, checked against its size/ETag; SourceError shard_changed /
        shard_missing (after a few retries for a remote store)."""

    def cached(self, obj: ObjectInfo) -> Path | None:
        """The local file of ``obj`` when it is here without a download (local root, or cached), else None."""

    def open(self, obj: ObjectInfo) -> BinaryIO:
        """A seekable reader over ``obj``'s bytes."""


def check_key(key: str) -> str:
    """A key relative to a root: no absolute path, no ``..``, no empty or backslash parts (keys come from our
    listings, but manifests travel through the database, so every use re-checks)."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise SourceError("source_denied", f"the shard key {key[:200]!r} is not a plain relative path")
    return key


def _too_many(root: str, count: int, max_objects: int) -> SourceError:
    return SourceError(
        "too_many_objects",
        f"{root} holds more than {max_objects} objects (found {count} so far), above the limit "
        f"{MAX_OBJECTS_SETTING}={max_objects}: point the source at a narrower prefix, pack small files into "
        "shards, or raise the setting",
    )


def _empty(root: str, why: str = "holds no objects") -> SourceError:
    return SourceError("source_empty", f"{root} {why}; check the source URI")


def _hidden(key: str) -> bool:
    """Dot files (``.DS_Store``, editors' swap files) and Hadoop/Spark markers (``_SUCCESS``) are no data."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith(".") or name.startswith("_")


# ----------------------------------------------------------------------------------------------------------
# file://


class FileSource:
    """A directory (or one file) on this host, confined to the allowed prefixes (module docstring)."""

    local = True

    def __init__(self, root: str, allowed: list[str] | None = None) -> None:
        parts = urlsplit(root)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise SourceError("source_invalid", f"{root!r} is not a file:///absolute/path URI")
        path = unquote(parts.path)
        if not path.startswith("/") or ".." in path.split("/"):
            raise SourceError("source_denied", f"{root!r} must be an absolute path without '..'")
        self.root = root
        bounds = [_file_prefix(a) for a in allowed if a.startswith("file:")] if allowed is not None else None
        real = os.path.realpath(path)
        if bounds is not None and not any(_under(real, b) for b in bounds):
            raise SourceError(
                "source_denied",
                f"{root} (resolved to {real}) is outside the prefixes allowed by {SOURCES_SETTING}",
            )
        if not os.path.exists(real):
            raise _empty(root, "does not exist on this worker (is the volume mounted?)")
        self._bounds = bounds if bounds is not None else [real]
        if os.path.isdir(real):
            self._dir, self._single = Path(path), None
        else:
            self._dir, self._single = Path(path).parent, Path(path).name

    def _checked(self, lexical: Path, shown: str) -> str:
        real = os.path.realpath(lexical)
        if not any(_under(real, b) for b in self._bounds):
            raise SourceError(
                "source_denied",
                f"{shown} under {self.root} is a link to {real}, outside the allowed roots; links may not leave them",
            )
        return real

    def list(self, max_objects: int) -> list[ObjectInfo]:
        if self._single is not None:
            return [self._info(self._single)]
        out: list[ObjectInfo] = []
        seen: set[str] = set()

        def walk(rel: str) -> None:
            real = self._checked(self._dir / rel if rel else self._dir, repr(rel or "."))
            if real in seen:  # a link cycle
                return
            seen.add(real)
            with os.scandir(real) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                key = f"{rel}/{entry.name}" if rel else entry.name
                if _hidden(key):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    if entry.is_symlink():
                        self._checked(self._dir / key, repr(key))
                    walk(key)
                elif entry.is_file(follow_symlinks=True):
                    out.append(self._info(key))
                    if len(out) > max_objects:
                        raise _too_many(self.root, len(out), max_objects)

        walk("")
        if not out:
            raise _empty(self.root)
        return sorted(out, key=lambda o: o.key)

    def _info(self, key: str) -> ObjectInfo:
        real = self._checked(self._dir / key, repr(key))
        st = os.stat(real)
        return ObjectInfo(key, st.st_size, _file_etag(st))

    def fetch(self, obj: ObjectInfo) -> Path:
        real = self._checked(self._dir / check_key(obj.key), repr(obj.key))
        try:
            st = os.stat(real)
        except FileNotFoundError as exc:
            raise _missing(self.root, obj) from exc
        if not stat.S_ISREG(st.st_mode):
            raise _missing(self.root, obj)
        if st.st_size != obj.size or (obj.etag is not None and _file_etag(st) != obj.etag):
            raise _changed(self.root, obj)
        return Path(real)

    def cached(self, obj: ObjectInfo) -> Path | None:
        return self.fetch(obj)

    def open(self, obj: ObjectInfo) -> BinaryIO:
        return self.fetch(obj).open("rb")


def _file_prefix(uri: str) -> str:
    return os.path.realpath(unquote(urlsplit(uri).path))


def _under(real: str, bound: str) -> bool:
    return real == bound or real.startswith(bound.rstrip("/") + "/")


def _file_etag(st: os.stat_result) -> str:
    """What stands for an ETag on a local file: modification time and size (a rewrite changes the time)."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def _changed(root: str, obj: ObjectInfo, now: str = "") -> SourceError:
    return SourceError(
        "shard_changed",
        f"the shard {obj.key!r} of {root} changed after the dataset was registered "
        f"(listed with ETag {obj.etag}, size {obj.size}{'; now ' + now if now else ''}): register the dataset "
        "again, or keep its objects unchanged while it is in use",
    )


def _missing(root: str, obj: ObjectInfo) -> SourceError:
    return SourceError(
        "shard_missing",
        f"the shard {obj.key!r} of {root} is gone since the dataset was registered: restore it or register "
        "the dataset again",
    )


# ----------------------------------------------------------------------------------------------------------
# s3://


class S3Source:
    """An ``s3://bucket/prefix/`` (or one object) read with the blob store's endpoint and AWS_* credentials;
    shards are fetched whole into the shard cache, each GET conditional on the listed ETag (If-Match)."""

    local = False

    def __init__(
        self,
        root: str,
        *,
        settings: Settings,
        cache: ShardCache,
        allowed: list[str] | None = None,
        retry_delay_s: float = 0.5,
    ) -> None:
        parts = urlsplit(root)
        path = parts.path.lstrip("/")
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise SourceError("source_invalid", f"{root!r} is not an s3://bucket/prefix/ URI")
        if ".." in path.split("/") or "//" in path or "\\" in path:
            raise SourceError("source_denied", f"{root!r} must not contain '..', '//' or backslashes")
        if allowed is not None and not any(_s3_under(root, a) for a in allowed if a.startswith("s3://")):
            raise SourceError("source_denied", f"{root} is outside the prefixes allowed by {SOURCES_SETTING}")
        self.root = root
        self.bucket = parts.netloc
        self._settings = settings
        self._cache = cache
        self._retry_delay_s = retry_delay_s
        self._path = path
        self._client: Any = None  # (S3BlobStore, obstore S3Store), made on first use in this process
        self._single: str | None = None
        self._dir = path if (not path or path.endswith("/")) else None  # None: object or prefix, to be asked

    def _stores(self) -> tuple[Any, Any]:
        """The S3 client, built like the blob store's (app.storage.s3: endpoint, region, retries, timeouts)."""
        if self._client is None:
            from app.storage.s3 import S3BlobStore

            if self._dir is None:  # "s3://b/p/x": one object if it exists, else the prefix "p/x/"
                parent, _, name = self._path.rpartition("/")
                probe = S3BlobStore(
                    f"s3://{self.bucket}/{parent}",
                    endpoint_url=self._settings.s3_endpoint_url,
                    region=self._settings.s3_region,
                )
                if self._head(probe.client, name) is not None:
                    self._dir, self._single = parent + "/" if parent else "", name
                else:
                    self._dir = self._path + "/"
            blob_store = S3BlobStore(
                f"s3://{self.bucket}/{self._dir}",
                endpoint_url=self._settings.s3_endpoint_url,
                region=self._settings.s3_region,
            )
            self._client = (blob_store, blob_store.client)
        return self._client

    def _head(self, store: Any, key: str) -> dict[str, Any] | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return dict(obstore.head(store, key))
        except NotFoundError:
            return None
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise _s3_error(exc, self.root, key) from exc

    def list(self, max_objects: int) -> list[ObjectInfo]:
        import obstore

        blob_store, store = self._stores()
        if self._single is not None:
            meta = self._head(store, self._single)
            if meta is None:
                raise _empty(self.root, "does not exist")
            return [ObjectInfo(self._single, int(meta["size"]), meta.get("e_tag"))]
        out: list[ObjectInfo] = []
        try:
            for chunk in obstore.list(store, None, chunk_size=1000):
                for m in chunk:
                    key = blob_store._relative(str(m["path"]))
                    if key.endswith("/") or _hidden(key):
                        continue
                    out.append(ObjectInfo(key, int(m["size"]), m.get("e_tag")))
                if len(out) > max_objects:
                    raise _too_many(self.root, len(out), max_objects)
        except SourceError:
            raise
        except Exception as exc:
            raise _s3_error(exc, self.root, "") from exc
        if not out:
            raise _empty(self.root)
        return sorted(out, key=lambda o: o.key)

    def cached(self, obj: ObjectInfo) -> Path | None:
        return self._cache.peek(self.root, obj)

    def fetch(self, obj: ObjectInfo) -> Path:
        check_key(obj.key)
        return self._cache.get(self.root, obj, lambda out: self._download(obj, out))

    def _download(self, obj: ObjectInfo, out: BinaryIO) -> None:
        """Stream the object into ``out``, conditional on the listed ETag; a few tries before giving up (an
        object mid-overwrite, a dropped connection), then shard_changed naming the key."""
        import obstore
        from obstore.exceptions import NotFoundError, PreconditionError

        _, store = self._stores()
        options: dict[str, Any] = {"if_match": obj.etag} if obj.etag else {}
        problem: Exception | None = None
        for attempt in range(_FETCH_ATTEMPTS):
            if attempt:
                time.sleep(self._retry_delay_s * attempt)
            out.seek(0)
            out.truncate()
            try:
                result = obstore.get(store, obj.key, options=options)  # type: ignore[arg-type]
                etag = result.meta.get("e_tag")
                if obj.etag and etag and etag != obj.etag:  # a store that ignores If-Match
                    problem = _changed(self.root, obj, f"ETag {etag}")
                    continue
                for part in result.stream(min_chunk_size=_CHUNK):
                    out.write(part)
                return
            except (NotFoundError, FileNotFoundError) as exc:
                raise _missing(self.root, obj) from exc
            except PreconditionError:
                problem = _changed(self.root, obj, f"ETag {self._current_etag(obj)}")
            except Exception as exc:
                mapped = _s3_error(exc, self.root, obj.key)
                if not isinstance(mapped, StoreUnavailable):
                    raise mapped from exc
                problem = mapped
        assert problem is not None
        raise problem

    def read_many(self, objs: Iterable[ObjectInfo], window: int = READ_WINDOW) -> Iterator[bytes]:
        """The bytes of small objects (the images of a folder being converted), in order, ``window`` GETs in
        flight (obstore releases the GIL), each conditional on the listed ETag like ``fetch``; memory is
        ``window`` objects. Nothing goes through the shard cache: each object is read once."""
        from concurrent.futures import Future, ThreadPoolExecutor

        def get(obj: ObjectInfo) -> bytes:
            check_key(obj.key)
            out = io.BytesIO()
            self._download(obj, out)
            return out.getvalue()

        pending: collections.deque[Future[bytes]] = collections.deque()
        with ThreadPoolExecutor(max_workers=window, thread_name_prefix="s3-read") as pool:
            try:
                for obj in objs:
                    pending.append(pool.submit(get, obj))
                    if len(pending) >= window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _current_etag(self, obj: ObjectInfo) -> str:
        _, store = self._stores()
        meta = self._head(store, obj.key)
        return "none (deleted)" if meta is None else str(meta.get("e_tag"))

    def open(self, obj: ObjectInfo) -> BinaryIO:
        import obstore

        from app.storage.s3 import RemoteFile

        check_key(obj.key)
        blob_store, store = self._stores()
        meta = self._head(store, obj.key)
        if meta is None:
            raise _missing(self.root, obj)
        if int(meta["size"]) != obj.size or (obj.etag and meta.get("e_tag") != obj.etag):
            raise _changed(self.root, obj, f"ETag {meta.get('e_tag')}, size {meta['size']}")
        try:
            reader = obstore.open_reader(store, obj.key, buffer_size=4 << 20)
        except Exception as exc:
            raise _s3_error(exc, self.root, obj.key) from exc
        return RemoteFile(reader, obj.key, blob_store, meta["last_modified"].timestamp())  # type: ignore[return-value]


def _s3_under(root: str, allowed: str) -> bool:
    prefix = allowed if allowed.endswith("/") else allowed + "/"
    return root == allowed or root.startswith(prefix) or root + "/" == prefix


def _s3_error(exc: Exception, root: str, key: str) -> Exception:
    """obstore's exception as ours: refusals are the source's problem (SourceError), an outage is not."""
    from app.storage.s3 import is_unavailable

    text = str(exc)
    where = f"{root}{key}"
    if "NoSuchBucket" in text:
        return SourceError("source_empty", f"the bucket of {root} does not exist at the configured endpoint")
    if any(
        code in text
        for code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403 Forbidden", "401")
    ):
        return SourceError(
            "source_denied",
            f"the store refused our credentials for {where}: the worker reads s3:// sources with "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or its role) and SECATEURS_S3_ENDPOINT_URL; grant them "
            "read access to the bucket",
        )
    if is_unavailable(exc):
        return StoreUnavailable(f"the store holding {where} did not answer; retry shortly", retry_after=5)
    return SourceError(
        "source_unreadable", f"reading {where} failed: {text.splitlines()[0][:300] if text else exc!r}"
    )


# ----------------------------------------------------------------------------------------------------------
# blob: (our own store: uploads and the shards conversion wrote)


class BlobSource:
    """Keys under ``datasets/`` in our blob store: the files themselves when the store is this host's data
    directory, else fetched through the shard cache (our blobs are written once, so size is the check)."""

    def __init__(self, root: str, *, storage: Storage, cache: ShardCache | None) -> None:
        key = root[len("blob:") :] if root.startswith("blob:") else ""
        if not _BLOB_KEY.fullmatch(key) or ".." in key.split("/"):
            raise SourceError("source_invalid", f"{root!r} is not a blob:datasets/<id>/... key of ours")
        from app.storage.local import LocalBlobStore

        self.root = root
        self._storage = storage
        self._cache = cache
        self._local_store = storage.blobs if isinstance(storage.blobs, LocalBlobStore) else None
        self.local = self._local_store is not None
        if key.endswith("/"):
            self._dir, self._single = key, None
        else:
            self._dir, _, self._single = key.rpartition("/")
            self._dir += "/"

    def _full(self, key: str) -> str:
        return self._dir + check_key(key)

    def list(self, max_objects: int) -> list[ObjectInfo]:
        if self._single is not None:
            try:
                info = self._storage.blobs.head(self._dir + self._single)
            except FileNotFoundError as exc:
                raise _empty(self.root, "does not exist") from exc
            return [ObjectInfo(self._single, info.size, None)]
        out = []
        for blob in self._storage.blobs.list(self._dir):
            key = blob.key[len(self._dir) :]
            if not key or _hidden(key):
                continue
            out.append(ObjectInfo(key, blob.size, None))
            if len(out) > max_objects:
                raise _too_many(self.root, len(out), max_objects)
        if not out:
            raise _empty(self.root)
        return sorted(out, key=lambda o: o.key)

    def cached(self, obj: ObjectInfo) -> Path | None:
        if self._local_store is not None:
            return self.fetch(obj)
        return self._cache.peek(self.root, obj) if self._cache is not None else None

    def fetch(self, obj: ObjectInfo) -> Path:
        full = self._full(obj.key)
        if self._local_store is not None:
            path = self._local_store.path(full)
            try:
                size = path.stat().st_size
            except FileNotFoundError as exc:
                raise _missing(self.root, obj) from exc
            if size != obj.size:
                raise _changed(self.root, obj, f"size {size}")
            return path
        if self._cache is None:
            raise RuntimeError("a remote blob store needs a ShardCache to read shards as files")
        return self._cache.get(self.root, obj, lambda out: self._download(full, obj, out))

    def _download(self, full: str, obj: ObjectInfo, out: BinaryIO) -> None:
        try:
            with self._storage.blobs.open(full) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
        except FileNotFoundError as exc:
            raise _missing(self.root, obj) from exc

    def open(self, obj: ObjectInfo) -> BinaryIO:
        try:
            return self._storage.blobs.open(self._full(obj.key))
        except FileNotFoundError as exc:
            raise _missing(self.root, obj) from exc


# ----------------------------------------------------------------------------------------------------------


def shard_cache(settings: Settings) -> ShardCache:
    """The worker's shard cache: ``shards/`` inside the blob cache's directory, under the same byte cap."""
    base = settings.cache_dir or settings.data_dir / "cache"
    return ShardCache(Path(base) / "shards", settings.dataset_cache_max_bytes)


SOURCES: dict[str, Callable[..., Source]] = {
    "file": lambda root, storage, settings, allowed, cache: FileSource(root, allowed),
    "s3": lambda root, storage, settings, allowed, cache: S3Source(
        root, settings=settings, cache=cache or shard_cache(settings), allowed=allowed
    ),
    "blob": lambda root, storage, settings, allowed, cache: BlobSource(
        root,
        storage=storage,
        cache=cache if cache is not None or not storage.remote else shard_cache(settings),
    ),
}


def open_source(
    root: str,
    *,
    storage: Storage,
    settings: Settings,
    allowed: list[str] | None,
    cache: ShardCache | None = None,
) -> Source:
    """The :class:`Source` for ``root`` by scheme (``file://``, ``s3://``, ``blob:``). ``allowed`` is the
    tenant's list from SECATEURS_DATASET_SOURCES; None means the caller vouches for ``root`` (our own blobs,
    tests). ``blob:`` roots are ours and not checked against it. ``cache`` defaults to :func:`shard_cache`."""
    scheme = urlsplit(root).scheme
    opener = SOURCES.get(scheme)
    if opener is None:
        raise SourceError(
            "source_invalid",
            f"{root[:200]!r} has no reader; sources are file:///..., s3://bucket/prefix/ or blob:",
        )
    return opener(root, storage, settings, allowed, cache)


__all__ = [
    "BlobSource",
    "FileSource",
    "ObjectInfo",
    "S3Source",
    "Source",
    "check_key",
    "open_source",
    "shard_cache",
]
