"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.errors import PROBLEM_BASE
from app.queue import broker_ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.head("/healthz", include_in_schema=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(request: Request) -> str | None:
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return f"database: {type(exc).__name__}: {exc}"[:300]
    return None


def _check_broker(request: Request) -> str | None:
    try:
        broker_ping(request.app.state.celery)
    except Exception as exc:
        return f"broker: {type(exc).__name__}: {exc}"[:300]
    return None


def _check_store(request: Request) -> str | None:
    try:
        request.app.state.storage.check()
    except Exception as exc:
        detail = getattr(exc, "detail", None) or str(exc)
        return f"store: {detail}"[:300]
    return None


@router.get("/readyz", responses={503: {"description": "a dependency is down (problem+json)"}})
async def readyz(request: Request) -> JSONResponse:
    down = [
        d
        for d in (
            await run_in_threadpool(_check_database, request),
            await run_in_threadpool(_check_broker, request),
            await run_in_threadpool(_check_store, request),
        )
        if d
    ]
    worker = getattr(request.app.state, "embedded_worker", None)
    if worker is not None and not worker.alive():
        down.append("worker: the embedded worker process is not running")
    if down:
        return JSONResponse(
            {
                "type": PROBLEM_BASE + "not-ready",
                "title": "Service Unavailable",
                "status": 503,
                "detail": "not ready: " + "; ".join(down),
                "down": [d.split(":", 1)[0] for d in down],
            },
            status_code=503,
            media_type="application/problem+json",
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready", "checks": {"database": "ok", "broker": "ok", "store": "ok"}})
