"""Records -> response bodies. One place, so the three resources render timestamps and errors alike.

Outside app/api because the webhook delivery (run by the worker, which never imports app.api) sends the job
body exactly as GET /v1/jobs/{id} renders it.
"""

from __future__ import annotations

from app.db.tables import DatasetRecord, JobRecord, ModelRecord, as_utc
from app.db.webhooks import WebhookState
from app.schemas.resources import DatasetOut, JobOut, ModelOut


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
            "format": record.format or "npz",
            "source": record.source,
            "status": record.status or "ready",
            "size_bytes": record.size_bytes,
            "sha256": record.sha256,
            "arrays": record.arrays,
            "n_samples": record.n_samples,
            "shards": record.shards,
            "features": record.features,
            "class_names": record.class_names,
            "error": record.error,
            "progress": record.progress,
            "created_at": as_utc(record.created_at),
        }
    )


def job_out(record: JobRecord, webhook: WebhookState | None = None) -> JobOut:
    """``webhook``: the job's webhook message and attempts, once it ended (see app.db.webhooks)."""
    message = webhook.message if webhook else None
    deliveries = webhook.deliveries if webhook else []
    return JobOut.model_validate(
        {
            "id": record.id,
            "model_id": record.model_id,
            "train_dataset_id": record.train_dataset_id,
            "eval_dataset_id": record.eval_dataset_id,
            "calibration_dataset_id": record.calibration_dataset_id,
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
            "webhook_url": record.webhook_url,
            "expired_at": as_utc(record.expired_at),
            "links": {
                "self": f"/v1/jobs/{record.id}",
                "metrics": f"/v1/jobs/{record.id}/metrics",
                "artifact": f"/v1/jobs/{record.id}/artifact",
                "report": f"/v1/jobs/{record.id}/report",
            },
            "webhook_id": message.id if message else None,
            "webhook_status": message.status if message else None,
            "webhook_deliveries": [
                {
                    "attempt": d.attempt,
                    "at": as_utc(d.at),
                    "status_code": d.status_code,
                    "error": d.error,
                    "next_retry_at": as_utc(d.next_retry_at),
                    "duration_ms": d.duration_ms,
                }
                for d in deliveries
            ],
        }
    )
