"""create_app(): routers, problem+json handlers, lifespan. Never imports TensorFlow or worker code."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.api.body_limit import JsonBodyLimit
from app.api.docs_page import install_docs
from app.api.idempotency import IdempotencyStore
from app.api.routes import datasets, health, jobs, models, prometheus, schemas, webhooks
from app.config import Settings, get_settings
from app.db.engine import init_db, make_engine, make_session_factory
from app.db.records import BadCursor
from app.disk import is_disk_full
from app.errors import PROBLEM_BASE, SecateursError, StoreUnavailable
from app.maintenance import Maintenance
from app.observability.prometheus import Metrics, ObservabilityMiddleware
from app.queue import make_celery
from app.storage import Storage
from app.storage.base import StoreMisconfigured

log = logging.getLogger("secateurs.api")
PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, slug: str, **extra: Any) -> JSONResponse:
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}
    headers = {}
    if extra.get("retry_after") is not None:
        headers["Retry-After"] = str(int(extra.pop("retry_after")))
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def problem_response(exc: SecateursError) -> JSONResponse:
    """One of our errors as its problem+json response, with its headers (Retry-After, WWW-Authenticate)."""
    return JSONResponse(
        exc.problem_body(), status_code=exc.status, media_type=PROBLEM, headers=exc.problem_headers()
    )


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        out.append({"loc": loc, "msg": err.get("msg", ""), "type": err.get("type", "")})
    return out


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(SecateursError)
    async def _ours(_: Request, exc: SecateursError) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        summary = "; ".join(f"{e['loc'] or 'body'}: {e['msg']}" for e in errors[:5])
        return problem(
            422,
            "Invalid request",
            f"the request does not match the API: {summary}",
            "validation",
            errors=errors,
        )

    @app.exception_handler(BadCursor)
    async def _cursor(_: Request, exc: BadCursor) -> JSONResponse:
        return problem(400, "Bad cursor", str(exc), "bad-cursor")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "see the API documentation at /docs"
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint; the API is documented at /docs"
        headers = dict(exc.headers or {})  # e.g. the Allow header a 405 must carry (RFC 9110 15.5.6)
        if exc.status_code == 405:
            # Starlette's Allow names only the first route matching the path; list every method it takes.
            headers["Allow"] = ", ".join(_allowed_methods(request))
            if detail == "Method Not Allowed":
                detail = f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
        response = problem(exc.status_code, _reason(exc.status_code), detail, f"http-{exc.status_code}")
        response.headers.update(headers)
        return response

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_down(request: Request, exc: Exception) -> JSONResponse:
        """The database restarted or is unreachable (or SQLite stayed locked): retryable, not a bug. A full
        disk under the database is not retryable as is: 507, like a full disk under an upload."""
        if is_disk_full(exc):
            log.error("database disk full on %s %s: %s", request.method, request.url.path, exc)
            return problem(
                507,
                "Insufficient Storage",
                "the database's disk is full; nothing was recorded. Free space (or delete old jobs, "
                "models and datasets), then retry",
                "insufficient-storage",
            )
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return problem(
            503,
            "Service unavailable",
            "the database did not answer; retry shortly",
            "service-unavailable",
            retry_after=5,
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "Internal error", "an unexpected error occurred; it was logged", "internal")


def _allowed_methods(request: Request) -> list[str]:
    allowed = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def declare_problem_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI document say what the handlers send: every 4xx/5xx body is ``application/problem+json``.

    FastAPI files each ``responses={code: {"model": Problem}}`` under the route's own media type
    (``application/json``), and leaves responses declared by description only without a body. Both would tell
    clients (and schema-conformance checks) the wrong Content-Type, so error responses are rewritten here, once.
    """
    problem_schema = {"$ref": "#/components/schemas/Problem"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                if not (code.isdigit() and int(code) >= 400):
                    continue
                content = response.get("content") or {}
                body = content.pop("application/json", None) or content.pop(PROBLEM, None)
                response["content"] = {**content, PROBLEM: body or {"schema": problem_schema}}
    return schema


def check_store(storage: Storage) -> None:
    """At start: a store that refuses us (credentials, bucket) stops the start with a message naming the setting;
    one that does not answer yet is only logged (/readyz reports it, uploads answer 503 meanwhile)."""
    try:
        storage.check()
    except StoreMisconfigured as exc:
        log.error("blob store misconfigured: %s", exc)
        raise SystemExit(f"secateurs: refusing to start: {exc}") from exc
    except StoreUnavailable as exc:
        log.warning("blob store not reachable at start (the API starts anyway): %s", exc.detail)


def create_app(
    settings: Settings | None = None, embedded_worker: Any = None, maintenance: bool = False
) -> FastAPI:
    """`embedded_worker` (an app.embedded.EmbeddedWorker) makes /readyz report on the worker child too;
    `maintenance` runs the reaper thread (app.maintenance) — `secateurs serve` turns it on, tests opt in."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.db_url)
        init_db(engine)
        app.state.settings = settings
        app.state.engine = engine
        app.state.session_factory = make_session_factory(engine)
        app.state.metrics.attach_store(app.state.session_factory)
        app.state.idempotency = IdempotencyStore(app.state.session_factory)
        app.state.storage = Storage.from_settings(settings)
        check_store(app.state.storage)
        app.state.celery = make_celery(settings)
        app.state.embedded_worker = embedded_worker
        app.state.maintenance = None
        if maintenance:
            app.state.maintenance = Maintenance(
                settings, app.state.celery, app.state.session_factory, app.state.storage
            )
            app.state.maintenance.start()
        try:
            yield
        finally:
            if app.state.maintenance is not None:
                app.state.maintenance.stop()
            engine.dispose()

    app = FastAPI(
        title="Secateurs",
        version="0.1.0",
        summary="Prune any TensorFlow SavedModel or .keras file over HTTP.",
        description=(
            "Upload a model and `.npz` datasets, post a pruning spec, poll the job, download the pruned "
            "SavedModel and a metrics JSON. Errors are RFC 9457 `application/problem+json`."
        ),
        lifespan=lifespan,
        docs_url=None,  # /docs comes from install_docs: local assets, no CDN
        redoc_url=None,
    )
    install_problem_handlers(app)
    app.state.metrics = Metrics()
    app.add_middleware(JsonBodyLimit, max_bytes=settings.max_json_bytes)
    # Outermost: counts every answer, the body limit's 413s included, under the route that matched.
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics.http)
    for router in (
        health.router,
        models.router,
        datasets.router,
        jobs.router,
        webhooks.router,
        schemas.router,
        prometheus.router,
    ):
        app.include_router(router)
    install_docs(app)
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = declare_problem_responses(fastapi_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
