"""Labels against the loss and the model's output: a mismatch is the user's mistake (``invalid_spec``, or
``dataset_mismatch`` when the loss was inferred), named with both shapes, never an internal error from a
reshape deep inside training. Tiny models; the rule itself (app.schemas.fit) is tested without TensorFlow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.schemas.fit import label_loss_errors, loss_label_problem
from app.schemas.spec import PruneSpec
from tests.support import model_zoo
from worker.errors import PipelineError
from worker.pipeline import run_pipeline

FAST = {"latency": {"batch_sizes": [1], "runs": 3, "warmup": 1}}
Arrays = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Input 'x' (16,), output (None, 4) softmax."""
    return model_zoo.build("dense", tmp_path_factory.mktemp("zoo") / "dense")


@pytest.fixture(scope="module")
def unknown_units_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain tf.Module whose signature declares its output as (None, None): 3 logits per sample that only
    running it reveals, so only the worker's check on the real output can catch a mismatch."""
    import tensorflow as tf

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = tf.Variable(tf.random.stateless_normal((16, 3), seed=(1, 2)), name="kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            out = tf.matmul(x, self.kernel)
            return {"logits": tf.reshape(out, tf.stack([tf.shape(x)[0], -1]))}

    net = Net()
    out = tmp_path_factory.mktemp("unknown") / "model"
    tf.saved_model.save(net, str(out), signatures={"serving_default": net.serve})
    return out


def _data(n: int = 48, classes: int = 4, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 16)).astype(np.float32), "y": np.arange(n, dtype=np.int64) % classes}


def _run(model: Path, spec: dict[str, Any], train: Arrays, tmp_path: Path) -> dict[str, Any]:
    full = PruneSpec.model_validate(
        {"evaluation": FAST, "fine_tune": {"epochs": 1, "batch_size": 16}, **spec}
    )
    return run_pipeline(model, full, train, None, tmp_path, lambda _stage, _progress: None)


@pytest.mark.parametrize(
    ("loss", "y", "shown"),
    [
        ("mse", lambda d: d["y"], "(48,)"),  # issue 11: class ids with mse, was "internal: ValueError"
        ("mae", lambda d: d["y"][:, None], "(48, 1)"),  # (48, 1) against (48, 4) would broadcast silently
        ("categorical_crossentropy", lambda d: d["y"], "(48,)"),
        ("sparse_categorical_crossentropy", lambda d: np.eye(4, dtype=np.float32)[d["y"]], "(48, 4)"),
    ],
)
def test_explicit_loss_that_does_not_fit_the_labels_is_invalid_spec_at_loading(
    dense_model: Path, tmp_path: Path, loss: str, y: Any, shown: str
) -> None:
    data = _data()
    data["y"] = y(data)
    with pytest.raises(PipelineError) as caught:
        _run(dense_model, {"target_sparsity": 0.5, "loss": loss}, data, tmp_path)
    assert caught.value.code == "invalid_spec"
    message = caught.value.message
    assert f"'{loss}'" in message and f"shape {shown}" in message and "(None, 4)" in message
    assert "'y'" in message and "output_0" in message
    assert not (tmp_path / "pruned.zip").exists()  # refused before any pruning or training


