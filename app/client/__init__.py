"""Python client for the Secateurs API (depends on httpx only).

    from app.client import Client, JobFailed

    with Client("http://127.0.0.1:8000", api_key="sk_...") as client:
        model = client.upload_model("model.zip", name="digits")
        train = client.upload_dataset("train.npz")
        job = client.create_job(model.id, {"target_sparsity": 0.8, "fine_tune": {"epochs": 2}},
                                train_dataset_id=train.id)
        job = job.wait(timeout=600, on_progress=lambda j: print(j.stage, j.progress))
        client.download_artifact(job.id, "pruned.zip")       # verified against ETag / Repr-Digest
        print(client.metrics(job.id)["pruned"]["sparsity"])

Errors: see :mod:`app.client.errors` (one tree; ``SecateursClientError`` catches them all).
"""

from app.client.client import Client, Clock, SystemClock
from app.client.errors import (
    ApiError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    DatasetInvalid,
    DigestMismatch,
    Forbidden,
    Gone,
    InsufficientStorage,
    JobCanceled,
    JobError,
    JobFailed,
    ModelInvalid,
    NotFound,
    PayloadTooLarge,
    SecateursClientError,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
    WaitTimeout,
)
from app.client.progress import ProgressPrinter
from app.client.resources import Dataset, ErrorInfo, Job, Model

__all__ = [
    "ApiError",
    "BadRequest",
    "Client",
    "Clock",
    "Conflict",
    "ConnectionFailed",
    "Dataset",
    "DatasetInvalid",
    "DigestMismatch",
    "ErrorInfo",
    "Forbidden",
    "Gone",
    "InsufficientStorage",
    "Job",
    "JobCanceled",
    "JobError",
    "JobFailed",
    "Model",
    "ModelInvalid",
    "NotFound",
    "PayloadTooLarge",
    "ProgressPrinter",
    "SecateursClientError",
    "ServiceUnavailable",
    "SystemClock",
    "TooManyRequests",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "WaitTimeout",
]
