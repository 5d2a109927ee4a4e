"""``Idempotency-Key`` on the three creating POSTs (/v1/jobs, /v1/models, /v1/datasets).

Semantics follow the IETF draft (draft-ietf-httpapi-idempotency-key-header) with Stripe's choices where the
draft leaves one open:

- Keys are per tenant, 1-255 printable ASCII characters, sent bare (``Idempotency-Key: abc``, as Stripe) or as
  a structured-field string (``Idempotency-Key: "abc"``, as the draft); both name the same key. Kept 24 h.
- Same key, same endpoint, same payload: the first response is replayed (status, body, ``Location``,
  ``Retry-After``) with ``Idempotent-Replayed: true``. The replay is the response as it was then (a job replays
  as ``queued``); GET the ``Location`` for the current state.
- Same key with a different payload or on another endpoint: 422 ``idempotency-key-reused``.
- Same key while the first request is still running: 409 ``idempotency-key-in-use`` with ``Retry-After``.
- Which outcomes are kept (Stripe-like): successes and 4xx answers of a request that was fully received are
  kept and replayed, since repeating the same request would give the same answer. Not kept (the key is
  released, so a retry really runs again): 5xx (e.g. 503 queue down: nothing was created), 409 (a state that
  may change), 429, and any failure before the request body was fully received (a cut-off upload has no
  payload to compare). Requests refused before the endpoint runs (401, a malformed JSON body) never touch the
  key at all.

The fingerprint is the SHA-256 of the canonical JSON of the request (sorted keys, no whitespace), so
re-serialising the same body differently is still "the same payload". An upload's fingerprint covers the file's
SHA-256, its filename and the text fields, and is known only once the body has streamed in: the key is held
(``in_flight``) from the start with an empty fingerprint, which is filled in after. A repeat of a finished
upload is therefore received in full (to a temp file, then discarded) before it is replayed or refused.

A hold whose request died with its process is taken over after a lock period (5 min for JSON, 1 h for
uploads). The response is recorded in the same transaction that creates the resource, so a crash cannot leave
a resource without its idempotent response (or the reverse).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker

from app.api.multipart import Upload
from app.db import idempotency
from app.db.engine import session_scope
from app.db.tables import IdempotencyRecord
from app.errors import BadIdempotencyKey, IdempotencyKeyInUse, IdempotencyKeyReused, SecateursError

log = logging.getLogger("secateurs.idempotency")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# The bare form as OpenAPI documents it: printable ASCII, no surrounding blanks, not starting with a quote.
KEY_PATTERN = rf"^[!#-~]([ -~]{{0,{MAX_KEY_LENGTH - 2}}}[!-~])?$"
TTL_S = 24 * 3600
JSON_LOCK_S = 5 * 60
UPLOAD_LOCK_S = 3600
PURGE_EVERY_S = 600
# Response headers that are part of what is replayed (Content-Type is kept separately, as the media type).
KEPT_HEADERS = ("location", "retry-after", "www-authenticate")
PROBLEM = "application/problem+json"


def parse_key(raw: str | None) -> str | None:
    """The key named by the header, or None when absent; BadIdempotencyKey when it is unusable."""
    if raw is None:
        return None
    value = raw.strip()
    if value.startswith('"'):
        value = _sf_string(value)
    if not value:
        raise BadIdempotencyKey("the Idempotency-Key header is empty; send a unique value, e.g. a UUID")
    if len(value) > MAX_KEY_LENGTH:
        raise BadIdempotencyKey(
            f"the Idempotency-Key is {len(value)} characters long; the limit is {MAX_KEY_LENGTH} (a UUID is 36)"
        )
    if not all(" " <= c <= "~" for c in value):
        raise BadIdempotencyKey("the Idempotency-Key must be printable ASCII; a UUID is a good choice")
    return value


def _sf_string(value: str) -> str:
    """Unquote an RFC 8941 sf-string (``"..."`` with ``\\"`` and ``\\\\`` escapes)."""
    out: list[str] = []
    chars = iter(value[1:])
    for c in chars:
        if c == "\\":
            escaped = next(chars, "")
            if escaped not in ('"', "\\"):
                break
            out.append(escaped)
        elif c == '"':
            if next(chars, None) is None:
                return "".join(out)
            break
        else:
            out.append(c)
    raise BadIdempotencyKey(
        'the Idempotency-Key header starts with a quote but is not a valid quoted string (RFC 8941: "...", '
        'with \\" and \\\\ escaped)'
    )


def json_fingerprint(raw: bytes) -> str:
    """SHA-256 of the canonical JSON of a body (sorted keys, compact); of the raw bytes if it is not JSON."""
    try:
        canonical = json.dumps(
            json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except ValueError:
        canonical = raw
    return hashlib.sha256(canonical).hexdigest()


def upload_fingerprint(upload: Upload) -> str:
    """The payload of a multipart upload: the file's content hash, its filename and the text fields."""
    payload = {"file_sha256": upload.sha256, "filename": upload.filename, "fields": upload.fields}
    return json_fingerprint(json.dumps(payload).encode())


@dataclass
class Attempt:
    """One request's use of an Idempotency-Key (or of none: then every method does nothing).

    Either the request holds the key (``owner`` set: run it, then ``complete`` or ``fail``), or a finished
    response exists (``previous`` set: ``replay`` it once the fingerprint is known).
    """

    store: IdempotencyStore | None = None
    tenant: str = ""
    key: str | None = None
    endpoint: str = ""
    owner: str | None = None
    previous: IdempotencyRecord | None = None

    def check_same(self, fingerprint: str) -> None:
        """IdempotencyKeyReused unless this request's payload is the one the stored response answered."""
        if self.previous is not None and self.previous.fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {self.key!r} was first used with a different request body on {self.endpoint}; "
                "use a new key for a new request"
            )

    def replay(self, fingerprint: str) -> JSONResponse:
        """The stored response again, or IdempotencyKeyReused if this request is not the same one."""
        previous = self.previous
        assert previous is not None and previous.response_status is not None
        self.check_same(fingerprint)
        headers = {k: v for k, v in (previous.response_headers or {}).items() if k != "content-type"}
        headers[REPLAYED_HEADER] = "true"
        media_type = (previous.response_headers or {}).get("content-type", "application/json")
        return JSONResponse(
            previous.response_body,
            status_code=previous.response_status,
            headers=headers,
            media_type=media_type,
        )

    def bind_fingerprint(self, fingerprint: str) -> None:
        """Record an upload's fingerprint once it is known (blocking: call in a thread)."""
        if self.store is None or self.owner is None or self.key is None:
            return
        with session_scope(self.store.session_factory) as session:
            idempotency.set_idempotency_fingerprint(
                session, tenant=self.tenant, key=self.key, owner=self.owner, fingerprint=fingerprint
            )

    def complete(
        self, session: Session, status_code: int, body: dict[str, Any], headers: dict[str, str]
    ) -> None:
        """Store the response in ``session``'s transaction: the one that creates the resource."""
        if self.owner is None or self.key is None:
            return
        kept = {k.lower(): v for k, v in headers.items() if k.lower() in KEPT_HEADERS}
        kept["content-type"] = "application/json"
        idempotency.complete_idempotency_key(
            session,
            tenant=self.tenant,
            key=self.key,
            owner=self.owner,
            status_code=status_code,
            headers=kept,
            body=body,
        )

    def fail(self, exc: BaseException) -> None:
        """The request failed: keep a replayable 4xx answer, otherwise release the key (see module docstring).

        Blocking: call in a thread from async code. Never raises: the original error is what the client needs.
        """
        if self.store is None or self.owner is None or self.key is None:
            return
        try:
            if isinstance(exc, SecateursError) and 400 <= exc.status < 500 and exc.status not in (409, 429):
                headers = {
                    k.lower(): v for k, v in exc.problem_headers().items() if k.lower() in KEPT_HEADERS
                }
                headers["content-type"] = PROBLEM
                with session_scope(self.store.session_factory) as session:
                    idempotency.complete_idempotency_key(
                        session,
                        tenant=self.tenant,
                        key=self.key,
                        owner=self.owner,
                        status_code=exc.status,
                        headers=headers,
                        body=exc.problem_body(),
                    )
            else:
                self.release()
        except Exception:  # a database hiccup here must not mask the request's own error
            log.exception("could not record the outcome of Idempotency-Key %r", self.key)

    def release(self) -> None:
        """Forget the key so a retry runs afresh (blocking: call in a thread from async code)."""
        if self.store is None or self.owner is None or self.key is None:
            return
        with session_scope(self.store.session_factory) as session:
            idempotency.release_idempotency_key(session, tenant=self.tenant, key=self.key, owner=self.owner)


class IdempotencyStore:
    """Claims keys for requests and, every ``PURGE_EVERY_S`` seconds per process, deletes expired ones.

    ``clock`` is a monotonic clock (tests pass a fake one). Its origin is arbitrary (``time.monotonic`` counts
    from boot), so "never purged" is ``None``, not 0: a start value of 0 skipped the purge for the first
    ``PURGE_EVERY_S`` seconds of the machine's uptime.
    """

    def __init__(
        self, session_factory: sessionmaker[Session], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.session_factory = session_factory
        self._clock = clock
        self._last_purge: float | None = None  # None: this process has not purged yet, so the next call does
        self._purge_lock = threading.Lock()

    def begin(
        self,
        tenant: str,
        key: str | None,
        endpoint: str,
        fingerprint: str | None,
        *,
        lock_seconds: int = JSON_LOCK_S,
        retry_after: int = 1,
    ) -> Attempt:
        """Claim ``key`` for this request (blocking: call in a thread from async code).

        Returns an Attempt that holds the key, or one with ``previous`` (a finished response; for JSON the
        fingerprint was already compared). Raises IdempotencyKeyInUse
        (409) while another request holds the key and IdempotencyKeyReused (422) for another endpoint, or for
        another payload once both fingerprints are known.
        """
        if key is None:
            return Attempt()
        self.purge_now_and_then()
        owner = secrets.token_hex(16)
        with self.session_factory() as session:
            claim = idempotency.claim_idempotency_key(
                session,
                tenant=tenant,
                key=key,
                endpoint=endpoint,
                fingerprint=fingerprint,
                owner=owner,
                lock_seconds=lock_seconds,
                ttl_seconds=TTL_S,
            )
        existing = claim.existing
        if claim.outcome == "claimed":
            return Attempt(self, tenant, key, endpoint, owner=owner)
        if existing is not None and existing.endpoint != endpoint:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {key!r} was already used on {existing.endpoint}; use a new key for {endpoint}"
            )
        if claim.outcome == "in_flight":
            # Both payloads known and different: retrying will not help, so say so rather than 409.
            if (
                fingerprint is not None
                and existing is not None
                and existing.fingerprint not in (None, fingerprint)
            ):
                raise IdempotencyKeyReused(
                    f"Idempotency-Key {key!r} is in use by a request with a different body; "
                    "use a new key for a new request"
                )
            raise IdempotencyKeyInUse(
                f"the first request with Idempotency-Key {key!r} is still being processed; retry after "
                f"{retry_after} s to get its response",
                retry_after=retry_after,
            )
        attempt = Attempt(self, tenant, key, endpoint, previous=existing)
        if fingerprint is not None:
            attempt.check_same(fingerprint)  # refuse a mismatch now, before the route does anything
        return attempt

    def purge_now_and_then(self) -> int:
        """Delete expired keys at most every PURGE_EVERY_S seconds in this process; returns how many went."""
        now = self._clock()
        last = self._last_purge
        if (last is not None and now - last < PURGE_EVERY_S) or not self._purge_lock.acquire(blocking=False):
            return 0
        try:
            self._last_purge = now
            with session_scope(self.session_factory) as session:
                return idempotency.purge_expired_idempotency_keys(session)
        except Exception:  # housekeeping must never fail a request
            log.exception("purging expired idempotency keys failed")
            return 0
        finally:
            self._purge_lock.release()
