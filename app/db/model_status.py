"""A model's status after upload: ``validating`` -> ``ready`` | ``invalid``, set by the worker that loaded it,
with a bounded number of loads (a model whose loading kills the worker must not be retried forever)."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db.tables import ModelRecord, utcnow


def set_model_result(
    session: Session,
    model_id: str,
    *,
    status: Literal["ready", "invalid"],
    signatures: dict[str, Any] | None = None,
    params: int | None = None,
    error: dict[str, str] | None = None,
) -> bool:
    result = session.execute(
        update(ModelRecord)
        .where(ModelRecord.id == model_id)
        .values(status=status, signatures=signatures, params=params, error=error, updated_at=utcnow())
    )
    return result.rowcount == 1


def begin_model_load(session: Session, model_id: str, max_attempts: int) -> bool:
    """Count one more load of a validating model; False once ``max_attempts`` loads were begun (each one
    before this ended without a result: the process running it died)."""
    result = session.execute(
        update(ModelRecord)
        .where(
            ModelRecord.id == model_id,
            ModelRecord.status == "validating",
            ModelRecord.load_attempts < max_attempts,
        )
        .values(load_attempts=ModelRecord.load_attempts + 1)
    )
    return result.rowcount == 1
