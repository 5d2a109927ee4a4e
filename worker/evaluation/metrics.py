"""Quality metrics from model outputs and labels, computed by scikit-learn (no TensorFlow).

Everything returned is a plain ``float``/``int``/``list`` (or ``None`` when a metric is undefined) so the
metrics JSON can be written as is. ``target_kind`` is the one place that decides what kind of labels these
are; both the task inference here and the loss inference in ``worker.pruning.losses`` use it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy.special import expit, softmax
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    r2_score,
    recall_score,
)

__all__ = [
    "TargetKind",
    "classification_metrics",
    "infer_task",
    "looks_like_probabilities",
    "regression_metrics",
    "target_kind",
    "to_probabilities",
]

TargetKind = Literal["sparse", "onehot", "binary", "multilabel", "regression"]
Task = Literal["classification", "regression"]


def _units(output: np.ndarray) -> int:
    return int(output.shape[-1]) if output.ndim >= 2 else 1


def _is_integral(y: np.ndarray) -> bool:
    if y.dtype == bool or np.issubdtype(y.dtype, np.integer):
        return True
    return bool(np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)))


def target_kind(y: np.ndarray, output: np.ndarray) -> TargetKind:
    """Classify the label layout against the model output, comparing per-sample shapes only.

    ``output`` may be a sample (fewer rows than ``y``), e.g. the model run on the first batch.
    - ``sparse``: integral labels shaped like one output without its last axis (or with a trailing 1), and
      a multi-unit output. Labels outside ``0..units-1`` raise ValueError (a mismatched dataset).
    - ``onehot``: 0/1 rows shaped like a multi-unit output, every row summing to 1.
    - ``multilabel``: 0/1 rows shaped like a multi-unit output, rows not all summing to 1.
    - ``binary``: one 0/1 target per sample and a single-unit output.
    - ``regression``: anything else (float targets, or integers that are not valid class labels).
    """
    y, out = np.asarray(y), np.asarray(output)
    if out.ndim == 0 or y.ndim == 0 or y.size == 0:
        raise ValueError("need at least one sample and a non-scalar output to infer the target kind")
    units = _units(out)
    y_item, out_item = y.shape[1:], out.shape[1:]
    integral = _is_integral(y)
    zero_one = integral and bool(np.all((y == 0) | (y == 1)))
    if units > 1 and integral and y_item in (out_item[:-1], (*out_item[:-1], 1)):
        lo, hi = int(np.min(y)), int(np.max(y))
        if lo < 0 or hi >= units:
            raise ValueError(f"labels range from {lo} to {hi} but the model outputs {units} classes")
        return "sparse"
    if units > 1 and zero_one and y_item == out_item:
        return "onehot" if bool(np.all(np.sum(y, axis=-1) == 1)) else "multilabel"
    if units == 1 and zero_one and math.prod(y_item) == 1 and math.prod(out_item) == 1:
        return "binary"
    return "regression"


def looks_like_probabilities(output: np.ndarray, rows_sum_to_one: bool = True) -> bool:
    """All values in [0, 1] (and multi-unit rows summing to ~1 when asked): a sigmoid/softmax output."""
    out = np.asarray(output, dtype=np.float64)
    if out.size == 0 or not np.all(np.isfinite(out)):
        return False
    if np.min(out) < -1e-6 or np.max(out) > 1 + 1e-6:
        return False
    if rows_sum_to_one and _units(out) > 1:
        return bool(np.allclose(np.sum(out, axis=-1), 1.0, atol=1e-3))
    return True


def infer_task(y: np.ndarray, output: np.ndarray) -> Task:
    """``classification`` for class labels (integer, one-hot, or binary 0/1), else ``regression``.

    Multi-label 0/1 targets are scored as regression for now (mse over probabilities is the Brier score):
    the classification metrics below assume one class per sample.
    """
    return "classification" if target_kind(y, output) in ("sparse", "onehot", "binary") else "regression"


def to_probabilities(output: np.ndarray, from_logits: bool) -> np.ndarray:
    """Stable softmax over the last axis (multi-unit) or sigmoid (single unit) when ``from_logits``."""
    out = np.asarray(output, dtype=np.float64)
    if not from_logits:
        return out.copy()
    return softmax(out, axis=-1) if _units(out) > 1 else expit(out)


def _class_probabilities(output: np.ndarray, from_logits: bool) -> np.ndarray:
    """(N, C) probabilities with rows summing to 1; a single-unit output becomes [1 - p, p]."""
    out = np.asarray(output, dtype=np.float64)
    if _units(out) == 1:
        p = np.clip(to_probabilities(out.reshape(-1), from_logits), 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)
    probs = np.clip(to_probabilities(out, from_logits).reshape(-1, out.shape[-1]), 0.0, None)
    sums = probs.sum(axis=1, keepdims=True)
    # float32 softmax outputs rarely sum to exactly 1; all-zero rows become uniform rather than NaN.
    return np.where(sums > 0, probs / np.where(sums > 0, sums, 1.0), 1.0 / probs.shape[1])


def _labels(y_true: np.ndarray, output: np.ndarray) -> np.ndarray:
    y, out = np.asarray(y_true), np.asarray(output)
    if _units(out) > 1 and y.shape == out.shape:  # one-hot
        return np.argmax(y.reshape(-1, out.shape[-1]), axis=1)
    if not _is_integral(y):
        raise ValueError("classification labels must be integers (or one-hot rows)")
    return np.rint(y).astype(np.int64).reshape(-1)


def classification_metrics(y_true: np.ndarray, output: np.ndarray, from_logits: bool) -> dict[str, object]:
    """accuracy, macro precision/recall/F1 (zero_division=0), confusion matrix over all classes, log loss.

    A single-unit output is binary: class 1 when its probability is above 0.5 (Keras' binary accuracy rule).
    Macro scores average over the classes present in labels or predictions (scikit-learn's default); the
    confusion matrix and the log loss use every class the model can output.
    """
    probs = _class_probabilities(output, from_logits)
    n_classes = probs.shape[1]
    labels = _labels(y_true, output)
    if labels.size != probs.shape[0]:
        raise ValueError(f"{labels.size} labels for {probs.shape[0]} predictions")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels range from {labels.min()} to {labels.max()} but there are {n_classes} classes"
        )
    pred = (
        (probs[:, 1] > 0.5).astype(np.int64) if _units(np.asarray(output)) == 1 else np.argmax(probs, axis=1)
    )
    classes = list(range(n_classes))
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "precision_macro": float(precision_score(labels, pred, average="macro", zero_division=0)),
        "recall_macro": float(recall_score(labels, pred, average="macro", zero_division=0)),
        "f1_macro": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "confusion_matrix": confusion_matrix(labels, pred, labels=classes).tolist(),
        "loss": float(log_loss(labels, probs, labels=classes)),
    }


def regression_metrics(y_true: np.ndarray, output: np.ndarray) -> dict[str, float | None]:
    """mse, mae and r2 (averaged uniformly over output units); r2 is None with fewer than two samples."""
    out = np.asarray(output, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.float64)
    if y.size != out.size:
        raise ValueError(f"{y.size} targets for {out.size} outputs")
    n = out.shape[0] if out.ndim else 1
    out2 = out.reshape(n, -1)
    y2 = y.reshape(n, -1)
    return {
        "mse": float(mean_squared_error(y2, out2)),
        "mae": float(mean_absolute_error(y2, out2)),
        "r2": float(r2_score(y2, out2)) if n >= 2 else None,
    }