def test_explicit_loss_checked_against_the_real_output_when_the_signature_does_not_say(
    unknown_units_model: Path, tmp_path: Path
) -> None:
    data = _data(classes=3)
    spec = {"target_sparsity": 0.5, "loss": "categorical_crossentropy", "from_logits": True}
    with pytest.raises(PipelineError) as caught:
        _run(unknown_units_model, spec, data, tmp_path)
    assert caught.value.code == "invalid_spec"
    assert "(48,)" in caught.value.message and "(48, 3)" in caught.value.message
    assert "sparse_categorical_crossentropy" in caught.value.message
    # the same model trains with the loss that fits
    metrics = _run(unknown_units_model, {**spec, "loss": "sparse_categorical_crossentropy"}, data, tmp_path)
    assert metrics["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.05)


def test_inferred_loss_that_cannot_fit_is_dataset_mismatch_naming_both_shapes(
    dense_model: Path, tmp_path: Path
) -> None:
    """Fractional targets, one per sample, against a 4-unit output: no loss fits (inferred mse would have
    failed reshaping (16,) into (16, 4) inside training)."""
    data = _data()
    data["y"] = np.linspace(0.1, 0.9, len(data["y"])).astype(np.float32)
    with pytest.raises(PipelineError) as caught:
        _run(dense_model, {"target_sparsity": 0.5}, data, tmp_path)
    assert caught.value.code == "dataset_mismatch"
    message = caught.value.message
    assert "'mse' (inferred from the labels)" in message and "(48,)" in message and "(48, 4)" in message
    assert "set spec.loss" in message


@pytest.mark.parametrize(
    ("loss", "y"),
    [
        ("sparse_categorical_crossentropy", lambda d: d["y"]),
        ("sparse_categorical_crossentropy", lambda d: d["y"][:, None]),
        ("categorical_crossentropy", lambda d: np.eye(4, dtype=np.float32)[d["y"]]),
        ("mse", lambda d: np.eye(4, dtype=np.float32)[d["y"]]),
    ],
)
def test_losses_that_fit_train(dense_model: Path, tmp_path: Path, loss: str, y: Any) -> None:
    data = _data()
    data["y"] = y(data)
    metrics = _run(dense_model, {"target_sparsity": 0.5, "loss": loss}, data, tmp_path)
    assert metrics["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.05)


# --- the rule, as the API applies it from the records -------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "labels", "output", "fits"),
    [
        ("sparse_categorical_crossentropy", [9], [None, 10], True),
        ("sparse_categorical_crossentropy", [9, 1], [None, 10], True),
        ("sparse_categorical_crossentropy", [9, 10], [None, 10], False),
        ("sparse_categorical_crossentropy", [9], [None, 1], False),  # one unit is not a class axis
        ("categorical_crossentropy", [9, 10], [None, 10], True),
        ("categorical_crossentropy", [9], [None, 10], False),
        ("binary_crossentropy", [9], [None, 1], True),  # reshaped: same number of values
        ("binary_crossentropy", [9, 5], [None, 5], True),  # multi-label
        ("mse", [9, 1], [None, 1], True),
        ("mse", [9, 1], [None, 10], False),  # same rank, other size: would broadcast
        ("mse", [9, 2, 3], [None, 6], True),
        ("mse", [9], [None, None], True),  # unknown size: the worker checks the real output
        ("mse", [9], None, True),  # unknown rank
    ],
)
def test_the_rule(loss: str, labels: list[int], output: list[int | None] | None, fits: bool) -> None:
    problem = loss_label_problem(loss, labels, output)
    assert (problem is None) == fits, problem


def test_the_api_pairs_labels_with_outputs_by_name_only_when_it_can() -> None:
    one = {"serving_default": {"outputs": {"probs": {"shape": [None, 10], "dtype": "float32"}}}}
    ids = {"x": {"shape": [9, 64]}, "y": {"shape": [9]}}
    assert label_loss_errors(one, "serving_default", ids, None) == []  # no explicit loss: inferred later
    assert "'probs'" in label_loss_errors(one, "serving_default", ids, "mse")[0]
    two = {"serving_default": {"outputs": {"a": {"shape": [None, 10]}, "b": {"shape": [None, 1]}}}}
    # plain 'y' with two outputs: which one it labels is the worker's choice (PREFERRED_OUTPUTS), not checked here
    assert label_loss_errors(two, "serving_default", ids, "mse") == []
    named = {"x": {"shape": [9, 64]}, "y.b": {"shape": [9]}}
    assert label_loss_errors(two, "serving_default", named, "mse") == []
    assert "'y.b'" in label_loss_errors(two, "serving_default", named, "categorical_crossentropy")[0]
