"""The published schemas are real JSON Schemas that reject what API.md forbids."""

from __future__ import annotations

import jsonschema
import pytest
from fastapi.testclient import TestClient


def _doc() -> dict:
    side = {
        "metrics": None,
        "params": {"total": 10, "prunable": 8, "nonzero": 10},
        "sparsity": 0.0,
        "size_bytes": {"saved_model": 100, "zip": 50},
        "latency_ms": {"1": {"p50": 0.1, "p95": 0.2}},
    }
    return {
        "job_id": "job_1",
        "model_id": "mdl_1",
        "spec": {"target_sparsity": 0.5},
        "baseline": side,
        "pruned": {**side, "sparsity": 0.5, "params": {"total": 10, "prunable": 8, "nonzero": 6}},
        "delta": {},
        "layers": [{"name": "dense/kernel", "shape": [4, 2], "params": 8, "sparsity": 0.5}],
        "timings_s": {
            "load": 0.1,
            "baseline": 0.1,
            "prune": 0.1,
            "fine_tune": 0.0,
            "evaluate": 0.1,
            "save": 0.1,
            "total": 0.5,
        },
        "notes": [],
        "versions": {"secateurs": "0.1.0", "tensorflow": "2.21.0"},
    }


def test_metrics_schema_accepts_a_document_and_rejects_a_missing_side(client: TestClient) -> None:
    schema = client.get("/v1/schemas/metrics").json()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_doc(), schema)
    broken = _doc()
    del broken["baseline"]
    with pytest.raises(jsonschema.ValidationError, match="baseline"):
        jsonschema.validate(broken, schema)


def test_spec_schema_is_published(client: TestClient) -> None:
    schema = client.get("/v1/schemas/spec").json()
    assert {"target_sparsity", "search", "sweep", "sensitivity"} <= set(schema["properties"])
    jsonschema.validate({"target_sparsity": 0.5}, schema)
    jsonschema.validate({"search": {"metric": "accuracy", "max_drop": 0.01}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"search": {"max_drop": -1}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"target_sparsity": 1.5}, schema)
