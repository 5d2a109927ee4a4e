"""Delivering a job's webhook: one attempt at a time, each recorded before it is sent.

The Celery task ``secateurs.deliver_webhook(message_id, attempt)`` (worker/webhook_tasks.py) calls
:func:`attempt` and publishes the retry it returns, so the whole retry schedule lives in the queue (ETA'd
messages) and the database (``next_attempt_at``), never in a sleeping worker:

1. claim the attempt and record it (app.db.webhooks), commit;
2. check the URL again (app.webhooks.guard: the host may resolve elsewhere now) and POST, pinned to the checked
   address, redirects not followed, with the Standard Webhooks headers;
3. record the outcome: 2xx delivered; 410 Gone stops (the receiver says it will never want it); anything else
   (3xx, 4xx, 5xx, timeout, connection error, a URL the guard now refuses) is retried after
   ``webhook_backoff_s`` x 1, 3, 12, 60, 360, 360... (+ up to 10% jitter), until
   ``webhook_max_attempts`` attempts were made.

Body: ``{"type": "job.succeeded" | "job.failed" | "job.canceled", "timestamp": <when the job ended>,
"data": <the job body of GET /v1/jobs/{id}, without webhook_status / webhook_deliveries>}``. The job no longer
changes once it ended, so every attempt sends the same bytes; only ``webhook-timestamp`` and the signatures
differ.

The embedded default runs ONE worker process (solo pool): a delivery waits while a pruning job runs in it, and
a due retry waits for the running job to finish. Production workers share the load, so it is rarely visible.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import httpx
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import webhooks as store
from app.db.engine import session_scope
from app.db.tables import JobRecord, WebhookMessageRecord, utcnow
from app.presenters import job_out
from app.queue import DELIVER_WEBHOOK, send
from app.webhooks import signing, tenants
from app.webhooks.guard import AllowList, Resolver, Target, UnsafeWebhookUrl, check_url, system_resolver

log = logging.getLogger("secateurs.webhooks")

BACKOFF_STEPS = (1, 3, 12, 60, 360)
MAX_RESPONSE_READ = 4096  # the body is ignored; read a little so a small answer completes cleanly
USER_AGENT = "Secateurs-Webhooks/0.1"


@dataclass(frozen=True)
class Next:
    """Publish attempt ``attempt`` of the message ``countdown`` seconds from now."""

    message_id: str
    attempt: int
    countdown: float


@dataclass(frozen=True)
class AttemptResult:
    """What one POST came to: the receiver's status code (None if it never answered) and/or why it failed."""

    status_code: int | None
    error: str | None
    duration_ms: int


def retry_delay(attempt: int, base_s: float, jitter: Callable[[], float] = random.random) -> float:
    """Seconds from attempt ``attempt`` (1-based) to the next one."""
    step = BACKOFF_STEPS[min(attempt, len(BACKOFF_STEPS)) - 1]
    return base_s * step * (1.0 + 0.1 * jitter())


def stale_after_s(settings: Settings) -> float:
    """An attempt still ``sending`` after this long lost its worker (well above what one POST may take)."""
    return max(120.0, 6 * settings.webhook_timeout_s)


def event_body(job: JobRecord, message: WebhookMessageRecord) -> bytes:
    data = job_out(job, store.WebhookState(message)).model_dump(
        mode="json", exclude={"webhook_status", "webhook_deliveries", "expired_at"}
    )
    payload = {"type": message.event_type, "timestamp": data["finished_at"], "data": data}
    return json.dumps(payload, separators=(",", ":")).encode()


def post(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    verify: ssl.SSLContext | bool = True,
) -> AttemptResult:
    """POST ``body`` to the target's pinned address; never raises for network trouble (it is an outcome)."""
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    request_headers = {
        **headers,
        "Host": target.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    try:
        # trust_env=False: an environment proxy would resolve the host name itself and undo the pin.
        with (
            httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False, verify=verify) as http,
            http.stream(
                "POST",
                target.connect_url,
                content=body,
                headers=request_headers,
                extensions=target.request_extensions,
            ) as response,
        ):
            status = response.status_code
            # The answer is in with the status line; a body that is slow or cut short changes nothing.
            with contextlib.suppress(httpx.HTTPError):
                read = 0
                for chunk in response.iter_raw():
                    read += len(chunk)
                    if read >= MAX_RESPONSE_READ:
                        break
            if 300 <= status < 400:
                location = response.headers.get("location", "")[:200]
                error = f"HTTP {status}: redirects are not followed (Location: {location or 'none'})"
            elif not 200 <= status < 300:
                error = f"HTTP {status}"
    except httpx.TimeoutException as exc:
        error = f"no answer within {timeout_s:g} s ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        error = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return AttemptResult(status, error, int((time.monotonic() - started) * 1000))


