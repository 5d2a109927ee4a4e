"""Sensitivity on a model built to have one fragile and one robust variable: the fragile one ranks first, the
robust one may be pruned far, and the suggested layer_sparsity says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf

FEATURES, CLASSES = 8, 4


def _fragile_module(out_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """``softmax(x @ robust @ fragile)``: ``robust`` is the identity plus tiny noise (magnitude pruning drops
    the noise first, so it survives high sparsity); ``fragile`` is dense Gaussian (every weight matters). The
    labels are the model's own predictions, so the baseline is exactly 1.0."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    robust = np.eye(FEATURES) + rng.normal(0, 1e-3, (FEATURES, FEATURES))
    fragile = rng.normal(0, 1.0, (FEATURES, CLASSES))

    class Fragile(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="fragile_model")
            self.robust = tf.Variable(robust.astype(np.float32), name="robust")
            self.fragile = tf.Variable(fragile.astype(np.float32), name="fragile")

        @tf.function(input_signature=[tf.TensorSpec([None, FEATURES], tf.float32, name="x")])
        def serve(self, x: Any) -> dict[str, Any]:
            return {"probs": tf.nn.softmax(tf.matmul(tf.matmul(x, self.robust), self.fragile))}

    module = Fragile()
    tf.saved_model.save(module, str(out_dir), signatures={"serving_default": module.serve})
    x = rng.normal(0, 1, (400, FEATURES)).astype(np.float32)
    y = np.argmax(x @ robust @ fragile, axis=1).astype(np.int64)
    return out_dir, {"x": x, "y": y}


def test_the_fragile_variable_ranks_first(tmp_path: Path) -> None:
    model, data = _fragile_module(tmp_path / "model")
    spec = PruneSpec.model_validate(
        {"sensitivity": {"sparsities": [0.25, 0.5, 0.8]}, "sensitivity_max_drop": 0.02}
    )
    out = tmp_path / "out"
    out.mkdir()
    doc = run_pipeline(model, spec, None, data, out, lambda stage, progress: None)
    MetricsDocument.model_validate({"job_id": "j", "model_id": "m", **doc})
    section = doc["sensitivity"]
    assert section["baseline"] == 1.0 and section["metric"] == "accuracy"
    names = section["ranking"]
    assert "fragile" in names[0] and "robust" in names[1]
    rows = {r["name"]: r for r in section["variables"]}
    fragile, robust = rows[names[0]], rows[names[1]]
    assert fragile["drops"][-1] > 0.2  # 80% of a dense Gaussian mixing matrix: many predictions change
    assert all(d is not None and d <= 0.02 for d in robust["drops"])  # only the noise goes
    assert robust["max_sparsity_within_drop"] == 0.8
    assert fragile["max_sparsity_within_drop"] < 0.8
    suggested = section["layer_sparsity"]
    assert suggested[f"^{names[1]}$"] == 0.8
    # 'pruned' is the suggestion applied one-shot
    layers = {r["name"]: r["sparsity"] for r in doc["layers"]}
    assert layers[names[1]] == pytest.approx(0.8, abs=0.05)
    assert doc["spec"]["sensitivity"]["sparsities"] == [0.25, 0.5, 0.8]
    assert any("keep no model" in n or "keeps no model" in n for n in doc["notes"])
    assert len(doc["notes"]) == len(set(doc["notes"])) < 20  # not one note per variable and level


def test_a_variable_the_granularity_leaves_dense_is_skipped(
    keras3_export_dir: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """Channel granularity keeps the output head whole: it is marked, not suggested at a sparsity."""
    spec = PruneSpec.model_validate({"sensitivity": {"sparsities": [0.25, 0.5]}, "granularity": "channel"})
    doc = run_pipeline(keras3_export_dir, spec, None, digits_cnn[1], tmp_path, lambda stage, progress: None)
    rows = {r["name"]: r for r in doc["sensitivity"]["variables"]}
    head = rows["digits_cnn/dense_1/kernel"]
    assert head["skipped"] and head["sparsity_reached"] == [0.0, 0.0]
    assert "^digits_cnn/dense_1/kernel$" not in doc["sensitivity"]["layer_sparsity"]
    assert rows["digits_cnn/dense/kernel"]["sparsity_reached"][0] > 0
