"""Retention: delete what has been kept long enough, so the data directory does not grow without bound.

:func:`sweep` is called every ``retention_interval_s`` by the API process (app.maintenance) and once by
``secateurs cleanup``. Each pass, for every TTL that is not 0 (0 = keep forever):

- models older than ``model_ttl_days`` (since upload) go, record and files, unless a queued or running job
  uses them; likewise datasets (``dataset_ttl_days``). Afterwards their ids answer 404 like unknown ones;
- jobs that ended more than ``artifact_ttl_days`` ago lose their artifact and metrics but keep their record,
  marked ``expired_at``, so the downloads answer 410 Gone saying when and why instead of a puzzling 404;
- temp files that a killed API left in ``tmp/`` and untouched for ``tmp_ttl_s`` go, and so do leftovers:
  blobs whose record is gone (a crash between deleting a record and its files) or whose job expired.

Safe to run from several processes at once and to repeat: every deletion is one conditional statement
(``DELETE ... WHERE id = ? AND created_at < cutoff AND NOT EXISTS (an active job)`` / ``UPDATE ... WHERE
expired_at IS NULL``) in its own short transaction, and only the process whose statement hit the row removes
the files. Records go (or are marked) before their files: a request that reads the record afterwards answers
404 / 410, and a download that had already opened its file finishes from the open descriptor (POSIX keeps an
unlinked file readable; app.api.artifacts serves from the descriptor, not the path).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.engine import session_scope
from app.db.tables import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    DatasetRecord,
    JobRecord,
    ModelRecord,
    utcnow,
)
from app.errors import StoreUnavailable
from app.storage import ID_PATTERN, Storage

log = logging.getLogger("secateurs.retention")
# Ids read per query. Each deletion is still its own transaction; this only bounds one SELECT's result.
_BATCH = 500


@dataclass
class RetentionReport:
    """What one sweep removed, by kind; logged by the maintenance loop, printed by ``secateurs cleanup``."""

    models: int = 0
    datasets: int = 0
    artifacts: int = 0  # jobs whose artifact and metrics were deleted (their records stay, marked expired)
    tmp: int = 0  # leftover temp entries (killed uploads, interrupted deletes)
    leftovers: int = 0  # blobs with no record, or of an expired job (a crash between record and files)

    @property
    def total(self) -> int:
        return self.models + self.datasets + self.artifacts + self.tmp + self.leftovers

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def sweep(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage, now: datetime | None = None
) -> RetentionReport:
    """One retention pass (module docstring). ``now`` is for tests; it defaults to the current UTC time."""
    now = now or utcnow()
    report = RetentionReport()
    if settings.model_ttl_days > 0:
        report.models = _expire_models(sessions, storage, now - timedelta(days=settings.model_ttl_days))
    if settings.dataset_ttl_days > 0:
        cutoff = now - timedelta(days=settings.dataset_ttl_days)
        report.datasets = _expire_datasets(sessions, storage, cutoff)
    if settings.artifact_ttl_days > 0:
        cutoff = now - timedelta(days=settings.artifact_ttl_days)
        report.artifacts = _expire_artifacts(sessions, storage, cutoff, now)
    report.tmp = storage.sweep_tmp(settings.tmp_ttl_s)
    report.leftovers = _sweep_leftovers(sessions, storage, now.timestamp() - settings.tmp_ttl_s)
    if report.total:
        log.info("retention: removed %s", report.as_dict())
    return report


# --- models and datasets ------------------------------------------------------------------------------------


def _model_in_use() -> Any:
    return exists().where(JobRecord.model_id == ModelRecord.id, JobRecord.status.in_(ACTIVE_JOB_STATUSES))


def _dataset_in_use() -> Any:
    return exists().where(
        or_(
            JobRecord.train_dataset_id == DatasetRecord.id,
            JobRecord.eval_dataset_id == DatasetRecord.id,
            JobRecord.calibration_dataset_id == DatasetRecord.id,
        ),
        JobRecord.status.in_(ACTIVE_JOB_STATUSES),
    )


def _expire_models(sessions: sessionmaker[Session], storage: Storage, cutoff: datetime) -> int:
    due = [ModelRecord.created_at < cutoff, ~_model_in_use()]
    removed = 0
    for model_id in _ids(sessions, ModelRecord.id, due):
        with session_scope(sessions) as session:
            gone = session.execute(
                delete(ModelRecord)
                .where(ModelRecord.id == model_id, *due)
                .execution_options(synchronize_session=False)
            ).rowcount
        if gone == 1:  # this process won the row: the files are ours to remove
            removed += 1
            _remove(storage.remove_model, model_id)
    return removed


def _expire_datasets(sessions: sessionmaker[Session], storage: Storage, cutoff: datetime) -> int:
    due = [DatasetRecord.created_at < cutoff, ~_dataset_in_use()]
    removed = 0
    for dataset_id in _ids(sessions, DatasetRecord.id, due):
        with session_scope(sessions) as session:
            gone = session.execute(
                delete(DatasetRecord)
                .where(DatasetRecord.id == dataset_id, *due)
                .execution_options(synchronize_session=False)
            ).rowcount
        if gone == 1:
            removed += 1
            _remove(storage.remove_dataset, dataset_id)
    return removed


# --- job outputs --------------------------------------------------------------------------------------------


def _expire_artifacts(
    sessions: sessionmaker[Session], storage: Storage, cutoff: datetime, now: datetime
) -> int:
    """Failed and canceled jobs are marked too: a job canceled while saving can still have files."""
    due = [
        JobRecord.expired_at.is_(None),
        JobRecord.status.in_(TERMINAL_JOB_STATUSES),
        JobRecord.finished_at < cutoff,
    ]
    expired = 0
    for job_id in _ids(sessions, JobRecord.id, due):
        with session_scope(sessions) as session:
            marked = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, *due)
                .values(expired_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
        if marked == 1:
            expired += 1
            _remove(storage.remove_job, job_id)
    return expired


# --- leftovers ----------------------------------------------------------------------------------------------


def _sweep_leftovers(sessions: sessionmaker[Session], storage: Storage, unchanged_since: float) -> int:
    """Blobs whose record is gone and that have not changed since ``unchanged_since`` (an upload is moved into
    place a moment before its record is committed, so a fresh blob without a record is normal), and every
    expired job's blobs."""
    removed = 0
    for model, folder, suffix, remove in (
        (ModelRecord, storage.models_dir, "", storage.remove_model),
        (DatasetRecord, storage.datasets_dir, ".npz", storage.remove_dataset),
        (DatasetRecord, storage.datasets_dir, "", storage.remove_dataset),  # datasets/<id>/ (upload, shards)
        (JobRecord, storage.jobs_dir, "", storage.remove_job),
    ):
        blobs = list(
            _blobs(folder, suffix)
        )  # listed first: removing while scanning a directory is unspecified
        if storage.remote:  # the store's objects too: a delete the store missed (an outage) is found here
            stored = storage.stored_ids(f"{Path(folder).name}/", suffix)
            local = dict(blobs)
            blobs = [(i, max(local.get(i, 0.0), stored.get(i, 0.0))) for i in sorted({*local, *stored})]
        for batch in _chunks(blobs, _BATCH):
            ids = [blob_id for blob_id, _ in batch]
            with session_scope(sessions) as session:
                query = select(model.id).where(model.id.in_(ids))
                live = set(session.scalars(query))
                expired = (
                    set(session.scalars(query.where(JobRecord.expired_at.is_not(None))))
                    if model is JobRecord
                    else set()
                )
            for blob_id, changed in batch:
                orphan = blob_id not in live and changed < unchanged_since
                if (orphan or blob_id in expired) and _remove(remove, blob_id):
                    removed += 1
    return removed


