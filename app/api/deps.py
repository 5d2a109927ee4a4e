"""All dependency aliases in one place, so a route reads `def get_job(job_id: str, session: SessionDep)`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from celery import Celery
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api import idempotency
from app.api.idempotency import IdempotencyStore
from app.auth import request_tenant
from app.config import Settings
from app.db.engine import session_scope
from app.storage import Storage


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


T = TypeVar("T")
# Worker threads TenantRead uses at once (per event loop). Its work is short and, on SQLite, CPU-bound under the
# GIL: more threads add contention, not throughput (4 still overlap PostgreSQL round trips). A burst waits for
# a token on the event loop holding nothing; each thread holds at most one of the pool's 5 connections at a time.
READ_THREADS = 4


_READ_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("secateurs_read_limiter")


def _read_limiter() -> anyio.CapacityLimiter:
    """One per event loop (a limiter belongs to the loop it was made in), like anyio's default one."""
    try:
        return _READ_LIMITER.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(READ_THREADS)
        _READ_LIMITER.set(limiter)
        return limiter


class TenantRead:
    """Authenticate, then run one read in its own short transaction: both in ONE worker-thread hop.

    For hot read endpoints (status polls). With ``TenantDep`` + ``SessionDep`` + a sync route, one request
    takes four thread hops (tenant, session enter, route, response validation) and holds its pooled
    connection between the last two; under a few hundred concurrent polls every thread then waited for a
    connection held by a request waiting for a thread, until the pool timeout (500 after 30 s). Here the
    connection is checked out and returned inside one thread call, and the caller renders the body there too.
    """

    def __init__(self, request: Request) -> None:
        self._request = request

    async def __call__(self, read: Callable[[Session, str], T]) -> T:
        """``read(session, tenant)`` in a worker thread after authentication; its exceptions propagate."""
        state = self._request.app.state
        authorization = self._request.headers.get("authorization")

        def work() -> T:
            tenant = request_tenant(state.settings, state.session_factory, authorization)
            with session_scope(state.session_factory) as session:
                return read(session, tenant)

        return await anyio.to_thread.run_sync(work, limiter=_read_limiter())


async def _tenant_read(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> TenantRead:
    """Async on purpose: no thread hop here; ``_credentials`` only declares the bearer scheme in OpenAPI."""
    return TenantRead(request)


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
TenantReadDep = Annotated[TenantRead, Depends(_tenant_read)]
IdempotencyDep = Annotated[IdempotencyStore, Depends(_idempotency_store)]
IdempotencyKeyDep = Annotated[str | None, Depends(_idempotency_key)]
JsonFingerprintDep = Annotated[str, Depends(_json_fingerprint)]
