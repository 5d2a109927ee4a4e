"""What a worker reads from and writes to the blob store, with retries across a short store outage.

With the data directory as the store (the embedded default) these are the files the API wrote, read in place.
With a remote store (S3) a worker shares no disk with the API: uploads come through the host's
content-addressed cache (``app.storage.cache``) and a job's outputs are put into the store *before* the job is
recorded ``succeeded``, so a succeeded job never lacks a file. A store that does not answer is retried for
``RETRY_WINDOW_S`` (obstore retries each request too); then the operation raises StoreUnavailable and the task
fails the job with ``store_unavailable``, a reason that says to resubmit.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app.db.tables import DatasetRecord, ModelRecord
from app.errors import StoreUnavailable
from app.storage import Storage

log = logging.getLogger("secateurs.worker")
T = TypeVar("T")
RETRY_WINDOW_S = 60.0
MAX_LOCAL_MODELS = 8
_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0)
_MODEL_FILES = {"keras": ("model.keras",), "saved_model": ("upload.zip", "upload.tar.gz")}


def with_retries(what: str, call: Callable[[], T], window_s: float | None = None) -> T:
    """``call()``, again after StoreUnavailable with backoff until ``window_s`` has passed, then raise it."""
    deadline = time.monotonic() + (RETRY_WINDOW_S if window_s is None else window_s)
    attempt = 0
    while True:
        try:
            return call()
        except StoreUnavailable as exc:
            delay = _BACKOFF[min(attempt, len(_BACKOFF) - 1)]
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable(
                    f"{exc.detail} ({what}; tried {attempt + 1} times over {RETRY_WINDOW_S:.0f} s)",
                    retry_after=exc.retry_after,
                ) from exc
            log.warning("blob store unavailable (%s), retrying in %.0f s: %s", what, delay, exc.detail)
            time.sleep(delay)
            attempt += 1


def model_source(record: ModelRecord, storage: Storage) -> Path:
    """A local path of the model's upload (.zip / .tar.gz / .keras), with its suffix."""
    names = _MODEL_FILES["keras" if record.format == "keras" else "saved_model"]
    if not storage.remote:
        model_dir = storage.model_dir(record.id)
        return next((model_dir / n for n in names if (model_dir / n).is_file()), model_dir / names[0])

    _touch_and_prune_models(storage, record.id)

    def fetch() -> Path:
        for name in names:
            key = storage.model_key(record.id, name)
            try:
                return storage.local_blob(key, record.sha256, _suffix(name))
            except FileNotFoundError:
                continue
        raise FileNotFoundError(f"model {record.id}'s upload is not in the store ({storage.blobs.url})")

    return with_retries(f"fetching model {record.id}", fetch)


def dataset_file(record: DatasetRecord, storage: Storage) -> Path:
    """A local path of the dataset's .npz."""
    key = storage.dataset_key(record.id)
    if not storage.remote:
        return storage.dataset_path(record.id)
    return with_retries(
        f"fetching dataset {record.id}", lambda: storage.local_blob(key, record.sha256, ".npz")
    )


def publish_job_files(storage: Storage, job_id: str, files: list[str]) -> None:
    """Put the job's files (relative to its local job directory) into a remote store, then drop the local copy;
    nothing to do locally, where the job directory *is* the store. A file put twice (a retry) is overwritten."""
    if not storage.remote:
        return
    job_dir = storage.job_dir(job_id)
    for file in files:
        key = storage.job_key(job_id, file)
        path = job_dir / file
        with_retries(f"storing {key}", lambda key=key, path=path: storage.publish(key, path))  # type: ignore[misc]
    shutil.rmtree(job_dir, ignore_errors=True)  # the store has it all; this host keeps no copy


def _touch_and_prune_models(storage: Storage, model_id: str) -> None:
    """With a remote store a worker host's ``models/<id>/`` holds only derived copies (the extracted
    SavedModel): mark this one used and keep the ``MAX_LOCAL_MODELS`` most recently used, so a long-running host
    does not fill its disk (the uploads themselves live in the size-capped cache)."""
    current = storage.model_dir(model_id)
    current.mkdir(parents=True, exist_ok=True)
    os.utime(current)
    models = sorted(
        (p for p in storage.models_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for stale in models[MAX_LOCAL_MODELS:]:
        if stale != current:
            shutil.rmtree(stale, ignore_errors=True)


def _suffix(name: str) -> str:
    return ".tar.gz" if name.endswith(".tar.gz") else Path(name).suffix