def _blobs(folder: os.PathLike[str], suffix: str) -> Iterator[tuple[str, float]]:
    """(id, when last changed) of each entry named ``<id><suffix>``; anything else is not ours to judge.
    ctime counts too: moving a finished upload into place changes it, not its mtime."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.endswith(suffix):
                continue
            blob_id = entry.name[: len(entry.name) - len(suffix)] if suffix else entry.name
            if not ID_PATTERN.fullmatch(blob_id):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield blob_id, max(info.st_mtime, info.st_ctime)


# --- helpers ------------------------------------------------------------------------------------------------


def _ids(sessions: sessionmaker[Session], column: Any, where: list[Any]) -> Iterator[str]:
    """Ids matching ``where``, a batch per short read transaction, in id order (keyset: rows that stay, e.g. a
    model an active job protects, are not read again in the same pass)."""
    after = ""
    while True:
        with session_scope(sessions) as session:
            batch = list(
                session.scalars(select(column).where(*where, column > after).order_by(column).limit(_BATCH))
            )
        yield from batch
        if len(batch) < _BATCH:
            return
        after = batch[-1]


def _chunks(items: list[tuple[str, float]], size: int) -> Iterator[list[tuple[str, float]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _remove(remove: Callable[[str], None], blob_id: str) -> bool:
    """Files that cannot be removed now (permissions, a busy mount) are logged; the next pass finds them as
    leftovers, so one bad entry does not stop the sweep."""
    try:
        remove(blob_id)
    except (OSError, StoreUnavailable):
        log.warning("retention: could not remove the files of %s; will retry", blob_id, exc_info=True)
        return False
    return True
