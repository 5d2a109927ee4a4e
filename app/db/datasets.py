"""A dataset's status after registration: ``validating`` -> (``converting``) -> ``ready`` | ``invalid``, set by the
worker task ``secateurs.validate_dataset`` (app.queue.VALIDATE_DATASET), with a bounded number of attempts (a
dataset whose validation kills the worker must not be re-sent into the same crash forever).

The reaper (app.maintenance) re-sends a pending dataset's message once ``dispatched_at`` is older than
SECATEURS_REDISPATCH_AFTER_S (900 s): beginning a validation and every progress report set it to now, so a long
conversion that reports progress more often than that is not sent twice. A validation that finds its
attempts used up (``begin_dataset_validation`` False while still pending) should end the dataset ``invalid``
with ``set_dataset_result``.

Every write is a conditional UPDATE on the id: a dataset deleted while its validation runs simply matches no
row, and the functions answer False so the worker can stop (and remove the shards it wrote).
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db.tables import PENDING_DATASET_STATUSES, DatasetRecord, utcnow


def begin_dataset_validation(session: Session, dataset_id: str, max_attempts: int) -> bool:
    """Count one more validation of a pending dataset; False once ``max_attempts`` were begun (each one before
    this ended without a result: the process running it died), or when it is no longer pending (done, or
    deleted). Commit it before the heavy work, so a crash in that work still counts."""
    result = session.execute(
        update(DatasetRecord)
        .where(
            DatasetRecord.id == dataset_id,
            DatasetRecord.status.in_(PENDING_DATASET_STATUSES),
            DatasetRecord.attempts < max_attempts,
        )
        .values(attempts=DatasetRecord.attempts + 1, dispatched_at=utcnow())
    )
    return result.rowcount == 1


def set_dataset_progress(
    session: Session, dataset_id: str, status: Literal["validating", "converting"], progress: float | None
) -> bool:
    """Show where a pending validation stands (``progress`` 0..1, or None when unknown) and that its worker is
    alive (the reaper does not re-send it meanwhile); False when the dataset is gone or already has its
    verdict: stop then."""
    result = session.execute(
        update(DatasetRecord)
        .where(DatasetRecord.id == dataset_id, DatasetRecord.status.in_(PENDING_DATASET_STATUSES))
        .values(
            status=status,
            progress=None if progress is None else min(max(float(progress), 0.0), 1.0),
            dispatched_at=utcnow(),
        )
    )
    return result.rowcount == 1


def set_dataset_result(
    session: Session,
    dataset_id: str,
    *,
    status: Literal["ready", "invalid"],
    manifest: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
    shards: int | None = None,
    n_samples: int | None = None,
    size_bytes: int | None = None,
    features: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
    arrays: dict[str, Any] | None = None,
) -> bool:
    """The worker's verdict. ``ready`` needs the manifest (the stream reader's input) and should carry
    ``arrays`` (per-sample shape/dtype after decode, first dim n_samples or -1) so the API's fit checks apply;
    ``invalid`` carries ``error`` = {"code", "message"}. Fields left None keep what the record had (an upload's
    size_bytes stays). False when the dataset is gone (deleted meanwhile) or was already decided."""
    if status == "ready" and manifest is None:
        raise ValueError("a ready dataset needs its manifest")
    if status == "invalid" and not error:
        raise ValueError("an invalid dataset needs an error {'code', 'message'}")
    values: dict[str, Any] = {"status": status, "error": error, "progress": None}
    if status == "ready":
        values["progress"] = 1.0
    for name, value in (
        ("manifest", manifest),
        ("shards", shards),
        ("n_samples", n_samples),
        ("size_bytes", size_bytes),
        ("features", features),
        ("class_names", class_names),
        ("arrays", arrays),
    ):
        if value is not None:
            values[name] = value
    result = session.execute(
        update(DatasetRecord)
        .where(DatasetRecord.id == dataset_id, DatasetRecord.status.in_(PENDING_DATASET_STATUSES))
        .values(**values)
    )
    return result.rowcount == 1
