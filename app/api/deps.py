"""All dependency aliases in one place, so a route reads `def get_job(job_id: str, session: SessionDep)`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api import idempotency
from app.api.idempotency import IdempotencyStore
from app.auth import request_tenant
from app.config import Settings
from app.storage import Storage
from app.store.db import session_scope


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.session_factory) as session:
        yield session


def _storage(request: Request) -> Storage:
    return request.app.state.storage


def _celery(request: Request) -> Celery:
    return request.app.state.celery


# Declares the bearer scheme in OpenAPI (the "Authorize" button in /docs). Its own parsing is not used: it
# cannot tell a missing header from a wrong scheme, and the 401 must say which.
_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer sk_...`")


def _tenant(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """Sync on purpose: FastAPI runs it in a thread, and it may touch the database."""
    app = request.app
    return request_tenant(app.state.settings, app.state.session_factory, request.headers.get("authorization"))


def _idempotency_store(request: Request) -> IdempotencyStore:
    return request.app.state.idempotency


def _idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=idempotency.HEADER,
            description="optional; a unique value (e.g. a UUID) that makes a retried POST safe: the first "
            "response is replayed for 24 h. 1-255 printable ASCII characters, bare or as a quoted "
            "structured-field string; anything else is 400",
            # Documented, not enforced by FastAPI: parse_key refuses a bad key with 400 and says why.
            json_schema_extra={
                "minLength": 1,
                "maxLength": idempotency.MAX_KEY_LENGTH,
                "pattern": idempotency.KEY_PATTERN,
            },
        ),
    ] = None,
) -> str | None:
    return idempotency.parse_key(idempotency_key)


async def _json_fingerprint(request: Request) -> str:
    """Of the raw JSON body (already read and cached by FastAPI while parsing it, so this costs no I/O)."""
    return idempotency.json_fingerprint(await request.body())


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]
StorageDep = Annotated[Storage, Depends(_storage)]
CeleryDep = Annotated[Celery, Depends(_celery)]
TenantDep = Annotated[str, Depends(_tenant)]
IdempotencyDep = Annotated[IdempotencyStore, Depends(_idempotency_store)]
IdempotencyKeyDep = Annotated[str | None, Depends(_idempotency_key)]
JsonFingerprintDep = Annotated[str, Depends(_json_fingerprint)]
