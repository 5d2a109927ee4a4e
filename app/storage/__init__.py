"""Blob storage: the data directory, or a remote store behind it.

:class:`Storage` is the one object routes, retention and workers use: the data directory's layout (uploads in
flight, a worker's scratch space) and, behind it, the blob store ``SECATEURS_STORAGE_URL`` chooses
(``app.storage.registry``): with none, blobs are the data directory's files as they always were; with
``s3://...``, the API and workers share no disk and blobs travel through the store (workers keep a
content-addressed cache, ``app.storage.cache``).

Paths are built only from ids we generated (checked against ``ID_PATTERN``), never from user input.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from app.errors import NotFound
from app.storage.base import BlobStore
from app.storage.cache import BlobCache
from app.storage.local import LocalBlobStore
from app.storage.registry import open_blob_store

if TYPE_CHECKING:
    from app.config import Settings

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The file kinds a dataset upload is kept as (datasets/<id>/upload<ext>).
DATASET_UPLOAD_EXTENSIONS = (".npz", ".tfrecord", ".tfrecord.gz", ".parquet", ".tar", ".zip")


class Storage:
    """The data directory's layout: models/<id>/, datasets/<id>.npz (or datasets/<id>/upload<ext> and
    datasets/<id>/shards/), jobs/<id>/, tmp/ (uploads in flight),
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

    def dataset_upload_key(self, dataset_id: str, ext: str) -> str:
        """An upload kept as sent (issue 20): ``datasets/<id>/upload<ext>``; ``ext`` is one of ours."""
        if ext not in DATASET_UPLOAD_EXTENSIONS:
            raise ValueError(f"not a dataset upload extension: {ext!r}")
        return f"datasets/{_checked_id(dataset_id, 'dataset')}/upload{ext}"

    def dataset_shard_prefix(self, dataset_id: str) -> str:
        """Where a conversion or unpacking writes the dataset's shards: ``datasets/<id>/shards/``."""
        return f"datasets/{_checked_id(dataset_id, 'dataset')}/shards/"

    def job_key(self, job_id: str, file: str) -> str:
        return f"jobs/{_checked_id(job_id, 'job')}/{file}"

    # --- blobs ------------------------------------------------------------------------------------------

    def commit_upload(self, path: Path, key: str) -> None:
        """Keep a received (and checked) upload's temp file under ``key``: a rename into the data directory, or a
        streamed multipart upload into the remote store (the temp file goes either way)."""
        if not self.remote:
            self.publish(key, path)
            return
        try:
            self.blobs.put_file(key, path)
        finally:
            path.unlink(missing_ok=True)

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
        """Both forms: the legacy ``datasets/<id>.npz`` and the folder ``datasets/<id>/`` (upload, shards)."""
        self._remove(self.dataset_path(dataset_id))
        self._remove(self.datasets_dir / _checked_id(dataset_id, "dataset"))
        if self.remote:
            self.blobs.delete_prefix(self.dataset_key(dataset_id))
            self.blobs.delete_prefix(f"datasets/{dataset_id}/")

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
