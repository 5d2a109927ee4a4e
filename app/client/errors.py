"""Every exception the Secateurs client raises, and the ONE place HTTP responses and transport failures become them.

The server answers every 4xx/5xx with an RFC 9457 ``application/problem+json`` body (``type``, ``title``,
``status``, ``detail``, extension members). :func:`raise_for_problem` turns such a response into the class for
its status, keeping the whole body; :func:`connection_failed` turns an ``httpx.TransportError`` into
``ConnectionFailed``. Nothing else in ``app.client`` inspects status codes or catches httpx exceptions to
re-raise them, so callers can rely on this tree:

SecateursClientError               base of everything below; ``except SecateursClientError`` catches all
├── ApiError                       the server answered with a problem (any 4xx/5xx); ``status``, ``title``,
│   │                              ``detail``, ``type``, ``body`` (the whole problem dict), ``retry_after``
│   ├── BadRequest            400  the request was malformed (e.g. a bad list cursor, an over-long name)
│   ├── Unauthorized          401  no API key, or one the server does not know / has revoked
│   ├── Forbidden             403  the key is valid but may not do this (e.g. a dataset source outside
│   │                              SECATEURS_DATASET_SOURCES)
│   ├── NotFound              404  no such model/dataset/job (also: it belongs to another tenant)
│   ├── Conflict              409  the state forbids it: metrics before success, deleting a model in use,
│   │                              an Idempotency-Key whose first request is still being processed
│   ├── Gone                  410  deleted on purpose, for good: a job's artifact/metrics past the retention
│   │                              period (``body["expired_at"]`` says when); retrying cannot help
│   ├── PayloadTooLarge       413  the upload is over the server's limit (or expands past it)
│   ├── UnsupportedMediaType  415  the file is not a zip / tar.gz / .keras / .npz as required
│   ├── Unprocessable         422  well-formed but unusable: spec errors, unsafe archive, bad dataset,
│   │                              an Idempotency-Key reused with a different payload
│   ├── TooManyRequests       429  slow down; ``retry_after`` says for how long
│   ├── ServiceUnavailable    503  the database or queue is down; ``retry_after`` says when to retry
│   └── InsufficientStorage   507  the server's disk is (nearly) full
├── ConnectionFailed               no HTTP answer at all: refused, DNS, TLS, timeout, connection cut
├── DigestMismatch                 a downloaded artifact does not match its ETag / Repr-Digest / length
├── WaitTimeout                    (also a ``TimeoutError``) a wait ran past its timeout; ``last`` = last state
├── ModelInvalid                   a model the client waited on became ``invalid``; ``model``, ``code``, ``message``
├── DatasetInvalid                 a dataset the client waited on became ``invalid``; ``dataset``, ``code``, ``message``
└── JobError                       a job the client waited on ended without success; ``job``, ``code``, ``message``
    ├── JobFailed                  ... with status ``failed``
    └── JobCanceled                ... with status ``canceled``

Statuses without a class of their own (e.g. 500, 502) raise plain ``ApiError``.
"""

from __future__ import annotations

import email.utils
import time
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

if TYPE_CHECKING:
    from app.client.resources import Dataset, Job, Model

__all__ = [
    "ApiError",
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "DigestMismatch",
    "Forbidden",
    "Gone",
    "InsufficientStorage",
    "JobCanceled",
    "JobError",
    "JobFailed",
    "ModelInvalid",
    "NotFound",
    "PayloadTooLarge",
    "SecateursClientError",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "WaitTimeout",
    "connection_failed",
    "parse_retry_after",
    "raise_for_problem",
]


class SecateursClientError(Exception):
    """Base of every error the client raises on purpose."""


class ApiError(SecateursClientError):
    """Raised when the server answers with a 4xx/5xx; the subclass says which, the fields say why.

    ``detail`` is the server's plain-words explanation (what was wrong and what to do), so ``str(exc)`` leads
    with it. ``retry_after`` (seconds) comes from the ``Retry-After`` header when the server sent one.
    """

    status_code: ClassVar[int | None] = None

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        type: str = "about:blank",
        body: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.body: dict[str, Any] = dict(body or {})
        self.retry_after = retry_after

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Per-field validation errors when the server listed them (``errors`` extension), else ``[]``."""
        value = self.body.get("errors")
        return list(value) if isinstance(value, list) else []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, detail={self.detail!r})"


class BadRequest(ApiError):
    """400: the request could not be parsed as what the endpoint expects."""

    status_code = 400


class Unauthorized(ApiError):
    """401: the API key is missing, unknown or revoked (pass ``api_key=`` or set SECATEURS_API_KEY)."""

    status_code = 401


class Forbidden(ApiError):
    """403: the key is valid but not allowed to do this."""

    status_code = 403


class NotFound(ApiError):
    """404: no such resource for this key's tenant."""

    status_code = 404


class Conflict(ApiError):
    """409: the resource's state forbids the action (not finished yet, in use, request still in flight)."""

    status_code = 409


class Gone(ApiError):
    """410: it existed and was deleted on purpose, e.g. an artifact past the server's retention period."""

    status_code = 410


