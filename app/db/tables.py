"""The records. The database is the truth about a job; the Celery result backend is not used.

Every model, dataset and job belongs to a ``tenant`` (the owner of the API key that created it; ``default``
when keys are not in use). Lists are ``WHERE tenant = ? ORDER BY created_at DESC, id DESC``, so the list
indexes lead with the tenant.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_TENANT = "default"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _tenant_column() -> Mapped[str]:
    """Indexed by the ``(tenant, created_at, id)`` list index; ``server_default`` so that adding the column to
    a database created before tenants existed (``init_db``) puts the old rows in ``default``."""
    return mapped_column(String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ModelRecord(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    name: Mapped[str] = mapped_column(String(256))
    format: Mapped[str] = mapped_column(String(16))  # saved_model | keras
    filename: Mapped[str] = mapped_column(String(256))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="validating")  # validating | ready | invalid
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    signatures: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    params: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    # When its validation message was last published: the reaper re-sends one a broker lost (see app.maintenance).
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Loads begun by a validation: a worker killed while loading (out of memory) leaves the model 'validating',
    # and without a count the reaper would re-send it into the same crash forever (worker.tasks).
    load_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index("ix_models_created", "created_at", "id"),
        Index("ix_models_tenant_created", "tenant", "created_at", "id"),
    )


class DatasetRecord(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    name: Mapped[str] = mapped_column(String(256))
    # Unknown until validated for data registered by reference (and sha256 stays unknown for it: the bytes
    # never pass through the API). Nullable since issue 20; init_db relaxes NOT NULL on older databases.
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    arrays: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    n_samples: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Issue 20 (datasets at scale). Server defaults put datasets uploaded before it in "npz" / "ready".
    format: Mapped[str] = mapped_column(String(16), default="npz", server_default="npz")  # DatasetFormat
    source: Mapped[str | None] = mapped_column(String(2048), nullable=True)  # the reference URI; None: upload
    status: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")  # DatasetStatus
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {"code", "message"}
    progress: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0..1 while validating/converting
    # The registration's compression, features, inputs, label (what the caller said about the data).
    description: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Written by the worker (DATA_PLAN.md "Manifest"): the stream reader's input once ready.
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    shards: Mapped[int | None] = mapped_column(Integer, nullable=True)
    features: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    class_names: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    # Validations begun (a worker killed while validating must not be re-sent into the same crash forever)
    # and when the validation message was last published or its worker last reported progress (the reaper
    # re-sends a pending one whose message a broker lost, app.maintenance).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        Index("ix_datasets_created", "created_at", "id"),
        Index("ix_datasets_tenant_created", "tenant", "created_at", "id"),
    )


class JobRecord(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    train_dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    eval_dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Inputs for calibration-based pruning (issue 21). Nullable: init_db adds it to old databases.
    calibration_dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    artifact_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # When its run message was last published: a queued job whose message a broker lost is sent again.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Where to POST the job.<status> webhook when it ends: the request's URL, else the tenant's default then.
    webhook_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    # Set when retention (app.retention) deleted the job's artifact and metrics: downloads then answer 410
    # instead of a puzzling 404, and the record itself is kept. Nullable, so init_db adds it to old databases.
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Every file a succeeded job offers (GET /v1/jobs/{id}/artifacts): [{"name", "file" (path in the job's
    # storage), "media_type", "size_bytes", "sha256"}], the SavedModel zip first. A list, not columns, so new
    # kinds (TFLite exports, sweep points) need no schema change; NULL for jobs finished before it existed
    # (their only file is artifact_sha256/artifact_bytes' pruned.zip). Nullable: init_db adds it to old databases.
    artifacts: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    # Operators' view (GET /metrics): which worker process holds the job ("host:pid", set at each claim), and
    # the seconds each stage took, written when the worker ends the job ({"loading": 1.2, ..., "total": 9.9}).
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_finished", "finished_at"),  # /metrics reads the jobs finished since its last scrape
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_retention", "expired_at", "finished_at"),  # the sweep: not yet expired, ended before X
    )


class ApiKeyRecord(Base):
    """An API key. Only the SHA-256 of the whole key is kept: the plaintext is shown once, at creation.

    Keys look like ``sk_<prefix>_<secret>``; ``prefix`` (unique, not secret) finds the row, then the hashes are
    compared in constant time. A fast hash is right here: the secret is 256 random bits, not a password.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class IdempotencyRecord(Base):
    """One Idempotency-Key of one tenant: held while its first request runs, then the response to replay.

    ``owner`` is a random token of the request holding the key, so a request whose hold was taken over (it
    looked abandoned) cannot overwrite the new holder's outcome. ``fingerprint`` is NULL while an upload is
    still streaming (its hash is known only at the end).
    """

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    endpoint: Mapped[str] = mapped_column(String(300))  # "POST /v1/jobs"
    fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # in_flight | done
    owner: Mapped[str] = mapped_column(String(64))
    locked_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_headers: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    __table_args__ = (UniqueConstraint("tenant", "key", name="uq_idempotency_tenant_key"),)


class TenantWebhookRecord(Base):
    """A tenant's webhook signing secret (and the one it replaced, still signing until it expires) and its
    default webhook URL for new jobs.

    The secret is stored as is: the sender needs it to compute HMACs, so a hash would not do. Whoever reads
    the database can therefore forge this tenant's webhooks; see app.webhooks.tenants for the threat model.
    """

    __tablename__ = "tenant_webhooks"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    secret_created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    previous_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    previous_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    default_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookMessageRecord(Base):
    """One webhook message: a job's terminal event, to be delivered to ``url`` (an outbox row).

    Written in the same transaction that ends the job, so an event cannot be lost between the status change
    and the publishing of its delivery task. ``status``: ``pending`` (attempt ``attempts + 1`` is due at
    ``next_attempt_at``), ``sending`` (attempt ``attempts`` is in flight since ``sending_since``),
    ``delivered``, ``gone`` (the receiver answered 410) or ``failed`` (attempts used up).
    """

    __tablename__ = "webhook_messages"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the webhook-id header
    job_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | job.canceled
    url: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sending_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_webhook_messages_status", "status", "next_attempt_at"),)


class WebhookDeliveryRecord(Base):
    """One attempt to deliver a message. Inserted before the request is sent (``at``), completed after."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    next_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)

    # Two workers can never both record (and so send) attempt N of one message.
    __table_args__ = (UniqueConstraint("message_id", "attempt", name="uq_webhook_delivery_attempt"),)


ACTIVE_JOB_STATUSES = ("queued", "running")
PENDING_DATASET_STATUSES = ("validating", "converting")  # a worker still owes the dataset a verdict
TERMINAL_JOB_STATUSES = ("succeeded", "failed", "canceled")
