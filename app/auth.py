"""API keys and tenants: who is calling, and whether they must say.

A key is ``sk_<prefix>_<secret>``: ``prefix`` (12 hex characters, not secret) names the key in lists and logs and
finds its row; ``secret`` is 256 random bits. Only the SHA-256 of the whole key is stored, so a copy of the
database does not hand out keys, and the presented key's hash is compared in constant time. The plaintext exists
once, in :func:`create_key`'s return value.

Each key belongs to one tenant; everything a request creates belongs to its tenant and every read filters by it.
When keys are required (``SECATEURS_AUTH``) a request without a valid key gets 401 ``WWW-Authenticate: Bearer``:

- ``auto`` (default): required in production, and everywhere as soon as one active key exists. Before that
  (a fresh embedded install) requests without a key act as tenant ``default``.
- ``required``: always.
- ``disabled``: never; the ``Authorization`` header is ignored and everyone is ``default`` (refused in
  production by Settings).

A key that is presented is always checked, even when keys are not required: a client that sends a wrong key
should hear so, not silently land in ``default``.

Functions for the admin CLI (``secateurs keys create|revoke|list``) take the Settings and open the database
themselves: :func:`create_key`, :func:`revoke_key`, :func:`list_keys`; and for ``secateurs serve``'s rule
(without keys, bind to loopback only): :func:`auth_required`, :func:`any_active_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import api_keys
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import DEFAULT_TENANT, ApiKeyRecord, as_utc, utcnow
from app.errors import Unauthorized
from app.observability.logs import bind

KEY_SCHEME = "sk"
PREFIX_HEX = 12
# Lower case only, so "Acme" and "acme" cannot become two tenants by accident.
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_KEY_PATTERN = re.compile(
    rf"^{KEY_SCHEME}_(?P<prefix>[0-9a-f]{{{PREFIX_HEX}}})_(?P<secret>[A-Za-z0-9_-]{{20,128}})$"
)
_HASH_OF_NOTHING = hashlib.sha256(b"").hexdigest()


def hash_key(key: str) -> str:
    """SHA-256 hex of the whole key (a fast hash suffices: the key is random, not a password)."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    """The tenant name if it is acceptable, else ValueError saying what is."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(
            f"bad tenant name {tenant[:80]!r}: use 1-64 characters a-z, 0-9, '_', '.', '-', starting with a "
            "letter or digit"
        )
    return tenant


# --- the admin side (CLI) -----------------------------------------------------------------------------------


@contextmanager
def _database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """A short-lived engine on the configured database, tables created (the CLI may run before `serve`)."""
    if settings.db_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    try:
        init_db(engine)
        yield make_session_factory(engine)
    finally:
        engine.dispose()


