"""``classification_metrics`` (one confusion matrix + NumPy) against scikit-learn's own functions, called as the
metrics module called them before: the same keys, order and numbers to 1e-12 on many random cases (absent
classes, binary single-unit outputs, one class, perfect predictions, one sample, ties in the scores)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from worker.evaluation.metrics import (
    TOP_K,
    class_probabilities,
    classification_metrics,
    json_safe,
    predicted_classes,
)


def sklearn_reference(y: np.ndarray, output: np.ndarray, from_logits: bool) -> dict[str, Any]:
    """The former implementation: one scikit-learn call per metric."""
    probs = class_probabilities(output, from_logits)
    classes = list(range(probs.shape[1]))
    labels = np.rint(np.asarray(y)).astype(np.int64).reshape(-1)
    pred = predicted_classes(output, from_logits)
    result: dict[str, Any] = {"accuracy": float(skm.accuracy_score(labels, pred))}
    if len(classes) > TOP_K:
        result[f"top{TOP_K}_accuracy"] = float(
            skm.top_k_accuracy_score(labels, probs, k=TOP_K, labels=classes)
        )
    for average in ("macro", "weighted"):
        kw: dict[str, Any] = {"average": average, "zero_division": 0}
        result[f"precision_{average}"] = float(skm.precision_score(labels, pred, **kw))
        result[f"recall_{average}"] = float(skm.recall_score(labels, pred, **kw))
        result[f"f1_{average}"] = float(skm.f1_score(labels, pred, **kw))
    result["classification_report"] = skm.classification_report(
        labels, pred, labels=classes, output_dict=True, zero_division=0
    )
    result["confusion_matrix"] = skm.confusion_matrix(labels, pred, labels=classes).tolist()
    result["loss"] = float(skm.log_loss(labels, y_proba=probs, labels=classes))
    return json_safe(result)


def assert_same(ours: Any, ref: Any, path: str = "") -> None:
    """Equal structure and key order; numbers within 1e-12; ints stay ints."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict), path
        assert list(ours) == list(ref), path
        for key in ref:
            assert_same(ours[key], ref[key], f"{path}.{key}")
    elif isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref), path
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ref, float):
        assert isinstance(ours, float), path
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-12), path
    else:
        assert type(ours) is type(ref) and ours == ref, path


def random_case(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(labels, model output, from_logits) of one shape of problem."""
    n = int(rng.choice([1, 2, 7, 50, 400]))
    if kind == "binary":  # a single sigmoid unit, probabilities or logits
        logits = bool(rng.integers(2))
        out = rng.normal(0, 2, (n, 1)) if logits else rng.random((n, 1))
        return rng.integers(0, 2, n), out.astype(np.float32), logits
    c = int(rng.choice([2, 3, 6, 10, 13]))
    present = rng.choice(c, size=int(rng.integers(1, c + 1)), replace=False)  # some classes absent
    y = rng.choice(present, n)
    logits = rng.normal(0, 2, (n, c))
    if kind == "perfect":
        logits[np.arange(n), y] += 50
    elif kind == "ties":  # coarse scores: equal values rank as scikit-learn's stable sort ranks them
        logits = np.round(logits)
    elif kind == "one_class":
        y = np.full(n, int(present[0]))
    from_logits = bool(rng.integers(2))
    if from_logits:
        return y, logits.astype(np.float32), True
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs.astype(np.float32), False


@pytest.mark.parametrize("kind", ["multiclass", "binary", "perfect", "ties", "one_class"])
def test_classification_metrics_match_sklearn(kind: str) -> None:
    rng = np.random.default_rng(["multiclass", "binary", "perfect", "ties", "one_class"].index(kind))
    for _ in range(60):
        y, out, from_logits = random_case(rng, kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's k >= n_classes and y_prob-sum warnings
            ref = sklearn_reference(y, out, from_logits)
        assert_same(classification_metrics(y, out, from_logits), ref)


def test_saturated_probabilities_clip_like_sklearn() -> None:
    """Probabilities of exactly 0 and 1: the log loss clips to [eps, 1 - eps] as scikit-learn does."""
    y = np.array([0, 1, 2, 2])
    out = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float32)
    assert_same(classification_metrics(y, out, False), sklearn_reference(y, out, False))
    binary = np.array([[0.0], [1.0], [1.0], [0.5]], dtype=np.float32)
    yb = np.array([1, 1, 0, 1])
    assert_same(classification_metrics(yb, binary, False), sklearn_reference(yb, binary, False))
