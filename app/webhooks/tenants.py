"""Each tenant's webhook signing secret and default URL (API: /v1/webhooks; CLI: ``secateurs webhooks``).

The secret is made on first need (the tenant asks for it, or a delivery needs it) and can be rotated: the new
one signs at once, and for ``ROTATION_GRACE`` every delivery carries a second signature made with the old one,
so receivers can switch over without losing a message (Standard Webhooks allows several signatures).

Threat model of the stored secret. HMAC is symmetric: to sign, we need the secret itself, so it is stored in
the database as is (unlike API keys, of which only a hash is kept). Hence:

- Whoever can read the database (or a backup of it) can forge webhooks that this tenant's receivers accept,
  until the tenant rotates. Encrypting the column with a key from the environment would protect a leaked
  backup (not a compromised worker, which must hold that key too); this version does not, to keep the API
  image free of a crypto dependency: keep backups encrypted and database access narrow, and rotate after a
  leak.
- The secret never appears in job bodies, logs or errors; it is shown to its own tenant only (an API key of
  that tenant, or an admin on the server with ``secateurs webhooks secret --tenant NAME``), with
  ``Cache-Control: no-store``.
- A forged webhook can only claim that a job ended. Receivers should treat it as a notification and read the
  job (and its artifact) through the API with their own key before acting on it: the API key is the
  credential that authenticates data, the webhook only saves polling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import webhooks as store
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import TenantWebhookRecord, as_utc, utcnow
from app.schemas.resources import WebhookSecretOut
from app.webhooks.guard import AllowList, Resolver, check_url, system_resolver
from app.webhooks.signing import new_secret

ROTATION_GRACE = timedelta(hours=24)


def secret_record(session: Session, tenant: str) -> TenantWebhookRecord:
    """The tenant's row, with a fresh secret if it had none."""
    record = store.tenant_webhook(session, tenant, new_secret())
    assert record is not None
    return record


def rotate(session: Session, tenant: str) -> TenantWebhookRecord:
    return store.rotate_secret(session, tenant, new_secret(), ROTATION_GRACE)


def secret_out(record: TenantWebhookRecord, now: datetime | None = None) -> WebhookSecretOut:
    expires = as_utc(record.previous_expires_at)
    still_signing = record.previous_secret is not None and expires is not None and expires > (now or utcnow())
    return WebhookSecretOut(
        secret=record.secret,
        created_at=as_utc(record.secret_created_at),  # type: ignore[arg-type]
        previous_secret_expires_at=expires if still_signing else None,
    )


def set_default_url(
    session: Session,
    tenant: str,
    url: str | None,
    allow: AllowList,
    resolver: Resolver = system_resolver,
) -> TenantWebhookRecord:
    """Set (checked like a job's webhook_url: UnsafeWebhookUrl) or clear the tenant's default URL."""
    if url is not None:
        check_url(url, allow, resolver)
    return store.set_default_url(session, tenant, url, new_secret())


def default_url(session: Session, tenant: str) -> str | None:
    record = store.tenant_webhook(session, tenant)
    return record.default_url if record is not None else None


# --- the admin side (CLI, on the server's database) -----------------------------------------------------------


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """A short-lived engine and one transaction on the configured database (the CLI may run before serve)."""
    if settings.db_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    try:
        init_db(engine)
        with session_scope(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


def admin_secret(settings: Settings, tenant: str, *, rotate_it: bool = False) -> WebhookSecretOut:
    """The tenant's secret (made if missing; replaced first with ``rotate_it``)."""
    with _session(settings) as session:
        record = rotate(session, tenant) if rotate_it else secret_record(session, tenant)
        return secret_out(record)


def admin_set_url(settings: Settings, tenant: str, url: str | None) -> str | None:
    """Set or clear (None) the tenant's default URL; UnsafeWebhookUrl if the guard refuses it."""
    with _session(settings) as session:
        record = set_default_url(session, tenant, url, AllowList.parse(settings.webhook_allow))
        return record.default_url
