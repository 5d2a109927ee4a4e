"""One Settings object for the API, the worker and the CLI (environment prefix ``SECATEURS_``).

Bad values are refused at start, not at the first request: a service that boots with a broken setting fails
later, in front of a user.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def source_prefix_problem(prefix: object) -> str | None:
    """Why ``prefix`` cannot be an allowed dataset source prefix, or None: ``s3://bucket/...`` or
    ``file:///abs/...``, ending in "/" (a prefix names a folder: ``s3://data/team-a`` would also allow
    ``s3://data/team-a-evil/``), without ``..``, ``.``, empty segments, query or fragment."""
    if not isinstance(prefix, str):
        return "is not a string"
    if not prefix.endswith("/"):
        return 'must end with "/" (a folder), so that it cannot match a sibling such as ".../team-a-evil/"'
    if any(c in prefix for c in "?#\\") or any(ord(c) < 32 or ord(c) == 127 for c in prefix):
        return "must not contain '?', '#', backslashes or control characters"
    if prefix.startswith("s3://"):
        bucket, _, path = prefix[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket):
            return "must name a bucket: s3://bucket/ or s3://bucket/prefix/"
        segments = path.split("/")[:-1]
    elif prefix.startswith("file:///"):
        segments = prefix[len("file:///") :].split("/")[:-1]
    else:
        return "must start with s3://bucket/ or file:/// (an absolute path)"
    if any(seg in ("", ".", "..") for seg in segments):
        return "must not contain empty, '.' or '..' segments"
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SECATEURS_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("./var")
    database_url: str | None = Field(None, description="default: SQLite in data_dir")
    broker_url: str | None = Field(
        None, description="redis://... in production; unset = embedded file-based transport in data_dir"
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    max_model_bytes: int = Field(4 * GiB, ge=1)
    max_dataset_bytes: int = Field(
        16 * GiB,
        ge=1,
        description="one uploaded dataset file (.npz, .tfrecord, .parquet, .tar/.zip of shards); bigger data is "
        "registered by reference (SECATEURS_DATASET_SOURCES) instead of uploaded",
    )
    convert_above_bytes: int = Field(
        1 * GiB,
        ge=0,
        description="an uploaded .npz above this is converted into TFRecord shards by a worker (status "
        "validating, then converting) instead of being loaded whole; at or below, it is ready at once",
    )
    dataset_sources: Annotated[dict[str, list[str]], NoDecode] = Field(
        default_factory=dict,
        description='JSON: tenant (or "*" for every tenant) -> allowed source prefixes for datasets registered '
        'by reference, e.g. {"default": ["s3://data/team-a/", "file:///mnt/datasets/"]}; unset = none allowed',
    )
    dataset_max_objects: int = Field(
        100_000, ge=1, description="objects (shards, images) one dataset may list; more -> invalid"
    )
    dataset_shard_bytes: int = Field(
        128 * MiB, ge=1 * MiB, description="target size of the TFRecord shards a conversion writes"
    )
    dataset_memory_bytes: int = Field(
        256 * MiB,
        ge=0,
        description="a job holds a dataset's decoded inputs in memory up to this size; a larger one is streamed "
        "(fine-tuning and evaluation read it batch by batch, worker memory stays flat); 0 = always stream",
    )
    calibration_max_dim: int = Field(
        8192,
        ge=1,
        description="criterion sparsegpt: a variable whose op has more input features than this keeps magnitude "
        "scoring (named in the notes): its d x d float64 Hessian and float32 inverse factor take 12 d^2 bytes "
        "(768 MiB at the default)",
    )
    dataset_cache_max_bytes: int = Field(
        20 * GiB,
        ge=0,
        description="the worker's cache of fetched shards (S3 sources, the blob store) evicts least recently "
        "used ones above this; 0 = no cap",
    )
    max_json_bytes: int = Field(1 * MiB, ge=1024, description="non-upload request bodies (413 above)")
    max_uncompressed_bytes: int = Field(8 * GiB, ge=1)
    max_compression_ratio: float = Field(200.0, gt=1.0)
    max_archive_members: int = Field(10_000, ge=1)
    min_free_bytes: int = Field(512 * MiB, ge=0, description="uploads are refused with 507 below this")

    task_soft_time_limit: int = Field(
        3 * 3600, ge=10, description="seconds; then the job fails with 'timeout'"
    )
    task_hard_time_limit: int = Field(3 * 3600 + 300, ge=20)
    max_attempts: int = Field(3, ge=1, le=20, description="deliveries of one job before it fails")
    heartbeat_seconds: float = Field(
        10.0, ge=0.2, le=300, description="a running job's worker renews its lease this often (a thread)"
    )
    lease_seconds: float = Field(
        60.0,
        ge=1.0,
        description=(
            "a running job whose worker has not renewed its lease for this long is taken as dead: the reaper "
            "re-queues it (or fails it after max_attempts); at least 3 heartbeats"
        ),
    )
    reaper_interval_s: float = Field(
        15.0,
        ge=0.2,
        le=3600,
        description="how often the API process looks for dead jobs and lost messages",
    )
    retention_interval_s: float = Field(
        600.0,
        ge=0.2,
        le=86400,
        description="how often that loop also runs the retention sweep (it lists the data directory; TTLs are days)",
    )
    redispatch_after_s: float = Field(
        900.0,
        ge=1.0,
        description=(
            "a job still 'queued' this long after its message was sent is sent again (a broker restart that "
            "lost messages is detected and answered at once; duplicates are harmless)"
        ),
    )
    worker_max_memory_per_child: int = Field(
        6144,
        ge=0,
        description=(
            "MiB (Celery's own setting counts KiB); after a task that leaves the worker child above this, the "
            "child exits and its supervisor starts a fresh one; 0 = never"
        ),
    )
    max_active_jobs_per_tenant: int = Field(
        20, ge=1, description="queued + running jobs one tenant may have; more are refused with 429"
    )
    fan_out_trials: bool = Field(
        True,
        description=(
            "sweep jobs run one task per target (a trial) that any worker may take; false = one task runs "
            "every target on one loaded model, as before issue 23"
        ),
    )
    tenant_max_running_trials: int = Field(
        0,
        ge=0,
        description=(
            "trials one tenant may run at once across all workers; a trial over the cap goes back to the queue "
            "for trial_requeue_countdown_s instead of holding a worker; 0 = no cap"
        ),
    )
    trial_requeue_countdown_s: float = Field(
        2.0, ge=0.1, le=600, description="how long a trial over the tenant cap waits before it asks again"
    )
    model_ttl_days: float = Field(
        30.0,
        ge=0,
        description="uploaded models are deleted this long after upload (unless a job is active); 0 = keep",
    )
    dataset_ttl_days: float = Field(30.0, ge=0, description="likewise for datasets; 0 = keep")
    artifact_ttl_days: float = Field(
        14.0,
        ge=0,
        description="a finished job's artifact and metrics are deleted this long after it ended; 0 = keep",
    )
    tmp_ttl_s: float = Field(
        6 * 3600,
        ge=60,
        description="leftover temporary upload files (a killed API) untouched this long are removed",
    )
    auth: Literal["auto", "required", "disabled"] = Field(
        "auto",
        description=(
            "API keys: 'auto' requires a key once any active key exists (always in production); "
            "'required' always; 'disabled' never (everyone is tenant 'default'; refused in production)"
        ),
    )

    log_format: Literal["text", "json"] = Field(
        "text", description="'json': one JSON object per log line, with job_id, tenant and stage (docs/operations.md)"
    )
    metrics_token: str | None = Field(
        None,
        min_length=16,
        description=(
            "GET /metrics needs 'Authorization: Bearer <token>' when set; unset, it answers loopback clients only"
        ),
    )
    storage_url: str | None = Field(
        None, description="blob store: unset = data_dir (local); s3://bucket/prefix for S3-compatible storage"
    )
    s3_endpoint_url: str | None = Field(None, description="e.g. http://seaweedfs:8333; unset = AWS")
    s3_region: str | None = Field(None, description="default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1")
    presigned_downloads: bool = Field(
        False, description="downloads answer 302 to a short-lived presigned URL of the store (S3 only)"
    )
    presign_expiry_s: int = Field(300, ge=10, le=7 * 86400, description="lifetime of a presigned download URL")
    cache_dir: Path | None = Field(
        None, description="the worker's content-addressed blob cache; default data_dir/cache"
    )
    cache_max_bytes: int = Field(
        20 * GiB, ge=0, description="the cache evicts least recently used blobs above this; 0 = no cap"
    )

    webhook_allow: str = Field(
        "",
        description=(
            "comma-separated host names and IP addresses/CIDRs that webhooks may reach although they are "
            "loopback, private, link-local, ... (e.g. '127.0.0.1/32' for a receiver on this machine)"
        ),
    )
    webhook_max_attempts: int = Field(
        6, ge=1, le=20, description="deliveries of one webhook before giving up"
    )
    webhook_backoff_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="first retry delay; later ones are x3, x12, x60, x360 of it (10 s -> 30 s, 2 min, 10 min, 1 h)",
    )
    webhook_timeout_s: float = Field(
        10.0, ge=0.5, le=60, description="per connect / read / write of a delivery"
    )

    @field_validator("webhook_allow")
    @classmethod
    def _parse_allow_list(cls, value: str) -> str:
        """Parsed here only to refuse a typo at start; the guard parses it again where it is used."""
        from app.webhooks.guard import AllowList

        AllowList.parse(value)
        return value

    @field_validator("dataset_sources", mode="before")
    @classmethod
    def _parse_sources(cls, value: object) -> object:
        """Decoded here (NoDecode), so that bad JSON is refused with a message naming the setting."""
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError as exc:
                raise ValueError(
                    f"SECATEURS_DATASET_SOURCES is not valid JSON ({exc}); expected e.g. "
                    '{"default": ["s3://data/team-a/", "file:///mnt/datasets/"]}'
                ) from exc
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, list) for k, v in value.items()
        ):
            raise ValueError(
                "SECATEURS_DATASET_SOURCES must be a JSON object mapping a tenant (or \"*\") to a list of "
                'prefixes, e.g. {"default": ["s3://data/team-a/"]}'
            )
        for tenant, prefixes in value.items():
            for prefix in prefixes:
                problem = source_prefix_problem(prefix)
                if problem:
                    raise ValueError(f"SECATEURS_DATASET_SOURCES[{tenant!r}]: {prefix!r} {problem}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.task_hard_time_limit <= self.task_soft_time_limit:
            raise ValueError("SECATEURS_TASK_HARD_TIME_LIMIT must be above SECATEURS_TASK_SOFT_TIME_LIMIT")
        if self.lease_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(
                "SECATEURS_LEASE_SECONDS must be at least 3 x SECATEURS_HEARTBEAT_SECONDS, or a live worker "
                "that misses one heartbeat would lose its job"
            )
        if self.environment == "production":
            if self.auth == "disabled":
                raise ValueError(
                    "production refuses SECATEURS_AUTH=disabled: every caller would act as tenant 'default'; "
                    "create keys with `secateurs keys create --tenant NAME`"
                )
            if not self.broker_url:
                raise ValueError("production needs SECATEURS_BROKER_URL (e.g. redis://redis:6379/0)")
            if not self.database_url or self.database_url.startswith("sqlite"):
                raise ValueError("production needs SECATEURS_DATABASE_URL pointing at PostgreSQL")
        if self.broker_url and not self.broker_url.startswith(("redis://", "rediss://", "filesystem://")):
            raise ValueError("SECATEURS_BROKER_URL must be redis://, rediss:// or filesystem://")
        if self.storage_url and not self.storage_url.startswith(("s3://", "file://")):
            raise ValueError(
                "SECATEURS_STORAGE_URL must be s3://bucket[/prefix] (or file:///path); unset = SECATEURS_DATA_DIR"
            )
        if self.presigned_downloads and not (self.storage_url or "").startswith("s3://"):
            raise ValueError("SECATEURS_PRESIGNED_DOWNLOADS=true needs an s3:// SECATEURS_STORAGE_URL")
        self.data_dir = self.data_dir.resolve()
        return self

    @property
    def embedded(self) -> bool:
        """No broker configured: the file-based transport, and `serve` spawns its own worker child."""
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'secateurs.db'}"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def visibility_timeout(self) -> int:
        """Above the hard limit, so Redis never redelivers a task that is still allowed to run."""
        return self.task_hard_time_limit + 600


@lru_cache
def get_settings() -> Settings:
    return Settings()
