"""``Job.calibration_inputs``: which records calibration methods read, from which dataset, labels ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.models import load_model
from worker.stages.feed import Streamed
from worker.stages.load import prepare

pytestmark = pytest.mark.tf


def _spec(**extra: object) -> PruneSpec:
    return PruneSpec.model_validate({"target_sparsity": 0.5, "criterion": "wanda", **extra})


def test_calibration_inputs_choose_seeded_records_from_the_calibration_set(
    tf_module_dir: Path, digits_flat: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
) -> None:
    handle = load_model(tf_module_dir)
    train, test = digits_flat
    # labels of another shape than the model's output: ignored, not a dataset_mismatch
    calibration = {"x": test["x"][:100], "y": np.zeros((100, 3, 3))}
    job = prepare(handle, _spec(calibration={"samples": 40, "batch_size": 16}), train, None, calibration)
    inputs = job.calibration_inputs()
    (name,) = inputs
    assert inputs[name].shape == (40, 64)
    assert all(any(np.array_equal(row, c) for c in test["x"][:100]) for row in inputs[name])
    again = prepare(handle, _spec(calibration={"samples": 40}), train, None, calibration).calibration_inputs()
    np.testing.assert_array_equal(again[name], inputs[name])  # same seed, same records
    other = prepare(handle, _spec(calibration={"samples": 40}, seed=3), train, None, calibration)
    assert not np.array_equal(other.calibration_inputs()[name], inputs[name])
    assert [len(b[name]) for b in job.calibration_batches()()] == [16, 16, 8]
    # without a calibration set the train inputs serve; a streamed set gives its in-memory sample
    streamed = prepare(handle, _spec(), None, None, Streamed(sample={"x": train["x"][:50]}, reader=None))
    assert streamed.calibration_inputs()[name].shape == (50, 64)
    assert "fewer than calibration.samples" in "\n".join(streamed.notes)
    fallback = prepare(handle, _spec(), train, None).calibration_inputs()
    assert fallback[name].shape == (128, 64)
    with pytest.raises(PipelineError, match="calibration_dataset_id or train_dataset_id"):
        prepare(handle, _spec(), None, None).calibration_inputs()
