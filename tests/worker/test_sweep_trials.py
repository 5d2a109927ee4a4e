"""A sweep run as trials (one ``run_pipeline(..., trial=i)`` per target, each on a model loaded for it, then
``aggregate_sweep``) gives the document the one-task sweep gives: the same points, Pareto flags and top level,
number for number. What the trial tasks and the aggregation task do around this is tested through the API
(tests/e2e/test_trials.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.presets import resolve
from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.kinds import SWEEP_TRIALS
from worker.kinds.sweep import aggregate_sweep
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf

# What must not depend on where (and in which process) a target ran; seconds and latency may, and the zip's
# size by a few hundred bytes: saved_model.pb names the functions TensorFlow traced, numbered per process.
SAME = (
    "target",
    "sparsity",
    "metric",
    "params_total",
    "params_nonzero",
    "effective_macs",
    "pareto",
)


def _trials(model_dir: Path, spec: PruneSpec, data: Any, tmp_path: Path) -> list[dict[str, Any]]:
    train, test = data
    rows = []
    for index, label in enumerate(p.label for p in SWEEP_TRIALS.plan(spec)):
        out = tmp_path / f"trial-{index}"
        out.mkdir()
        document = run_pipeline(model_dir, spec, train, test, out, lambda stage, progress: None, trial=index)
        assert (out / "artifacts" / f"{label}.zip").is_file()
        assert document["pruned"]["sparsity"] == pytest.approx(spec.sweep.targets[index], abs=0.01)  # type: ignore[union-attr]
        rows.append(
            {"index": index, "status": "succeeded", "document": document, "seconds": 1.0, "error": None}
        )
    return rows


def test_trials_aggregate_to_the_one_task_sweep(
    keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path
) -> None:
    spec = resolve(
        PruneSpec.model_validate(
            {"sweep": {"targets": [0.5, 0.9]}, "fine_tune": {"epochs": 1, "batch_size": 128}, "seed": 7}
        ),
        True,
    )
    train, test = digits_cnn
    (tmp_path / "one").mkdir()
    whole = run_pipeline(keras3_export_dir, spec, train, test, tmp_path / "one", lambda s, p: None)
    rows = _trials(keras3_export_dir, spec, digits_cnn, tmp_path)
    document, top = aggregate_sweep(spec, rows)
    MetricsDocument.model_validate({"job_id": "j", "model_id": "m", **document})
    assert top == 1
    assert [{k: p[k] for k in SAME} for p in document["sweep"]["points"]] == [
        {k: p[k] for k in SAME} for p in whole["sweep"]["points"]
    ]
    for ours, theirs in zip(document["sweep"]["points"], whole["sweep"]["points"], strict=True):
        assert abs(ours["zip_bytes"] - theirs["zip_bytes"]) <= 2048
    for ours, theirs in zip(document["sweep"]["points"], whole["sweep"]["points"], strict=True):
        assert abs(ours["zip_bytes"] - theirs["zip_bytes"]) <= 2048
    assert document["pruned"]["metrics"] == whole["pruned"]["metrics"]
    assert document["layers"] == whole["layers"]
    assert document["spec"] == whole["spec"]
    assert {k: v for k, v in document["sweep"].items() if k != "points"} == {
        k: v for k, v in whole["sweep"].items() if k != "points"
    }

    # A target whose trial failed is a point with its reason; the top level is the highest that succeeded
    failed = [
        rows[0],
        {
            "index": 1,
            "status": "failed",
            "document": None,
            "seconds": 2.0,
            "error": {"code": "interrupted", "message": "the worker died 3 times"},
        },
    ]
    partial, top = aggregate_sweep(spec, failed)
    assert top == 0
    points = partial["sweep"]["points"]
    assert (
        points[1]["error"]["code"] == "interrupted"
        and points[1]["metric"] is None
        and not points[1]["pareto"]
    )
    assert points[0]["pareto"] and partial["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert any("failed targets" in note for note in partial["notes"])
    MetricsDocument.model_validate({"job_id": "j", "model_id": "m", **partial})
    with pytest.raises(PipelineError, match="every target of the sweep failed"):
        aggregate_sweep(spec, [{**failed[1], "index": i} for i in range(2)])
    shutil.rmtree(tmp_path, ignore_errors=True)