@dataclass(frozen=True)
class _Prepared:
    url: str
    body: bytes
    secrets: list[str]


def _prepare(session: Session, message: WebhookMessageRecord) -> _Prepared | None:
    job = session.get(JobRecord, message.job_id)
    if job is None:
        return None
    record = tenants.secret_record(session, message.tenant)  # made here if the tenant never asked for it
    return _Prepared(message.url, event_body(job, message), store.signing_secrets(record, utcnow()))


def attempt(
    settings: Settings,
    sessions: sessionmaker[Session],
    message_id: str,
    number: int,
    *,
    resolver: Resolver = system_resolver,
    verify: ssl.SSLContext | bool = True,
) -> Next | None:
    """Make attempt ``number`` of the message if it is due and nobody made it; returns the attempt to
    publish next (a retry, or this one again if it came early), or None when there is nothing more to do."""
    with session_scope(sessions) as session:
        claim = store.claim_attempt(
            session,
            message_id,
            number,
            max_attempts=settings.webhook_max_attempts,
            stale_after_s=stale_after_s(settings),
        )
        if claim.outcome == "early" and claim.due_at is not None:
            return Next(message_id, claim.attempt, max(0.0, (claim.due_at - utcnow()).total_seconds()))
        if claim.outcome != "claimed" or claim.message is None:
            log.info("webhook %s attempt %d not made: %s", message_id, number, claim.outcome)
            return None
        number = claim.attempt
        prepared = _prepare(session, claim.message)
    if prepared is None:
        result = AttemptResult(None, "the job no longer exists", 0)
    else:
        result = _send(settings, message_id, prepared, resolver, verify)
    return _record(settings, sessions, message_id, number, result)


def _send(
    settings: Settings,
    message_id: str,
    prepared: _Prepared,
    resolver: Resolver,
    verify: ssl.SSLContext | bool,
) -> AttemptResult:
    try:
        target = check_url(prepared.url, AllowList.parse(settings.webhook_allow), resolver)
    except UnsafeWebhookUrl as exc:
        return AttemptResult(None, f"not sent: {exc}", 0)
    headers = signing.headers(message_id, int(time.time()), prepared.body, prepared.secrets)
    return post(target, prepared.body, headers, settings.webhook_timeout_s, verify)


def _record(
    settings: Settings, sessions: sessionmaker[Session], message_id: str, number: int, result: AttemptResult
) -> Next | None:
    code = result.status_code
    retry_at: datetime | None = None
    delay = 0.0
    outcome: Literal["delivered", "gone", "retry", "failed"]
    if result.error is None and code is not None and 200 <= code < 300:
        outcome = "delivered"
    elif code == 410:
        outcome = "gone"
    elif number >= settings.webhook_max_attempts:
        outcome = "failed"
    else:
        outcome = "retry"
        delay = retry_delay(number, settings.webhook_backoff_s)
        retry_at = utcnow() + timedelta(seconds=delay)
    with session_scope(sessions) as session:
        mine = store.record_result(
            session,
            message_id,
            number,
            outcome=outcome,
            status_code=code,
            error=result.error,
            duration_ms=result.duration_ms,
            next_retry_at=retry_at,
        )
    log.info("webhook %s attempt %d: %s (%s)", message_id, number, outcome, result.error or code)
    if outcome == "retry" and mine:
        return Next(message_id, number + 1, delay)
    return None


# --- publishing -------------------------------------------------------------------------------------------------


def publish(celery: Celery, step: Next) -> None:
    send(celery, DELIVER_WEBHOOK, step.message_id, step.attempt, countdown=step.countdown or None)


def publish_for_job(celery: Celery, session: Session, job_id: str) -> bool:
    """Publish the first attempt of the job's webhook if it has one still unsent; call it once the job's
    ending is committed. A failure to publish is logged, not raised: the message is safe in the database and
    the sweep at the next worker start sends it."""
    message_id = store.unsent_message_id(session, job_id)
    if message_id is None:
        return False
    try:
        publish(celery, Next(message_id, 1, 0.0))
    except Exception:
        log.warning(
            "could not publish webhook %s of job %s; the next worker start sends it",
            message_id,
            job_id,
            exc_info=True,
        )
        return False
    return True


def sweep(settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> int:
    """Publish every attempt still to be made (stale ones resolved), each held until it is due. Run when a
    worker starts: the embedded transport keeps no ETA'd message across a restart, and a publish that failed
    after a job ended left its message unsent. Duplicates this may create are harmless (claims)."""
    with session_scope(sessions) as session:
        due = store.due_messages(
            session, max_attempts=settings.webhook_max_attempts, stale_after_s=stale_after_s(settings)
        )
    now = utcnow()
    for message_id, number, due_at in due:
        wait = max(0.0, (due_at - now).total_seconds()) if due_at is not None else 0.0
        publish(celery, Next(message_id, number, wait))
    return len(due)