def create_key_in(session: Session, tenant: str) -> tuple[str, str]:
    """Create a key for ``tenant`` in the caller's transaction; returns (key id, plaintext key)."""
    check_tenant(tenant)
    prefix = secrets.token_hex(PREFIX_HEX // 2)
    plaintext = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    key_id = f"key_{prefix}"
    api_keys.add_api_key(
        session, key_id=key_id, tenant=tenant, prefix=prefix, secret_sha256=hash_key(plaintext)
    )
    return key_id, plaintext


def create_key(settings: Settings, tenant: str) -> tuple[str, str]:
    """Create an API key for ``tenant``: returns ``(key_id, plaintext_key)``.

    Show the plaintext to the admin once; it is not stored and cannot be recovered (only its hash is kept).
    ``key_id`` is ``key_<prefix>``, the handle for :func:`revoke_key`. Raises ValueError for a bad tenant name.
    """
    with _database(settings) as factory, session_scope(factory) as session:
        return create_key_in(session, tenant)


def revoke_key(settings: Settings, key_id: str) -> bool:
    """Revoke a key at once (its next request gets 401). False if there is no such active key.

    Accepts the key id (``key_<prefix>``) or the bare prefix, since the prefix is what shows in a leaked key.
    """
    key_id = key_id if key_id.startswith("key_") else f"key_{key_id}"
    with _database(settings) as factory, session_scope(factory) as session:
        return api_keys.revoke_api_key(session, key_id)


def key_info(record: ApiKeyRecord) -> dict[str, Any]:
    """A key as the CLI shows it: never the secret or its hash. Times are ISO 8601 UTC strings or None."""

    def iso(value: Any) -> str | None:
        stamped = as_utc(value)
        return stamped.isoformat() if stamped is not None else None

    return {
        "id": record.id,
        "tenant": record.tenant,
        "prefix": f"{KEY_SCHEME}_{record.prefix}_",
        "active": record.revoked_at is None,
        "created_at": iso(record.created_at),
        "revoked_at": iso(record.revoked_at),
        "last_used_at": iso(record.last_used_at),
    }


def list_keys(settings: Settings) -> list[dict[str, Any]]:
    """Every key, oldest first, revoked ones included (``active`` says which): see :func:`key_info`."""
    with _database(settings) as factory, session_scope(factory) as session:
        return [key_info(r) for r in api_keys.list_api_keys(session)]


def any_active_key(settings: Settings, session_factory: sessionmaker[Session] | None = None) -> bool:
    """Whether at least one unrevoked key exists (opens the configured database unless given a factory)."""
    if session_factory is not None:
        with session_scope(session_factory) as session:
            return api_keys.any_active_api_key(session)
    with _database(settings) as factory, session_scope(factory) as session:
        return api_keys.any_active_api_key(session)


def auth_required(settings: Settings, session_factory: sessionmaker[Session] | None = None) -> bool:
    """Whether requests without a key are refused right now (see the module docstring for the modes).

    ``secateurs serve`` calls this before binding: a non-loopback address is allowed only when it is True.
    """
    if settings.auth == "disabled":
        return False
    if settings.auth == "required" or settings.environment == "production":
        return True
    return any_active_key(settings, session_factory)


# --- the request side -----------------------------------------------------------------------------------------


def authenticate(session: Session, key: str) -> str:
    """The tenant of a presented key; Unauthorized if it is malformed, unknown or revoked."""
    match = _KEY_PATTERN.fullmatch(key)
    record = api_keys.find_api_key(session, match["prefix"]) if match else None
    # Hash and compare even when there is no row, so a miss costs what a hit costs.
    stored = record.secret_sha256 if record is not None else _HASH_OF_NOTHING
    if not hmac.compare_digest(hash_key(key), stored) or record is None:
        raise Unauthorized(
            "the API key is not one this server issued (check for a truncated or extra character); "
            "send Authorization: Bearer sk_...",
            invalid_token=True,
        )
    if record.revoked_at is not None:
        raise Unauthorized(
            f"API key {KEY_SCHEME}_{record.prefix}_... was revoked; ask an admin for a new one",
            invalid_token=True,
        )
    last_used = as_utc(record.last_used_at)
    if last_used is None or last_used < utcnow() - timedelta(seconds=api_keys.KEY_TOUCH_EVERY_S):
        # Only then: an UPDATE (even one matching no row) takes SQLite's write lock and commits, which was
        # half of every status poll's cost and its p99 under 200 polling clients (bench/RESULTS.md).
        api_keys.touch_api_key(session, record.id)
    return record.tenant


def request_tenant(
    settings: Settings, session_factory: sessionmaker[Session], authorization: str | None
) -> str:
    """The tenant a request acts as, from its ``Authorization`` header; raises Unauthorized.

    Uses a short transaction of its own rather than the route's session: an upload route streams for minutes,
    and on SQLite a write (``last_used_at``) held open that long would block the worker. The tenant goes into
    the request's log context (JSON logs' ``tenant`` field).
    """
    tenant = _resolve_tenant(settings, session_factory, authorization)
    bind(tenant=tenant)
    return tenant


def _resolve_tenant(
    settings: Settings, session_factory: sessionmaker[Session], authorization: str | None
) -> str:
    if settings.auth == "disabled":
        return DEFAULT_TENANT
    if authorization is not None and authorization.strip():
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized(
                "the Authorization header must be 'Bearer <API key>' (RFC 6750)", invalid_token=True
            )
        with session_scope(session_factory) as session:
            return authenticate(session, key.strip())
    if auth_required(settings, session_factory):
        raise Unauthorized(
            "this server requires an API key: send 'Authorization: Bearer <key>'; an admin creates one with "
            "`secateurs keys create --tenant NAME`"
        )
    return DEFAULT_TENANT
