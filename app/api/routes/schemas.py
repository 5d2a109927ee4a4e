"""Published JSON Schemas: what clients validate against (the metrics document, the pruning spec)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.schemas.metrics import metrics_json_schema
from app.schemas.spec import PruneSpec

router = APIRouter(prefix="/v1/schemas", tags=["schemas"])


@router.get("/metrics", summary="JSON Schema of GET /v1/jobs/{id}/metrics")
def metrics_schema() -> dict[str, Any]:
    return metrics_json_schema()


@router.get("/spec", summary="JSON Schema of the pruning spec")
def spec_schema() -> dict[str, Any]:
    return PruneSpec.model_json_schema()
