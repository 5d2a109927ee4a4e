"""``fine_tune.distill`` end to end through ``run_pipeline``: the dense model's outputs, computed before pruning,
steer fine-tuning. Proof by contradiction: with labels that carry no information, labels-only fine-tuning
wrecks the pruned model while teacher-only fine-tuning (alpha 1) keeps it where the dense model is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.schemas.spec import PruneSpec
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf


def _run(model: Path, spec: dict[str, Any], data: tuple[dict, dict], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    return run_pipeline(
        model, PruneSpec.model_validate(spec), data[0], data[1], out, lambda stage, progress: None
    )


def test_distillation_follows_the_dense_model_not_the_labels(
    keras3_export_dir: Path, digits_cnn: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], tmp_path: Path
) -> None:
    train, test = digits_cnn
    scrambled = ({"x": train["x"], "y": np.random.default_rng(0).permutation(train["y"])}, test)
    budget = {"epochs": 2, "batch_size": 32, "learning_rate": 0.005}
    spec = {"target_sparsity": 0.5, "schedule": {"kind": "polynomial"}, "seed": 0}
    labels = _run(keras3_export_dir, {**spec, "fine_tune": budget}, scrambled, tmp_path / "labels")
    teacher = _run(
        keras3_export_dir,
        {**spec, "fine_tune": {**budget, "distill": {"alpha": 1.0, "temperature": 2.0}}},
        scrambled,
        tmp_path / "teacher",
    )

    baseline = teacher["baseline"]["metrics"]["accuracy"]
    assert labels["baseline"]["metrics"]["accuracy"] == baseline
    assert labels["pruned"]["metrics"]["accuracy"] < baseline - 0.3  # it learned the scrambled labels
    assert teacher["pruned"]["metrics"]["accuracy"] > baseline - 0.05
    assert teacher["pruned"]["fidelity"]["top1_agreement"] > 0.95
    assert abs(teacher["pruned"]["sparsity"] - 0.5) <= 0.01
    # The spec echo and the notes say what was done; the loss history stays the task loss (labels).
    assert teacher["spec"]["fine_tune"]["distill"] == {"alpha": 1.0, "temperature": 2.0}
    assert labels["spec"]["fine_tune"]["distill"] is None
    assert any("distils from the unpruned model" in note for note in teacher["notes"])
    assert not any("distils" in note for note in labels["notes"])
