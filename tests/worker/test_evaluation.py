"""Metrics (against scikit-learn called directly), task inference, multi-output evaluation, latency, sizes/zips,
parameter counts, and the metrics document schema. No TensorFlow except the schema test on a real pipeline run
(marked ``tf``)."""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn import metrics as skm

from worker.evaluation import size as size_mod
from worker.evaluation.latency import interleaved_latency, latency_table
from worker.evaluation.metrics import (
    classification_metrics,
    evaluate_output,
    evaluate_outputs,
    infer_from_logits,
    infer_task,
    json_safe,
    labels_for_outputs,
    regression_metrics,
    target_kind,
    to_probabilities,
)
from worker.evaluation.size import dir_size, param_counts, zip_dir

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


# ---------------------------------------------------------------- a scikit-learn model's outputs as "model output"


@pytest.fixture(scope="module")
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    return x_tr, x_te, y_tr, y_te


@pytest.fixture(scope="module")
def digits_lr(
    digits_split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predict_proba, decision_function) of a deliberately weak classifier: errors in top-1 and top-5."""
    from sklearn.linear_model import LogisticRegression

    x_tr, x_te, y_tr, y_te = digits_split
    clf = LogisticRegression(max_iter=500, C=0.001).fit(x_tr, y_tr)
    return y_te, clf.predict_proba(x_te), clf.decision_function(x_te)


def _sklearn_classification(labels: np.ndarray, probs: np.ndarray, pred: np.ndarray) -> dict[str, object]:
    classes = list(range(probs.shape[1]))
    expected: dict[str, object] = {
        "accuracy": skm.accuracy_score(labels, pred),
        "confusion_matrix": skm.confusion_matrix(labels, pred, labels=classes).tolist(),
        "loss": skm.log_loss(labels, probs, labels=classes),
        "classification_report": skm.classification_report(
            labels, pred, labels=classes, output_dict=True, zero_division=0
        ),
    }
    for average in ("macro", "weighted"):
        expected[f"precision_{average}"] = skm.precision_score(labels, pred, average=average, zero_division=0)
        expected[f"recall_{average}"] = skm.recall_score(labels, pred, average=average, zero_division=0)
        expected[f"f1_{average}"] = skm.f1_score(labels, pred, average=average, zero_division=0)
    return expected


def test_digits_classification_equals_sklearn(digits_lr: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    labels, probs, _ = digits_lr
    got = classification_metrics(labels, probs, from_logits=False)
    expected = _sklearn_classification(labels, probs, probs.argmax(axis=1))
    expected["top5_accuracy"] = skm.top_k_accuracy_score(labels, probs, k=5, labels=list(range(10)))
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert got[key] == value, key
    # The weak model errs in both, so neither number can come out right by accident.
    assert got["accuracy"] < got["top5_accuracy"] < 1.0
    assert sorted(k for k in got["classification_report"] if k.isdigit()) == [str(c) for c in range(10)]
    assert json.loads(json.dumps(got, allow_nan=False)) == got


def test_weighted_averages_differ_from_macro_on_imbalanced_labels(
    digits_lr: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    labels, probs, _ = digits_lr
    keep = np.concatenate([np.flatnonzero(labels == c)[: 3 if c < 5 else None] for c in range(10)])
    y, p = labels[keep], probs[keep]
    pred = p.argmax(axis=1)
    got = classification_metrics(y, p, from_logits=False)
    for metric, fn in (
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
        ("f1", skm.f1_score),
    ):
        weighted = fn(y, pred, average="weighted", zero_division=0)
        assert got[f"{metric}_weighted"] == pytest.approx(weighted)
        assert got[f"{metric}_macro"] == pytest.approx(fn(y, pred, average="macro", zero_division=0))
    assert got["f1_weighted"] != pytest.approx(got["f1_macro"], abs=1e-3)


def test_logits_and_probabilities_give_the_same_metrics(
    digits_lr: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    labels, probs, logits = digits_lr  # softmax(decision_function) == predict_proba for this model
    assert infer_from_logits(labels, probs) is False
    assert infer_from_logits(labels, logits) is True
    from_probs = evaluate_output(labels, probs)
    from_logits = evaluate_output(labels, logits)  # from_logits inferred
    assert from_probs["task"] == from_logits["task"] == "classification"
    assert from_logits["confusion_matrix"] == from_probs["confusion_matrix"]
    assert from_logits["loss"] == pytest.approx(from_probs["loss"], rel=1e-9)
    assert from_logits["top5_accuracy"] == from_probs["top5_accuracy"]
    # Forcing the wrong reading changes the loss: the flag is really used.
    assert evaluate_output(labels, probs, from_logits=True)["loss"] > from_probs["loss"] + 0.1


def test_binary_sigmoid_output_equals_sklearn(
    digits_split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    from sklearn.linear_model import LogisticRegression

    x_tr, x_te, y_tr, y_te = digits_split
    clf = LogisticRegression(max_iter=500).fit(x_tr, y_tr == 3)
    labels = (y_te == 3).astype(np.int64)
    p = clf.predict_proba(x_te)[:, 1].reshape(-1, 1)  # a single sigmoid unit
    pred = (p[:, 0] > 0.5).astype(np.int64)
    got = evaluate_output(labels, p)
    expected = _sklearn_classification(labels, np.column_stack([1 - p[:, 0], p[:, 0]]), pred)
    assert got["task"] == "classification" and "top5_accuracy" not in got
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
    assert 0 < got["confusion_matrix"][1][1] < int(labels.sum())  # finds some 3s, misses some
    logits = clf.decision_function(x_te).reshape(-1, 1)
    assert infer_from_logits(labels, logits) is True
    assert evaluate_output(labels, logits)["confusion_matrix"] == got["confusion_matrix"]


def test_multi_output_evaluates_each_labelled_output_by_name(
    digits_split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    digits_lr: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    from sklearn.linear_model import LinearRegression

    x_tr, x_te, _, _ = digits_split
    labels, probs, logits = digits_lr
    ink = LinearRegression().fit(x_tr[:, :32], x_tr.sum(axis=1)).predict(x_te[:, :32])
    outputs = {"digit": probs, "logits": logits, "ink": ink.reshape(-1, 1), "embedding": x_te[:, :4]}
    arrays = {"x": x_te, "y": labels, "y.ink": x_te.sum(axis=1), "y.unknown": labels}
    got = evaluate_outputs(outputs, arrays, selected="digit")
    assert list(got) == ["digit", "ink"]  # "logits"/"embedding" have no labels; plain y labels "digit" only
    assert got["digit"] == evaluate_output(labels, probs)
    assert got["ink"]["task"] == "regression"
    assert got["ink"]["r2"] == pytest.approx(skm.r2_score(x_te.sum(axis=1), ink))
    assert got["ink"]["mae"] == pytest.approx(skm.mean_absolute_error(x_te.sum(axis=1), ink))
    # y.<output> labels that output even when another is selected; a forced task applies to every output.
    both = evaluate_outputs(outputs, {**arrays, "y.logits": labels}, selected="digit")
    assert list(both) == ["digit", "ink", "logits"]
    assert both["logits"]["accuracy"] == both["digit"]["accuracy"]
    with pytest.raises(ValueError, match="output 'digit'"):  # 10 class scores vs one target per sample
        evaluate_outputs(outputs, arrays, selected="digit", task="regression")
    assert json.loads(json.dumps(got, allow_nan=False)) == got


def test_labels_for_outputs_follows_the_dataset_convention() -> None:
    y, named = np.arange(3), np.arange(3) + 10
    assert list(labels_for_outputs(["out"], {"y": y})) == ["out"]  # the only output takes plain y
    assert labels_for_outputs(["a", "b"], {"y": y}) == {}  # ambiguous without a selected output
    picked = labels_for_outputs(["a", "b"], {"y": y, "y.b": named}, selected="a")
    assert set(picked) == {"a", "b"}
    np.testing.assert_array_equal(picked["a"], y)
    np.testing.assert_array_equal(picked["b"], named)
    only_named = labels_for_outputs(["a", "b"], {"y.b": named}, selected="a")
    assert list(only_named) == ["b"]


def test_multi_output_errors_name_the_output() -> None:
    with pytest.raises(ValueError, match=r"output 'head'.*classes"):
        evaluate_outputs({"head": np.zeros((2, 3))}, {"y": np.array([0, 7])}, task="classification")


def test_json_safe_turns_numpy_and_non_finite_into_plain_json() -> None:
    value = {
        1: np.float32("nan"),
        "a": (np.int64(3), np.float64(np.inf), np.bool_(True)),
        "b": np.array([[1.5, -np.inf]]),
        "c": {"d": None, "e": "text", "f": 2},
    }
    safe = json_safe(value)
    assert safe == {
        "1": None,
        "a": [3, None, True],
        "b": [[1.5, None]],
        "c": {"d": None, "e": "text", "f": 2},
    }
    assert type(safe["a"][0]) is int and type(safe["a"][2]) is bool
    json.dumps(safe, allow_nan=False)


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


def test_regression_per_target_on_diabetes_equals_sklearn() -> None:
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression

    x, y = load_diabetes(return_X_y=True)
    targets = np.column_stack([y, x[:, 2] * 100.0])  # disease progression and BMI (scaled), from the rest
    features = np.delete(x, 2, axis=1)
    pred = LinearRegression().fit(features[:300], targets[:300]).predict(features[300:])
    got = evaluate_output(targets[300:], pred, task="regression")
    truth = targets[300:]
    assert got["task"] == "regression"
    assert got["mse"] == pytest.approx(skm.mean_squared_error(truth, pred))
    assert got["r2"] == pytest.approx(skm.r2_score(truth, pred))
    for name, fn in (
        ("mse", skm.mean_squared_error),
        ("mae", skm.mean_absolute_error),
        ("r2", skm.r2_score),
    ):
        np.testing.assert_allclose(got["per_target"][name], fn(truth, pred, multioutput="raw_values"))
    assert got["per_target"]["r2"][0] != pytest.approx(got["per_target"]["r2"][1], abs=0.01)
    assert "per_target" not in regression_metrics(y[:5], y[:5].reshape(-1, 1))
    assert (
        evaluate_output(np.linspace(0, 1, 10), np.linspace(0, 1, 10).reshape(-1, 1))["task"] == "regression"
    )


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


def test_samples_per_second_is_batch_over_mean_latency() -> None:
    def slow() -> None:
        time.sleep(0.002)

    stats = interleaved_latency({"slow": slow}, runs=5, warmup=0, batch_size=8)["slow"]
    assert set(stats) == {"p50", "p95", "mean", "samples_per_s"}
    assert stats["samples_per_s"] == pytest.approx(8 * 1000.0 / stats["mean"])
    assert stats["samples_per_s"] <= 8 / 0.002  # a call cannot beat its sleep
    with pytest.raises(ValueError, match="batch_size"):
        interleaved_latency({"slow": slow}, runs=1, batch_size=0)


def test_latency_table_interleaves_per_batch_size_in_ascending_order() -> None:
    calls: list[tuple[str, int]] = []

    def call(name: str, batch: int) -> Callable[[], None]:
        return lambda: calls.append((name, batch))

    fns = {batch: {"baseline": call("baseline", batch), "pruned": call("pruned", batch)} for batch in (32, 1)}
    table = latency_table(fns, runs=3, warmup=1)
    assert calls == [("baseline", 1), ("pruned", 1)] * 4 + [("baseline", 32), ("pruned", 32)] * 4
    assert set(table) == {"baseline", "pruned"}
    for per_batch in table.values():
        assert list(per_batch) == ["1", "32"]
        for batch, stats in per_batch.items():
            assert set(stats) == {"p50", "p95", "mean", "samples_per_s"}
            if stats["mean"] > 0:
                assert stats["samples_per_s"] == pytest.approx(int(batch) * 1000.0 / stats["mean"])


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

    def broken_write(src_dir: Path, fileobj: Any, *args: object) -> None:
        fileobj.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(size_mod, "write_zip", broken_write)
    with pytest.raises(OSError, match="disk full"):
        zip_dir(model_tree, out_dir / "model.zip")
    assert os.listdir(out_dir) == []
    with pytest.raises(ValueError, match="inside"):
        zip_dir(model_tree, model_tree / "self.zip")


# ---------------------------------------------------------------- parameter counts


def test_param_counts_from_variable_values() -> None:
    arrays = {
        "dense/kernel": np.array([[0.0, 1.0], [2.0, 0.0]]),
        "dense/bias": np.array([0.0, 3.0]),
        "conv/kernel": np.ones((2, 2, 1, 2)),
    }
    got = param_counts(arrays, ["dense/kernel", "conv/kernel"])
    assert got["params"] == {"total": 4 + 2 + 8, "prunable": 12, "nonzero": 2 + 1 + 8}
    assert got["sparsity"] == pytest.approx(2 / 12)
    assert got["nonzero_by_name"] == {"dense/kernel": 2, "dense/bias": 1, "conv/kernel": 8}
    assert param_counts(arrays, [])["sparsity"] == 0.0
    with pytest.raises(ValueError, match="missing/kernel"):
        param_counts(arrays, ["missing/kernel"])


# ---------------------------------------------------------------- the metrics document schema


def _side(metrics: object) -> dict[str, object]:
    return {
        "metrics": metrics,
        "params": {"total": 100, "prunable": 80, "nonzero": 60},
        "sparsity": 0.25,
        "size_bytes": {"saved_model": 4000, "zip": 1500},
        "latency_ms": {"1": {"p50": 0.5, "p95": 0.7}},
    }


def _document(metrics: object = None) -> dict[str, object]:
    """The smallest document API.md allows (no labels: metrics null)."""
    return {
        "job_id": "j1",
        "model_id": "m1",
        "spec": {"target_sparsity": 0.5},
        "baseline": _side(metrics),
        "pruned": _side(metrics),
        "delta": {},
        "layers": [{"name": "dense/kernel", "shape": [8, 10], "params": 80, "sparsity": 0.25}],
        "timings_s": {
            k: 0.1 for k in ("load", "baseline", "prune", "fine_tune", "evaluate", "save", "total")
        },
        "notes": [],
        "versions": {"secateurs": "0.1.0", "tensorflow": "2.21.0"},
    }


def test_schema_accepts_everything_the_evaluation_library_produces(
    digits_lr: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    from app.schemas.metrics import ClassificationMetrics, Fidelity, Macs, MetricsDocument, RegressionMetrics
    from worker.evaluation.crossval import cross_validation_report, plan_folds
    from worker.evaluation.fidelity import fidelity, fidelity_by_output
    from worker.evaluation.flops import estimate_flops, flops_totals

    labels, probs, logits = digits_lr
    flat = evaluate_output(labels, probs)
    per_output = evaluate_outputs(
        {"probs": probs, "score": probs[:, :1]}, {"y": labels, "y.score": probs[:, 0]}, selected="probs"
    )
    doc = _document(flat)
    doc["pruned"] = {
        **_side(per_output),
        "fidelity": fidelity(probs, softmax(logits * 0.9, axis=1)),
        "latency_ms": latency_table({1: {"pruned": lambda: None}, 8: {"pruned": lambda: None}}, runs=2)[
            "pruned"
        ],
    }
    rows = estimate_flops([{"name": "dense/kernel", "shape": [64, 10]}], {"dense/kernel": 320})
    doc["layers"] = [{**row, "sparsity": 0.5, "target": 0.5} for row in rows]
    doc["pruned"]["metrics_by_output"] = per_output  # type: ignore[index]
    doc["pruned"]["fidelity_by_output"] = fidelity_by_output(  # type: ignore[index]
        {"probs": probs, "score": probs[:, :1]}, {"probs": probs, "score": probs[:, :1] * 0.5}
    )
    doc["pruned"]["macs"] = flops_totals(rows)  # type: ignore[index]
    plan = plan_folds(labels, len(labels), 2, "classification", seed=0)
    doc["cross_validation"] = cross_validation_report(
        plan,
        [{"baseline": evaluate_output(labels[test], probs[test]), "pruned": None} for _, test in plan.folds],
    )
    doc["flops"] = {"dense_macs": 640}  # a section added later: growth is allowed
    parsed = MetricsDocument.model_validate(json.loads(json.dumps(doc, allow_nan=False)))
    assert isinstance(parsed.baseline.metrics, ClassificationMetrics)
    assert isinstance(parsed.pruned.metrics, dict)
    assert isinstance(parsed.pruned.metrics["score"], RegressionMetrics)
    assert parsed.pruned.latency_ms["8"].samples_per_s > 0  # type: ignore[operator]
    assert parsed.model_dump()["flops"] == {"dense_macs": 640}
    assert isinstance(parsed.pruned.macs, Macs) and parsed.pruned.macs.effective_fraction == 0.5
    assert isinstance(parsed.pruned.fidelity, Fidelity)
    assert set(parsed.pruned.fidelity_by_output or {}) == {"probs", "score"}
    assert isinstance((parsed.pruned.metrics_by_output or {})["probs"], ClassificationMetrics)
    # Per-output fidelity and regression metrics fit too.
    doc["pruned"]["fidelity"] = fidelity_by_output({"probs": probs}, {"probs": probs})  # type: ignore[index]
    doc["baseline"] = _side(evaluate_output(np.linspace(0, 1, 20), np.linspace(0, 1, 20)))
    MetricsDocument.model_validate(doc)


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("baseline",), None, "baseline"),  # None here means: remove the key
        (("pruned", "params", "nonzero"), None, "nonzero"),
        (("versions", "tensorflow"), None, "tensorflow"),
        (("baseline", "latency_ms"), {"one": {"p50": 1.0, "p95": 1.0}}, "latency_ms"),
        (("baseline", "metrics"), {"accuracy": 1.5}, "metrics"),
        (("pruned", "sparsity"), 1.2, "sparsity"),
        (("layers",), [{"name": "w", "shape": [2]}], "layers"),
    ],
)
def test_schema_refuses_documents_missing_or_breaking_required_keys(
    path: tuple[str, ...], value: object, where: str
) -> None:
    from pydantic import ValidationError

    from app.schemas.metrics import MetricsDocument

    doc = _document()
    MetricsDocument.model_validate(doc)  # the untouched document is valid
    parent: dict = doc
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with pytest.raises(ValidationError, match=where):
        MetricsDocument.model_validate(doc)


def test_published_json_schema_requires_api_keys() -> None:
    from app.schemas.metrics import metrics_json_schema

    schema = metrics_json_schema()
    assert set(schema["required"]) == {
        "job_id", "model_id", "spec", "baseline", "pruned", "delta", "layers", "timings_s", "notes", "versions"
    }  # fmt: skip
    side = schema["$defs"]["Side"]
    assert set(side["required"]) == {"metrics", "params", "sparsity", "size_bytes", "latency_ms"}
    assert schema["$defs"]["PrunedSide"]["properties"]["fidelity"]
    assert set(schema["$defs"]["ClassificationMetrics"]["required"]) == {
        "accuracy", "precision_macro", "recall_macro", "f1_macro", "confusion_matrix", "loss"
    }  # fmt: skip
    assert schema["additionalProperties"] is True  # the document grows by adding fields
    json.dumps(schema)


@pytest.mark.tf
def test_a_real_pipeline_document_validates(tf_module_dir: Path, digits_flat: tuple, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from app.schemas.metrics import ClassificationMetrics, MetricsDocument
    from app.schemas.spec import PruneSpec
    from worker.pipeline import run_pipeline

    spec = PruneSpec.model_validate(
        {"target_sparsity": 0.5, "evaluation": {"latency": {"batch_sizes": [1, 4], "runs": 2}}}
    )
    _, test = digits_flat
    metrics = run_pipeline(tf_module_dir, spec, None, test, tmp_path, lambda stage, progress: None)
    document = json.loads(json.dumps({"job_id": "j", "model_id": "m", **metrics}, allow_nan=False))
    parsed = MetricsDocument.model_validate(document)
    assert isinstance(parsed.baseline.metrics, ClassificationMetrics)
    assert parsed.pruned.sparsity == pytest.approx(0.5, abs=0.01)
    assert set(parsed.pruned.latency_ms) == {"1", "4"}
    del document["baseline"]
    with pytest.raises(ValidationError, match="baseline"):
        MetricsDocument.model_validate(document)


def test_evaluation_library_and_schema_import_no_heavy_dependencies() -> None:
    """The library runs in any process (API included): importing it must not pull TensorFlow or the service."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import app.schemas.metrics\n"
        "from worker.evaluation import crossval, fidelity, flops, latency, metrics, size, zip_size\n"
        "banned = ('tensorflow', 'keras', 'celery', 'fastapi', 'sqlalchemy', 'app.db')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned or m.startswith('app.db')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
