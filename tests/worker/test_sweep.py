"""Sweep on the digits CNN: one point per target, an artifact per target, the highest target on top, and
Pareto flags that are exactly the non-dominated points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.presets import resolve
from app.schemas.spec import PruneSpec
from worker.kinds.sweep import artifact_names, mark_pareto
from worker.models import load_model
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf


def _dominated(p: dict[str, Any], points: list[dict[str, Any]]) -> bool:
    return any(
        q is not p
        and q["metric"] >= p["metric"]
        and q["zip_bytes"] <= p["zip_bytes"]
        and (q["metric"] > p["metric"] or q["zip_bytes"] < p["zip_bytes"])
        for q in points
    )


def test_sweep_points_artifacts_and_pareto(keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path) -> None:
    spec = resolve(PruneSpec.model_validate({"sweep": {"targets": [0.9, 0.5, 0.8]}, "preset": "fast"}), True)
    train, test = digits_cnn
    doc = run_pipeline(keras3_export_dir, spec, train, test, tmp_path, lambda stage, progress: None)
    MetricsDocument.model_validate({"job_id": "j", "model_id": "m", **doc})
    points = doc["sweep"]["points"]
    assert [p["target"] for p in points] == [0.5, 0.8, 0.9]
    for p in points:
        assert abs(p["sparsity"] - p["target"]) < 0.01
        assert p["zip_bytes"] > 0 and p["params_nonzero"] > 0 and p["effective_macs"] > 0
        assert p["pareto"] == (not _dominated(p, points))
        assert (tmp_path / "artifacts" / f"{p['artifact']}.zip").is_file()
    assert points[0]["zip_bytes"] > points[-1]["zip_bytes"]
    assert any(p["pareto"] for p in points)
    assert doc["pruned"]["sparsity"] == pytest.approx(0.9, abs=0.01)  # the top level is the highest target
    assert (tmp_path / "pruned.zip").read_bytes() == (
        tmp_path / "artifacts" / "sparsity-0.90.zip"
    ).read_bytes()
    kernels = [nv.var.numpy() for nv in load_model(tmp_path / "saved_model").prunable()]
    assert sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels) == pytest.approx(
        0.9, abs=0.01
    )
    assert doc["spec"]["sweep"]["targets"] == [0.5, 0.8, 0.9]


def test_pareto_marks_only_non_dominated_points() -> None:
    points = [
        {"metric": 0.95, "zip_bytes": 100},
        {"metric": 0.93, "zip_bytes": 120},  # worse and bigger than the first: dominated
        {"metric": 0.90, "zip_bytes": 50},
        {"metric": 0.90, "zip_bytes": 60},  # same metric, bigger: dominated
        {"metric": None, "zip_bytes": 10},
    ]
    mark_pareto(points, lower_is_better=False)
    assert [p["pareto"] for p in points] == [True, False, True, False, False]
    mark_pareto(points[:4], lower_is_better=True)  # mse-like: 0.90 at 50 bytes dominates everything
    assert [p["pareto"] for p in points[:4]] == [False, False, True, False]


def test_artifact_names_stay_distinct() -> None:
    assert artifact_names([0.5, 0.8]) == ["sparsity-0.50", "sparsity-0.80"]
    assert artifact_names([0.8, 0.805]) == ["sparsity-0.8", "sparsity-0.805"]
