"""Records -> response bodies. One place, so the three resources render timestamps and errors alike."""

from __future__ import annotations

from app.schemas.resources import DatasetOut, JobOut, ModelOut
from app.store.repo import as_utc
from app.store.tables import DatasetRecord, JobRecord, ModelRecord


def model_out(record: ModelRecord) -> ModelOut:
    return ModelOut.model_validate(
        {
            "id": record.id,
            "name": record.name,
            "format": record.format,
            "size_bytes": record.size_bytes,
            "sha256": record.sha256,
            "status": record.status,
            "created_at": as_utc(record.created_at),
            "signatures": record.signatures,
            "params": record.params,
            "error": record.error,
        }
    )


def dataset_out(record: DatasetRecord) -> DatasetOut:
    return DatasetOut.model_validate(
        {
            "id": record.id,
            "name": record.name,
            "size_bytes": record.size_bytes,
            "sha256": record.sha256,
            "arrays": record.arrays,
            "n_samples": record.n_samples,
            "created_at": as_utc(record.created_at),
        }
    )


def job_out(record: JobRecord) -> JobOut:
    return JobOut.model_validate(
        {
            "id": record.id,
            "model_id": record.model_id,
            "train_dataset_id": record.train_dataset_id,
            "eval_dataset_id": record.eval_dataset_id,
            "status": record.status,
            "stage": record.stage,
            "progress": record.progress,
            "attempts": record.attempts,
            "cancel_requested": record.cancel_requested,
            "created_at": as_utc(record.created_at),
            "started_at": as_utc(record.started_at),
            "finished_at": as_utc(record.finished_at),
            "error": record.error,
            "spec": record.spec,
        }
    )
