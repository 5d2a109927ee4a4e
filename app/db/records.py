"""Records of every kind: new ids, add and get (a tenant's own only), and the lists, newest first.

No FastAPI here: the API and the worker use the same functions. Reads on behalf of a caller take its
``tenant``: a row of another tenant is simply not found, so the API answers 404 and never confirms that someone
else's id exists. Lists page by keyset (``created_at``, ``id``), handed out as an opaque cursor.
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.db.tables import DatasetRecord, JobRecord, ModelRecord, as_utc

Record = TypeVar("Record", ModelRecord, DatasetRecord, JobRecord)


class BadCursor(ValueError):
    """A `cursor` query parameter that this service did not hand out."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


# --- pagination -------------------------------------------------------------------------------------------


def encode_cursor(record: ModelRecord | DatasetRecord | JobRecord) -> str:
    created = as_utc(record.created_at)
    assert created is not None
    raw = json.dumps([created.isoformat(), record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, record_id = json.loads(raw)
        return datetime.fromisoformat(created), str(record_id)
    except (ValueError, TypeError) as exc:
        raise BadCursor("cursor is not one this service handed out; start again without it") from exc


def _page(
    session: Session, model: type[Record], filters: list[Any], limit: int, cursor: str | None
) -> tuple[list[Record], str | None]:
    query = select(model).where(*filters)
    if cursor:
        created, record_id = _decode_cursor(cursor)
        query = query.where(
            or_(model.created_at < created, and_(model.created_at == created, model.id < record_id))
        )
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


# --- records ------------------------------------------------------------------------------------------------


def add(session: Session, record: Record) -> Record:
    session.add(record)
    session.flush()
    return record


def get(session: Session, model: type[Record], record_id: str) -> Record | None:
    return session.get(model, record_id)


def get_owned(session: Session, model: type[Record], record_id: str, tenant: str) -> Record | None:
    """The record if it exists AND belongs to ``tenant``; None otherwise (the two are indistinguishable)."""
    record = session.get(model, record_id)
    return record if record is not None and record.tenant == tenant else None


def _tenant_filter(model: type[Record], tenant: str | None) -> list[Any]:
    return [] if tenant is None else [model.tenant == tenant]


def list_models(
    session: Session, limit: int, cursor: str | None, *, tenant: str | None = None
) -> tuple[list[ModelRecord], str | None]:
    """``tenant=None`` lists across tenants (operators, tests); the API always passes the caller's."""
    return _page(session, ModelRecord, _tenant_filter(ModelRecord, tenant), limit, cursor)


def list_datasets(
    session: Session, limit: int, cursor: str | None, *, tenant: str | None = None
) -> tuple[list[DatasetRecord], str | None]:
    """``tenant=None`` lists across tenants (operators, tests); the API always passes the caller's."""
    return _page(session, DatasetRecord, _tenant_filter(DatasetRecord, tenant), limit, cursor)


def list_jobs(
    session: Session,
    limit: int,
    cursor: str | None,
    status: str | None = None,
    model_id: str | None = None,
    *,
    tenant: str | None = None,
) -> tuple[list[JobRecord], str | None]:
    """``tenant=None`` lists across tenants (operators, tests); the API always passes the caller's."""
    filters = _tenant_filter(JobRecord, tenant)
    if status:
        filters.append(JobRecord.status == status)
    if model_id:
        filters.append(JobRecord.model_id == model_id)
    return _page(session, JobRecord, filters, limit, cursor)
