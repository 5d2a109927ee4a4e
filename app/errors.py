"""Every exception Secateurs raises on purpose, in one place, so one handler can render them all.

The API renders each as RFC 9457 ``application/problem+json``: ``type`` is ``PROBLEM_BASE + slug``;
``title`` and ``status`` come from the class; ``detail`` (plain words: what was wrong and what to do) and any
``extra`` fields come from the instance. Third-party exceptions are mapped to these where they are caught
(``raise Ours(...) from exc``); nothing outside this module invents HTTP statuses.

Any of them may carry ``retry_after`` (seconds, sent as the ``Retry-After`` header, RFC 9110 10.2.3) and extra
response ``headers`` (e.g. ``WWW-Authenticate`` on a 401).

SecateursError
├── BadRequest               400  the request is malformed as HTTP/multipart
│   ├── UploadError          400  the multipart upload is missing a field, has an extra one, or was cut short
│   └── BadIdempotencyKey    400  the Idempotency-Key header is empty, too long or not printable ASCII
├── Unauthorized             401  no API key, or one that is unknown or revoked, while keys are required
├── Forbidden                403  the caller may not see this at all (GET /metrics from another host, no token)
├── NotFound                 404  no such model/dataset/job, an id that cannot exist, or another tenant's
├── Conflict                 409  the resource is in a state that forbids the action (in use, not finished)
│   └── IdempotencyKeyInUse  409  the first request with this Idempotency-Key is still being processed
├── Gone                     410  it existed, and was deleted on purpose (for good: do not retry)
│   └── ArtifactExpired      410  a job's artifact and metrics were deleted under the retention policy
├── PayloadTooLarge          413  the upload is bigger than the configured limit
│   └── ArchiveTooLarge      413  the archive expands past the size, member-count or compression-ratio limits
├── UnsupportedMediaType     415  not multipart/form-data, or the file is none of the accepted formats
│   └── UnsupportedFormat    415  the uploaded file's bytes are not a zip, tar.gz, .keras or .npz as required
├── Unprocessable            422  well-formed, but the content cannot be used
│   ├── ArchiveError         422  unsafe, corrupt or incomplete model archive (zip-slip, links, no model)
│   ├── DatasetError         422  the .npz breaks the dataset rules (names, dtypes, lengths, NaN/inf, pickles)
│   └── IdempotencyKeyReused 422  an Idempotency-Key sent again with a different payload or endpoint
├── TooManyRequests          429  the tenant already has its maximum of active jobs; carries ``retry_after``
├── ServiceUnavailable       503  a dependency (database, broker) is down; carries ``retry_after`` seconds
│   └── StoreUnavailable     503  the blob store (S3) does not answer
└── InsufficientStorage      507  the disk is (nearly) full
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_BASE = "https://secateurs.dev/problems/"


class SecateursError(Exception):
    """Base of all our errors; never raised itself. Subclasses fix ``status``, ``title`` and ``slug``."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    slug: ClassVar[str] = "internal"
    type: ClassVar[str] = PROBLEM_BASE + "internal"

    def __init__(
        self,
        detail: str,
        *,
        extra: dict[str, Any] | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra: dict[str, Any] = dict(extra or {})
        self.retry_after = retry_after
        self.headers: dict[str, str] = dict(headers or {})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Derive the problem ``type`` URI from ``slug`` so the two can never disagree."""
        super().__init_subclass__(**kwargs)
        cls.type = PROBLEM_BASE + cls.slug

    def problem_extra(self) -> dict[str, Any]:
        """Extension members for the problem body (``retry_after`` travels as a header, not in here)."""
        return dict(self.extra)

    def problem_headers(self) -> dict[str, str]:
        """Response headers the problem needs: ``Retry-After`` and whatever the raiser added."""
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(int(self.retry_after))
        return headers

    def problem_body(self) -> dict[str, Any]:
        """The RFC 9457 body; kept here (not in the HTTP layer) so a stored idempotent response and the
        handler's response cannot drift apart."""
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        body["detail"] = self.detail
        body.update({k: v for k, v in self.problem_extra().items() if v is not None})
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r})"


class BadRequest(SecateursError):
    """Raised when the request cannot be parsed as what the endpoint expects."""

    status = 400
    title = "Bad request"
    slug = "bad-request"


class UploadError(BadRequest):
    """Raised by the upload receiver: missing/empty ``file``, unknown or repeated fields, truncated body."""

    title = "Bad upload"
    slug = "bad-upload"