class PayloadTooLarge(ApiError):
    """413: the upload (or what it expands to) is over the server's limit."""

    status_code = 413


class UnsupportedMediaType(ApiError):
    """415: the file is none of the formats the endpoint accepts."""

    status_code = 415


class Unprocessable(ApiError):
    """422: well-formed but unusable; ``errors`` names the fields when the server listed them."""

    status_code = 422


class TooManyRequests(ApiError):
    """429: rate limited; wait ``retry_after`` seconds."""

    status_code = 429


class ServiceUnavailable(ApiError):
    """503: a dependency of the server is down; retry after ``retry_after`` seconds."""

    status_code = 503


class InsufficientStorage(ApiError):
    """507: the server's disk is (nearly) full; nothing was kept."""

    status_code = 507


_BY_STATUS: dict[int, type[ApiError]] = {
    cls.status_code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        Gone,
        PayloadTooLarge,
        UnsupportedMediaType,
        Unprocessable,
        TooManyRequests,
        ServiceUnavailable,
        InsufficientStorage,
    )
    if cls.status_code is not None
}


class ConnectionFailed(SecateursClientError):
    """Raised when no HTTP answer arrived: connection refused, DNS, TLS, timeout, or the connection was cut."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class DigestMismatch(SecateursClientError):
    """Raised when a download's bytes do not match the ``ETag`` / ``Repr-Digest`` / ``Content-Length`` the
    server announced; the partial file is removed, nothing is left at the destination."""


class WaitTimeout(SecateursClientError, TimeoutError):
    """Raised when a wait runs past its ``timeout``; the job keeps running on the server. ``last`` holds the
    last state seen (a Job or Model), so the caller can report or keep waiting."""

    def __init__(self, message: str, last: Any = None) -> None:
        super().__init__(message)
        self.last = last


class ModelInvalid(SecateursClientError):
    """Raised by ``wait_model_ready`` when the worker could not load the model; ``code``/``message`` say why."""

    def __init__(self, model: Model) -> None:
        info = model.error
        self.model = model
        self.code = info.code if info else "invalid"
        self.message = info.message if info else "the model is invalid"
        super().__init__(f"model {model.id} is invalid [{self.code}]: {self.message}")


class DatasetInvalid(SecateursClientError):
    """Raised by ``wait_dataset`` when the worker refused the data; ``code``/``message`` say why."""

    def __init__(self, dataset: Dataset) -> None:
        info = dataset.error
        self.dataset = dataset
        self.code = info.code if info else "invalid"
        self.message = info.message if info else "the dataset is invalid"
        super().__init__(f"dataset {dataset.id} is invalid [{self.code}]: {self.message}")


class JobError(SecateursClientError):
    """A waited-on job ended without success. ``job`` is its final state; ``code``/``message`` its ``error``."""

    def __init__(self, job: Job) -> None:
        info = job.error
        self.job = job
        self.code = info.code if info else job.status
        self.message = info.message if info else f"the job ended {job.status}"
        super().__init__(f"job {job.id} {job.status} [{self.code}]: {self.message}")


class JobFailed(JobError):
    """Raised when a waited-on job ends ``failed``."""


class JobCanceled(JobError):
    """Raised when a waited-on job ends ``canceled``."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 10.2.3) as seconds from now: delay-seconds or an HTTP-date; None if absent
    or unparseable (a bad header must not break a client that can fall back to its own backoff)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def raise_for_problem(response: httpx.Response) -> None:
    """Raise the ApiError subclass for a 4xx/5xx response; return quietly for anything below 400.

    Reads the problem+json body when there is one; a non-JSON error (e.g. an HTML page from a proxy) still
    gives the right class, with the text's first 500 characters as ``detail``. The response must have been
    read (streamed responses: call ``response.read()`` first).
    """
    if response.status_code < 400:
        return
    body: dict[str, Any] = {}
    try:
        parsed = response.json()
        if isinstance(parsed, dict):
            body = parsed
    except ValueError:
        pass
    status = response.status_code
    title = str(body.get("title") or response.reason_phrase or "Error")
    detail = body.get("detail")
    if not isinstance(detail, str) or not detail:
        detail = response.text.strip()[:500] or f"the server answered {status} {title}"
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if retry_after is None and isinstance(body.get("retry_after"), int | float):
        retry_after = float(body["retry_after"])
    cls = _BY_STATUS.get(status, ApiError)
    raise cls(
        status=status,
        title=title,
        detail=detail,
        type=str(body.get("type") or "about:blank"),
        body=body,
        retry_after=retry_after,
    )


def connection_failed(exc: httpx.TransportError, base_url: str = "") -> ConnectionFailed:
    """The ConnectionFailed for an httpx transport error, naming the URL and what went wrong."""
    try:
        url = str(exc.request.url)
    except RuntimeError:  # an error raised outside a request has no .request
        url = base_url
    reason = str(exc) or type(exc).__name__
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return ConnectionFailed(f"request to {url} {kind}: {reason} ({type(exc).__name__})", url=url)
