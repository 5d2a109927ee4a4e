"""API keys: stored as a public prefix and the secret's SHA-256 (``app.auth`` makes and checks them)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.db.tables import ApiKeyRecord, utcnow

# last_used_at is informational: writing it on every request would make every read a write (and, on SQLite,
# contend with the worker), so it is refreshed at most once per this many seconds per key.
KEY_TOUCH_EVERY_S = 60


def add_api_key(
    session: Session, *, key_id: str, tenant: str, prefix: str, secret_sha256: str
) -> ApiKeyRecord:
    record = ApiKeyRecord(id=key_id, tenant=tenant, prefix=prefix, secret_sha256=secret_sha256)
    session.add(record)
    session.flush()
    return record


def find_api_key(session: Session, prefix: str) -> ApiKeyRecord | None:
    return session.scalars(select(ApiKeyRecord).where(ApiKeyRecord.prefix == prefix)).one_or_none()


def list_api_keys(session: Session) -> list[ApiKeyRecord]:
    return list(session.scalars(select(ApiKeyRecord).order_by(ApiKeyRecord.created_at, ApiKeyRecord.id)))


def any_active_api_key(session: Session) -> bool:
    return (
        session.scalars(select(ApiKeyRecord.id).where(ApiKeyRecord.revoked_at.is_(None)).limit(1)).first()
        is not None
    )


def revoke_api_key(session: Session, key_id: str) -> bool:
    """True if this call revoked it; False if there is no such key or it was already revoked."""
    result = session.execute(
        update(ApiKeyRecord)
        .where(ApiKeyRecord.id == key_id, ApiKeyRecord.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount == 1


def touch_api_key(session: Session, key_id: str) -> None:
    now = utcnow()
    session.execute(
        update(ApiKeyRecord)
        .where(
            ApiKeyRecord.id == key_id,
            or_(
                ApiKeyRecord.last_used_at.is_(None),
                ApiKeyRecord.last_used_at < now - timedelta(seconds=KEY_TOUCH_EVERY_S),
            ),
        )
        .values(last_used_at=now)
        # SQLite hands back naive datetimes: comparing them in Python with ``now`` would fail, and nothing
        # reads the loaded key's last_used_at after this anyway.
        .execution_options(synchronize_session=False)
    )
