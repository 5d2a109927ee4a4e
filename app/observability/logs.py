"""Log lines as JSON objects (``SECATEURS_LOG_FORMAT=json``), carrying the job, tenant and stage they concern.

The fields come from a context variable holding one mutable dict per unit of work: the API's middleware opens
one per request (:func:`request_context`), a worker task one per job (:func:`log_context`). The dict is
mutated in place by :func:`bind`, so a value bound in a thread-pool dependency (the tenant, resolved in a
thread) is still seen by later log lines of the same request: threads get a *copy* of the context, but a
copy of the same dict object. Outside any unit of work ``bind`` does nothing.

A request's ``job_id`` is read lazily from the ASGI scope's path parameters, which the router fills in after
the middleware opened the context.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

FIELDS = ("job_id", "tenant", "stage", "model_id")
_context: ContextVar[dict[str, Any] | None] = ContextVar("secateurs_log_context", default=None)


def bind(**fields: str | None) -> None:
    """Add fields to the current unit of work's log context (None removes one); no-op outside one."""
    current = _context.get()
    if current is None:
        return
    for key, value in fields.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value


@contextmanager
def log_context(**fields: str | None) -> Iterator[dict[str, Any]]:
    """A fresh context for one unit of work (a job, a validation), restored afterwards."""
    token = _context.set({k: v for k, v in fields.items() if v is not None})
    try:
        yield _context.get()  # type: ignore[misc]
    finally:
        _context.reset(token)


@contextmanager
def request_context(scope: MutableMapping[str, Any]) -> Iterator[None]:
    """The request's context: keeps a reference to the ASGI scope, so ``job_id`` path params show up."""
    token = _context.set({"_scope": scope})
    try:
        yield
    finally:
        _context.reset(token)


def current_fields() -> dict[str, str]:
    """The fields a log line written now would carry."""
    ctx = _context.get()
    if not ctx:
        return {}
    out = {k: str(ctx[k]) for k in FIELDS if ctx.get(k) is not None}
    scope = ctx.get("_scope")
    if scope is not None and "job_id" not in out:
        job_id = (scope.get("path_params") or {}).get("job_id")
        if isinstance(job_id, str):
            out["job_id"] = job_id
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the context fields, and exc (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(current_fields())
        for key in FIELDS:  # explicit `extra={"job_id": ...}` wins over the context
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = str(value)
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Root logger to stderr in the chosen format; replaces handlers a previous call (or Celery) installed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # JSON: Python warnings (Celery's, for one) become log lines instead of raw stderr text.
    logging.captureWarnings(log_format == "json")
    if log_format == "json":
        # uvicorn's and celery's own loggers keep their text handlers unless they hand lines to the root.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
            lg = logging.getLogger(name)
            lg.handlers.clear()
            lg.propagate = True
