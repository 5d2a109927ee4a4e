"""Idempotency-Key rows: one per (tenant, key), held while a request runs, then the response to replay.

``app.api.idempotency`` decides what a repeated request gets; these functions make each step race-safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.tables import IdempotencyRecord, as_utc, utcnow


@dataclass(frozen=True)
class KeyClaim:
    """Outcome of asking for an Idempotency-Key: we hold it now, or the row that someone else made."""

    outcome: Literal["claimed", "in_flight", "done"]
    existing: IdempotencyRecord | None = None


def claim_idempotency_key(
    session: Session,
    *,
    tenant: str,
    key: str,
    endpoint: str,
    fingerprint: str | None,
    owner: str,
    lock_seconds: int,
    ttl_seconds: int,
) -> KeyClaim:
    """Insert an ``in_flight`` row for (tenant, key), race-safely; COMMITS (give it a session of its own).

    The hold must be visible to a concurrent request at once, so this commits instead of joining the caller's
    transaction. Two requests inserting at once: the unique constraint lets one win, the loser reads the
    winner's row. An expired row is deleted and the insert retried; an ``in_flight`` row whose lock ran out (its
    process died mid-request) is taken over with a conditional UPDATE, so only one taker wins.
    """
    existing: IdempotencyRecord | None = None
    for _ in range(5):
        now = utcnow()
        try:
            session.add(
                IdempotencyRecord(
                    tenant=tenant,
                    key=key,
                    endpoint=endpoint,
                    fingerprint=fingerprint,
                    status="in_flight",
                    owner=owner,
                    locked_until=now + timedelta(seconds=lock_seconds),
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_seconds),
                )
            )
            session.commit()
            return KeyClaim("claimed")
        except IntegrityError:
            session.rollback()
        existing = session.scalars(
            select(IdempotencyRecord).where(IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key)
        ).one_or_none()
        if existing is None:  # deleted (expired, released) between our insert and this read: insert again
            continue
        if as_utc(existing.expires_at) <= now:  # type: ignore[operator]
            session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id == existing.id))
            session.commit()
            continue
        if existing.status == "in_flight" and as_utc(existing.locked_until) <= now:  # type: ignore[operator]
            taken = session.execute(
                update(IdempotencyRecord)
                .where(IdempotencyRecord.id == existing.id, IdempotencyRecord.owner == existing.owner)
                .values(
                    owner=owner,
                    endpoint=endpoint,
                    fingerprint=fingerprint,
                    locked_until=now + timedelta(seconds=lock_seconds),
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_seconds),
                )
            )
            session.commit()
            if taken.rowcount == 1:
                return KeyClaim("claimed")
            continue
        session.commit()  # end the read transaction: the caller keeps no lock
        return KeyClaim("done" if existing.status == "done" else "in_flight", existing)
    return KeyClaim("in_flight", existing)  # the row kept changing under us: a live competitor holds it


def _held_by(tenant: str, key: str, owner: str) -> list[Any]:
    """The row of (tenant, key), as long as ``owner`` still holds it (a taker may have replaced a dead one)."""
    return [
        IdempotencyRecord.tenant == tenant,
        IdempotencyRecord.key == key,
        IdempotencyRecord.owner == owner,
    ]


def set_idempotency_fingerprint(
    session: Session, *, tenant: str, key: str, owner: str, fingerprint: str
) -> bool:
    """Record an upload's fingerprint once its body has been received (it is unknown at claim time)."""
    result = session.execute(
        update(IdempotencyRecord)
        .where(*_held_by(tenant, key, owner), IdempotencyRecord.status == "in_flight")
        .values(fingerprint=fingerprint)
    )
    return result.rowcount == 1


def complete_idempotency_key(
    session: Session,
    *,
    tenant: str,
    key: str,
    owner: str,
    status_code: int,
    headers: dict[str, str],
    body: dict[str, Any],
) -> bool:
    """``in_flight`` -> ``done`` with the response to replay. Call inside the transaction that creates the
    resource, so the resource and its idempotent response are committed together or not at all."""
    result = session.execute(
        update(IdempotencyRecord)
        .where(*_held_by(tenant, key, owner), IdempotencyRecord.status == "in_flight")
        .values(status="done", response_status=status_code, response_headers=headers, response_body=body)
    )
    return result.rowcount == 1


def release_idempotency_key(session: Session, *, tenant: str, key: str, owner: str) -> bool:
    """Forget the key (whatever its status) if ``owner`` still holds it, so a retry runs the request afresh."""
    result = session.execute(delete(IdempotencyRecord).where(*_held_by(tenant, key, owner)))
    return result.rowcount == 1


def purge_expired_idempotency_keys(session: Session) -> int:
    result = session.execute(
        delete(IdempotencyRecord)
        .where(IdempotencyRecord.expires_at <= utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount
