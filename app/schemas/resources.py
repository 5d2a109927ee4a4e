"""Response and request bodies of the Models, Datasets and Jobs resources (API.md names)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.spec import PruneSpec
from app.schemas.vocabulary import DatasetFormat, DatasetStatus
from app.webhooks.guard import MAX_URL_LENGTH

Item = TypeVar("Item")


class ErrorInfo(BaseModel):
    code: str
    message: str


class TensorInfo(BaseModel):
    shape: list[int | None]
    dtype: str


class SignatureInfo(BaseModel):
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]


class ModelOut(BaseModel):
    id: str
    name: str
    format: Literal["saved_model", "keras"]
    size_bytes: int
    sha256: str
    status: Literal["validating", "ready", "invalid"]
    created_at: datetime
    signatures: dict[str, SignatureInfo] | None = None
    params: int | None = None
    error: ErrorInfo | None = None


class ArrayInfo(BaseModel):
    shape: list[int]
    dtype: str


class DatasetOut(BaseModel):
    id: str
    name: str
    format: DatasetFormat = Field("npz", description="npz, tfrecord, parquet or image_folder (as registered)")
    source: str | None = Field(None, description="the reference's s3:// or file:// URI; null for uploads")
    status: DatasetStatus = Field(
        "ready",
        description="validating -> (converting) -> ready | invalid; jobs take ready datasets only. A small "
        ".npz upload is ready at once",
    )
    size_bytes: int | None = Field(None, description="bytes stored or listed; null until known")
    sha256: str | None = Field(None, description="of the uploaded file; null for references")
    arrays: dict[str, ArrayInfo] | None = Field(
        None,
        description="per array (x or x.<input>, y): shape (first dim n_samples, or -1 when unknown) and dtype "
        "after decoding; null until validated",
    )
    n_samples: int | None = Field(None, description="null until known (TFRecord shards are not always counted)")
    shards: int | None = Field(None, description="files the data is read from; null until validated")
    features: dict[str, Any] | None = Field(None, description="TFRecord features, as given or inferred")
    class_names: list[str] | None = Field(
        None, description="image folders: the sorted folder names (label id = index)"
    )
    error: ErrorInfo | None = Field(None, description="why the dataset is invalid")
    progress: float | None = Field(None, description="0..1 while validating or converting")
    created_at: datetime


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "mdl_0123456789abcdef0123",
                    "train_dataset_id": "ds_0123456789abcdef0123",
                    "eval_dataset_id": "ds_abcdef0123456789abcd",
                    "spec": {
                        "target_sparsity": 0.8,
                        "schedule": {"kind": "polynomial"},
                        "fine_tune": {"epochs": 3},
                    },
                }
            ]
        },
    )

    model_id: str = Field(min_length=1, max_length=64)
    spec: PruneSpec
    train_dataset_id: str | None = Field(None, min_length=1, max_length=64)
    eval_dataset_id: str | None = Field(None, min_length=1, max_length=64)
    calibration_dataset_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="inputs for calibration-based criteria (wanda, sparsegpt) and spec.reconstruct; labels, if "
        "any, are ignored. Absent: the train dataset's inputs serve. With it and no spec.criterion, preset "
        "`fast` prunes with sparsegpt",
    )
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL to POST a signed job.succeeded / job.failed / job.canceled event to when the "
        "job ends (Standard Webhooks). Absent: the tenant's default URL, if any; null: no webhook.",
    )


class WebhookDeliveryOut(BaseModel):
    """One attempt to deliver the job's webhook. ``status_code`` is the receiver's answer (null if none came);
    ``error`` says why the attempt did not count as delivered; ``next_retry_at`` is when the next one runs."""

    attempt: int
    at: datetime
    status_code: int | None
    error: str | None
    next_retry_at: datetime | None
    duration_ms: int | None


class JobOut(BaseModel):
    id: str
    model_id: str
    train_dataset_id: str | None
    eval_dataset_id: str | None
    calibration_dataset_id: str | None = None
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    stage: str | None
    progress: float
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: ErrorInfo | None
    spec: dict[str, Any]
    webhook_url: str | None = None
    webhook_id: str | None = Field(
        None, description="the webhook-id header of the job's event, once it ended"
    )
    webhook_status: Literal["pending", "sending", "delivered", "failed", "gone"] | None = None
    webhook_deliveries: list[WebhookDeliveryOut] = Field(default_factory=list)
    expired_at: datetime | None = Field(
        None,
        description=(
            "when the retention policy (SECATEURS_ARTIFACT_TTL_DAYS) deleted the job's artifact and metrics; "
            "their downloads then answer 410 Gone. Null while they are kept"
        ),
    )
    links: dict[str, str] = Field(
        default_factory=dict,
        description="related resources: self, metrics, artifact, report (the HTML page); the outputs answer "
        "409 until the job succeeded",
    )


class WebhookSecretOut(BaseModel):
    """The tenant's webhook signing secret. ``previous_secret_expires_at``: after a rotation, deliveries
    carry a second signature made with the old secret until then."""

    secret: str
    created_at: datetime
    previous_secret_expires_at: datetime | None = None


class WebhookSettings(BaseModel):
    """The tenant's webhook settings: ``default_url`` is used by jobs created without ``webhook_url``."""

    model_config = ConfigDict(extra="forbid")

    default_url: str | None = Field(None, min_length=1, max_length=MAX_URL_LENGTH)


class ArtifactItem(BaseModel):
    """One downloadable file of a succeeded job (``GET /v1/jobs/{id}/artifacts``)."""

    name: str = Field(
        description="saved_model, tflite_float32, tflite_float16, tflite_dynamic_range, tflite_int8, ..."
    )
    media_type: str
    size_bytes: int
    sha256: str = Field(description="hex SHA-256 of the file: its download's ETag and Repr-Digest")
    href: str


class ArtifactList(BaseModel):
    items: list[ArtifactItem]


class Page(BaseModel, Generic[Item]):
    items: list[Item]
    next_cursor: str | None


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
