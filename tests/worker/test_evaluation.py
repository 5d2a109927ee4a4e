"""Metrics (against scikit-learn called directly), task inference, latency and sizes/zips. No TensorFlow."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn import metrics as skm

from worker.evaluation import size as size_mod
from worker.evaluation.latency import interleaved_latency
from worker.evaluation.metrics import (
    classification_metrics,
    infer_task,
    regression_metrics,
    target_kind,
    to_probabilities,
)
from worker.evaluation.size import dir_size, zip_dir

# ---------------------------------------------------------------- classification


@pytest.fixture
def multiclass() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=80)  # class 3 of 4 never appears in the labels
    logits = rng.normal(size=(80, 4)) + 2.0 * np.eye(4)[labels]
    return labels, logits.astype(np.float32)


def test_classification_metrics_equal_sklearn(multiclass: tuple[np.ndarray, np.ndarray]) -> None:
    labels, logits = multiclass
    got = classification_metrics(labels, logits, from_logits=True)
    probs = softmax(logits.astype(np.float64), axis=1)
    pred = probs.argmax(axis=1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert got["precision_macro"] == pytest.approx(
        skm.precision_score(labels, pred, average="macro", zero_division=0)
    )
    assert got["recall_macro"] == pytest.approx(
        skm.recall_score(labels, pred, average="macro", zero_division=0)
    )
    assert got["f1_macro"] == pytest.approx(skm.f1_score(labels, pred, average="macro", zero_division=0))
    assert got["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=[0, 1, 2, 3]).tolist()
    assert len(got["confusion_matrix"]) == 4  # every class of the output, even one absent from labels
    assert got["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=[0, 1, 2, 3]), rel=1e-6)
    assert 0.5 < got["accuracy"] < 1.0
    assert json.loads(json.dumps(got)) == got


def test_one_hot_labels_and_probability_outputs_agree(multiclass: tuple[np.ndarray, np.ndarray]) -> None:
    labels, logits = multiclass
    reference = classification_metrics(labels, logits, from_logits=True)
    one_hot = classification_metrics(np.eye(4)[labels], logits, from_logits=True)
    probs = softmax(logits, axis=1).astype(np.float32)  # rows sum to 1 only up to float32 rounding
    from_probs = classification_metrics(labels, probs, from_logits=False)
    for other in (one_hot, from_probs):
        assert other["confusion_matrix"] == reference["confusion_matrix"]
        assert other["accuracy"] == reference["accuracy"]
        assert other["loss"] == pytest.approx(reference["loss"], rel=1e-5)


def test_binary_single_unit_output_by_hand() -> None:
    logits = np.array([[-2.0], [0.1], [3.0], [-0.5]])
    y = np.array([0, 1, 0, 0])
    got = classification_metrics(y, logits, from_logits=True)
    assert got["accuracy"] == 0.75  # predictions 0, 1, 1, 0
    assert got["confusion_matrix"] == [[2, 1], [0, 1]]
    assert got["precision_macro"] == pytest.approx((1.0 + 0.5) / 2)
    assert got["recall_macro"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert got["loss"] == pytest.approx(skm.log_loss(y, expit(logits.reshape(-1)), labels=[0, 1]))
    # Probability exactly 0.5 is class 0 (Keras' "> 0.5" rule).
    assert (
        classification_metrics(np.array([0, 1]), np.array([0.5, 0.9]), from_logits=False)["accuracy"] == 1.0
    )


def test_classification_refuses_labels_beyond_the_output() -> None:
    with pytest.raises(ValueError, match="classes"):
        classification_metrics(np.array([0, 4]), np.zeros((2, 3)), from_logits=True)


def test_to_probabilities_is_stable() -> None:
    p = to_probabilities(np.array([[1000.0, 0.0, -1000.0]]), from_logits=True)
    np.testing.assert_allclose(p, [[1.0, 0.0, 0.0]])
    s = to_probabilities(np.array([[-1000.0], [0.0], [1000.0]]), from_logits=True)
    np.testing.assert_allclose(s, [[0.0], [0.5], [1.0]])
    assert np.isfinite(p).all() and np.isfinite(s).all()
    raw = np.array([[0.2, 0.8]])
    np.testing.assert_array_equal(to_probabilities(raw, from_logits=False), raw)


def test_task_and_target_kind_inference() -> None:
    logits = np.zeros((4, 3))
    assert target_kind(np.array([0, 1, 2, 1]), logits) == "sparse"
    assert target_kind(np.arange(10) % 3, logits[:2]) == "sparse"  # outputs of a sample of the inputs
    assert target_kind(np.eye(3)[np.arange(10) % 3], logits[:2]) == "onehot"
    assert target_kind(np.arange(10) % 2, np.zeros((2, 1))) == "binary"
    assert target_kind(np.eye(3)[[0, 1, 2, 1]], logits) == "onehot"
    assert target_kind(np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]]), logits) == "multilabel"
    assert target_kind(np.array([0.0, 1.0, 1.0, 0.0]), np.zeros((4, 1))) == "binary"
    assert target_kind(np.array([0.3, 1.0, 7.5, 0.0]), np.zeros((4, 1))) == "regression"
    assert infer_task(np.array([0, 1, 2, 1]), logits) == "classification"
    assert infer_task(np.array([0, 1, 1, 0]), np.zeros((4, 1))) == "classification"
    assert infer_task(np.array([0.3, 1.0, 7.5, 0.0]), np.zeros((4, 1))) == "regression"
    assert infer_task(np.array([[0.5, 2.0, 1.0]] * 4), logits) == "regression"
    with pytest.raises(ValueError, match="3 classes"):
        target_kind(np.array([0, 1, 3, 1]), logits)


# ---------------------------------------------------------------- regression


def test_regression_metrics_on_diabetes_equal_sklearn() -> None:
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression

    x, y = load_diabetes(return_X_y=True)
    model = LinearRegression().fit(x[:300], y[:300])
    pred = model.predict(x[300:])
    got = regression_metrics(y[300:], pred.reshape(-1, 1))  # (N,) targets vs (N, 1) outputs: no broadcasting
    assert got["mse"] == pytest.approx(skm.mean_squared_error(y[300:], pred))
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y[300:], pred))
    assert got["r2"] == pytest.approx(skm.r2_score(y[300:], pred))
    assert 0.3 < got["r2"] < 0.8  # type: ignore[operator]
    assert json.loads(json.dumps(got)) == got


def test_regression_metrics_multi_output_and_single_sample() -> None:
    y = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    out = np.array([[1.0, 12.0], [2.0, 18.0], [4.0, 30.0]])
    got = regression_metrics(y, out)
    assert got["mse"] == pytest.approx((0 + 4 + 0 + 4 + 1 + 0) / 6)
    assert got["r2"] == pytest.approx(skm.r2_score(y, out))
    assert regression_metrics(np.array([1.0]), np.array([[2.0]])) == {"mse": 1.0, "mae": 1.0, "r2": None}
    with pytest.raises(ValueError):
        regression_metrics(np.zeros(3), np.zeros((3, 2)))


# ---------------------------------------------------------------- latency


def test_interleaved_latency_alternates_and_orders_stats() -> None:
    calls: list[str] = []

    def fast() -> None:
        calls.append("fast")

    def slow() -> None:
        calls.append("slow")
        time.sleep(0.002)

    stats = interleaved_latency({"fast": fast, "slow": slow}, runs=10, warmup=2)
    assert calls == ["fast", "slow"] * 12
    assert set(stats) == {"fast", "slow"}
    for s in stats.values():
        assert set(s) == {"p50", "p95", "mean"}
        assert 0.0 <= s["p50"] <= s["p95"]
    assert stats["slow"]["p50"] >= 2.0  # sleep(0.002) cannot take less
    assert stats["fast"]["p50"] < stats["slow"]["p50"]
    with pytest.raises(ValueError):
        interleaved_latency({"fast": fast}, runs=0)


# ---------------------------------------------------------------- sizes and zips


@pytest.fixture
def model_tree(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "variables").mkdir(parents=True)
    (root / "assets").mkdir()
    (root / "saved_model.pb").write_bytes(b"pb" * 500)
    (root / "variables" / "variables.index").write_bytes(b"i" * 30)
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(bytes(range(256)) * 40)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 10_000)
    (root / "link.bin").symlink_to(outside)
    return root


def test_dir_size_counts_regular_files_only(model_tree: Path) -> None:
    assert dir_size(model_tree) == 1000 + 30 + 256 * 40


def test_zip_round_trips_deterministically(model_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "model.zip"
    out.parent.mkdir()
    size = zip_dir(model_tree, out)
    assert size == out.stat().st_size > 0
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert names == [
            "assets/",
            "saved_model.pb",
            "variables/",
            "variables/variables.data-00000-of-00001",
            "variables/variables.index",
        ]
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in zf.infolist() if not info.is_dir())
        zf.extractall(tmp_path / "unzipped")
    for rel in ("saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001"):
        assert (tmp_path / "unzipped" / rel).read_bytes() == (model_tree / rel).read_bytes()
    assert (tmp_path / "unzipped" / "assets").is_dir()
    assert os.listdir(out.parent) == ["model.zip"]  # no temporary left behind
    # Same content, later mtimes: same bytes.
    os.utime(model_tree / "saved_model.pb", (time.time() + 100, time.time() + 100))
    again = tmp_path / "again.zip"
    zip_dir(model_tree, again)
    assert again.read_bytes() == out.read_bytes()


def test_zip_compresslevel_is_honoured(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    (src / "w.bin").write_bytes(rng.integers(0, 4, size=200_000, dtype=np.uint8).tobytes())
    assert zip_dir(src, tmp_path / "l0.zip", compresslevel=0) > zip_dir(
        src, tmp_path / "l9.zip", compresslevel=9
    )


def test_failed_zip_leaves_nothing_visible(
    model_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def broken_copy(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(size_mod.shutil, "copyfileobj", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        zip_dir(model_tree, out_dir / "model.zip")
    assert os.listdir(out_dir) == []
    with pytest.raises(ValueError, match="inside"):
        zip_dir(model_tree, model_tree / "self.zip")
