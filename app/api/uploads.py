"""Shared upload plumbing for the models and datasets routes: disk-space guard, OpenAPI body, task sending."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from fastapi.concurrency import run_in_threadpool

from app.config import Settings
from app.disk import free_bytes
from app.errors import InsufficientStorage, ServiceUnavailable
from app.queue import send
from app.storage import Storage


def multipart_body(description: str) -> dict[str, Any]:
    """The request body as OpenAPI sees it; the route streams it itself instead of letting FastAPI spool it."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": description},
                            "name": {"type": "string", "maxLength": 256, "description": "display name"},
                        },
                    }
                }
            },
        }
    }


def ensure_free_space(storage: Storage, settings: Settings) -> None:
    free = free_bytes(storage.root)
    if free < settings.min_free_bytes:
        raise InsufficientStorage(
            f"the server has {free // 2**20} MB of free disk left, below its {settings.min_free_bytes // 2**20} MB "
            "floor; delete old models/datasets or try again later"
        )


async def send_or_undo(celery: Celery, task: str, record_id: str, undo: Callable[[], None]) -> None:
    """Send ``task(record_id)`` for what the request just recorded; when the broker refuses (503), ``undo()``
    deletes the record and its blobs first, so nothing half-registered stays and the client's retry starts
    clean."""
    try:
        await run_in_threadpool(send_or_503, celery, task, record_id)
    except BaseException:
        await run_in_threadpool(undo)
        raise


def send_or_503(celery: Celery, task: str, record_id: str) -> None:
    """Blocking (the broker may take a second to refuse): call from a sync route or via run_in_threadpool."""
    try:
        send(celery, task, record_id)
    except Exception as exc:
        raise ServiceUnavailable(
            f"the job queue did not accept the task ({type(exc).__name__}); nothing was kept, retry shortly",
            retry_after=10,
        ) from exc