class BadIdempotencyKey(BadRequest):
    """Raised when ``Idempotency-Key`` is empty, longer than 255 characters or not printable ASCII."""

    title = "Bad Idempotency-Key"
    slug = "bad-idempotency-key"


class Unauthorized(SecateursError):
    """Raised when keys are required and the request has none, or an unknown, malformed or revoked one.

    Always carries ``WWW-Authenticate: Bearer`` (RFC 9110 11.6.1 requires it on a 401; RFC 6750 3 gives the
    ``error="invalid_token"`` parameter for a key that was presented but is no good).
    """

    status = 401
    title = "Unauthorized"
    slug = "unauthorized"

    def __init__(self, detail: str, *, invalid_token: bool = False) -> None:
        challenge = 'Bearer realm="secateurs"'
        if invalid_token:
            challenge += ', error="invalid_token"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(SecateursError):
    """Raised when who is asking rules the request out, whatever they send (e.g. /metrics off loopback)."""

    status = 403
    title = "Forbidden"
    slug = "forbidden"


class NotFound(SecateursError):
    """Raised when an id names nothing we hold (including ids that are not even well-formed)."""

    status = 404
    title = "Not found"
    slug = "not-found"


class Conflict(SecateursError):
    """Raised when the resource's state forbids the action, e.g. deleting a model a running job uses."""

    status = 409
    title = "Conflict"
    slug = "conflict"


class IdempotencyKeyInUse(Conflict):
    """Raised when a request repeats an Idempotency-Key whose first request has not finished (retry later)."""

    title = "Idempotency-Key in use"
    slug = "idempotency-key-in-use"


class Gone(SecateursError):
    """Raised when what was asked for existed and was deleted on purpose: unlike 404, retrying cannot help."""

    status = 410
    title = "Gone"
    slug = "gone"


class ArtifactExpired(Gone):
    """Raised when a job's outputs were deleted by the retention sweep; ``expired_at`` says when."""

    title = "Artifact expired"
    slug = "artifact-expired"


class PayloadTooLarge(SecateursError):
    """Raised when an upload exceeds its byte limit; reading stops at once and the partial file is removed."""

    status = 413
    title = "Payload too large"
    slug = "payload-too-large"


class ArchiveTooLarge(PayloadTooLarge):
    """Raised when an archive would expand past its limits (total bytes, member count, compression ratio)."""

    title = "Archive too large"
    slug = "archive-too-large"


class UnsupportedMediaType(SecateursError):
    """Raised when the request body is not ``multipart/form-data`` with a boundary."""

    status = 415
    title = "Unsupported media type"
    slug = "unsupported-media-type"


class UnsupportedFormat(UnsupportedMediaType):
    """Raised when the uploaded file's content (magic bytes) is none of the formats the endpoint accepts."""

    title = "Unsupported file format"
    slug = "unsupported-format"


class Unprocessable(SecateursError):
    """Raised when the request is well-formed but its content cannot be used."""

    status = 422
    title = "Unprocessable content"
    slug = "unprocessable"


class ArchiveError(Unprocessable):
    """Raised when a model archive is unsafe (paths, links, devices), corrupt, or lacks its model files."""

    title = "Invalid model archive"
    slug = "invalid-archive"


class DatasetError(Unprocessable):
    """Raised when an ``.npz`` breaks the dataset rules: names, dtypes, lengths, NaN/inf in ``x``, pickles."""

    title = "Invalid dataset"
    slug = "invalid-dataset"


class IdempotencyKeyReused(Unprocessable):
    """Raised when an Idempotency-Key comes back with a different payload or on another endpoint."""

    title = "Idempotency-Key reused"
    slug = "idempotency-key-reused"


class TooManyRequests(SecateursError):
    """A per-tenant quota is full (active jobs); retry when one ends."""

    status = 429
    title = "Too many requests"
    slug = "too-many-requests"


class ServiceUnavailable(SecateursError):
    """Raised when the database or broker does not answer; clients may retry after ``retry_after``."""

    status = 503
    title = "Service unavailable"
    slug = "service-unavailable"


class StoreUnavailable(ServiceUnavailable):
    """Raised when the blob store (S3) cannot be reached or keeps answering 5xx; nothing was half-written."""

    slug = "store-unavailable"


class InsufficientStorage(SecateursError):
    """Raised when the disk is full or below the free-space floor; nothing partial is kept."""

    status = 507
    title = "Insufficient storage"
    slug = "insufficient-storage"
