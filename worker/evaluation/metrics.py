"""Quality metrics from model outputs and labels (NumPy; scikit-learn for regression; no TensorFlow).

Everything returned is a plain ``float``/``int``/``list`` (or ``None`` when a metric is undefined) so the
metrics JSON can be written as is. ``target_kind`` is the one place that decides what kind of labels these
are; both the task inference here and the loss inference in ``worker.pruning.losses`` use it.

Entry points, from the most to the least automatic:
- ``evaluate_outputs``: a multi-output model; every output that has labels (``y.<output>``, or ``y`` for the
  output plain labels refer to) is evaluated and reported under its name.
- ``evaluate_output``: one output; infers the task and ``from_logits`` when not given.
- ``classification_metrics`` / ``regression_metrics``: the task and ``from_logits`` already decided.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, Literal

import numpy as np
from scipy.special import expit, softmax
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

__all__ = [
    "TOP_K",
    "TargetKind",
    "Task",
    "TaskChoice",
    "class_probabilities",
    "classification_metrics",
    "evaluate_output",
    "evaluate_outputs",
    "infer_from_logits",
    "infer_task",
    "json_safe",
    "labels_for_outputs",
    "looks_like_probabilities",
    "predicted_classes",
    "regression_metrics",
    "target_kind",
    "to_probabilities",
]

TargetKind = Literal["sparse", "onehot", "binary", "multilabel", "regression"]
Task = Literal["classification", "regression"]
TaskChoice = Literal["auto", "classification", "regression"]  # API.md's ``evaluation.task``
TOP_K = 5  # top-k accuracy is reported only when the model outputs more than this many classes


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


def infer_from_logits(y: np.ndarray, output: np.ndarray) -> bool:
    """Whether a classification output holds logits, by the rule ``worker.pruning.losses.infer_loss`` uses.

    Probabilities are values in [0, 1] whose rows sum to ~1 (softmax) for a multi-unit output with class-id
    or one-hot labels; in [0, 1] alone for a single sigmoid unit. Anything else is treated as logits. Kept
    here, without TensorFlow, so evaluation decides exactly like fine-tuning without importing it.
    """
    kind = target_kind(y, output)
    return not looks_like_probabilities(output, rows_sum_to_one=kind in ("sparse", "onehot"))


def to_probabilities(output: np.ndarray, from_logits: bool) -> np.ndarray:
    """Stable softmax over the last axis (multi-unit) or sigmoid (single unit) when ``from_logits``."""
    out = np.asarray(output, dtype=np.float64)
    if not from_logits:
        return out.copy()
    return softmax(out, axis=-1) if _units(out) > 1 else expit(out)


def class_probabilities(output: np.ndarray, from_logits: bool) -> np.ndarray:
    """(N, C) probabilities with rows summing to 1; a single-unit output becomes [1 - p, p].

    Outputs with extra axes (e.g. one prediction per pixel, ``(N, H, W, C)``) become one row per prediction.
    """
    out = np.asarray(output, dtype=np.float64)
    if _units(out) == 1:
        p = np.clip(to_probabilities(out.reshape(-1), from_logits), 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)
    probs = np.clip(to_probabilities(out, from_logits).reshape(-1, out.shape[-1]), 0.0, None)
    sums = probs.sum(axis=1, keepdims=True)
    # float32 softmax outputs rarely sum to exactly 1; all-zero rows become uniform rather than NaN.
    return np.where(sums > 0, probs / np.where(sums > 0, sums, 1.0), 1.0 / probs.shape[1])


def predicted_classes(output: np.ndarray, from_logits: bool) -> np.ndarray:
    """Class ids: argmax of a multi-unit output; ``p > 0.5`` for a single sigmoid unit (Keras' rule)."""
    probs = class_probabilities(output, from_logits)
    if _units(np.asarray(output)) == 1:
        return (probs[:, 1] > 0.5).astype(np.int64)
    return np.argmax(probs, axis=1)


def _labels(y_true: np.ndarray, output: np.ndarray) -> np.ndarray:
    y, out = np.asarray(y_true), np.asarray(output)
    if _units(out) > 1 and y.shape == out.shape:  # one-hot
        return np.argmax(y.reshape(-1, out.shape[-1]), axis=1)
    if not _is_integral(y):
        raise ValueError("classification labels must be integers (or one-hot rows)")
    return np.rint(y).astype(np.int64).reshape(-1)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` per class, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def _top_k_hits(labels: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Whether the true class is among the ``k`` highest scores, ties ranked as scikit-learn's
    ``top_k_accuracy_score`` ranks them (stable ascending sort, reversed: of equal scores the higher class id
    ranks first), without sorting: the true class's rank is the number of classes ranked before it."""
    true_score = probs[np.arange(labels.size), labels][:, None]
    later = np.arange(probs.shape[1])[None, :] > labels[:, None]
    ahead = (probs > true_score) | ((probs == true_score) & later)
    return np.count_nonzero(ahead, axis=1) < k


def classification_metrics(y_true: np.ndarray, output: np.ndarray, from_logits: bool) -> dict[str, Any]:
    """Every classification metric of API.md on one output, from one confusion matrix.

    Keys: ``accuracy``; ``top5_accuracy`` (only when the model outputs more than ``TOP_K`` classes, where it
    says something accuracy does not); ``precision_macro``/``recall_macro``/``f1_macro`` and their
    ``_weighted`` twins (zero_division=0); ``classification_report`` (scikit-learn's ``output_dict``: one entry
    per class id as a string, ``accuracy``, ``macro avg``, ``weighted avg``); ``confusion_matrix`` (rows =
    true class); ``loss`` (log loss).

    A single-unit output is binary: class 1 when its probability is above 0.5 (Keras' binary accuracy rule).
    The top-level macro/weighted scores average over the classes present in labels or predictions
    (scikit-learn's default, which clients already rely on); the report, the confusion matrix and the log loss
    cover every class the model can output, so a class absent from the evaluation data shows support 0 there
    (and pulls the report's ``macro avg`` down, unlike ``f1_macro``).

    Why not scikit-learn's functions: they return exactly these numbers (tests/worker/test_metrics_sklearn.py
    compares them) but each one validates its inputs and recounts the confusion matrix; ten of them took
    longer than the prediction pass on a small model (bench ``datasets``).
    """
    probs = class_probabilities(output, from_logits)
    n_classes = probs.shape[1]
    labels = _labels(y_true, output)
    if labels.size != probs.shape[0]:
        raise ValueError(f"{labels.size} labels for {probs.shape[0]} predictions")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels range from {labels.min()} to {labels.max()} but there are {n_classes} classes"
        )
    if _units(np.asarray(output)) == 1:  # predicted_classes' rule, on the probabilities already computed
        pred = (probs[:, 1] > 0.5).astype(np.int64)
    else:
        pred = np.argmax(probs, axis=1)
    n = labels.size
    matrix = np.bincount(labels * n_classes + pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )
    tp = np.diag(matrix)
    true_sum, pred_sum = matrix.sum(axis=1), matrix.sum(axis=0)
    precision, recall = _divide(tp, pred_sum), _divide(tp, true_sum)
    f1 = _divide(2.0 * tp, true_sum + pred_sum)  # scikit-learn's form: 2 tp / (2 tp + fp + fn)
    correct = int(tp.sum())
    result: dict[str, Any] = {"accuracy": correct / n if n else math.nan}
    if n_classes > TOP_K:
        result[f"top{TOP_K}_accuracy"] = float(np.mean(_top_k_hits(labels, probs, TOP_K)))
    present = (true_sum + pred_sum) > 0  # scikit-learn's default labels: those in y_true or y_pred
    weights = true_sum[present].astype(np.float64)
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        result[f"{name}_macro"] = float(np.mean(values[present]))
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        result[f"{name}_weighted"] = float(np.average(values[present], weights=weights))
    # classification_report(labels=every class, output_dict=True, zero_division=0): its layout and key order
    report: dict[str, Any] = {
        str(c): {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1-score": float(f1[c]),
            "support": float(true_sum[c]),
        }
        for c in range(n_classes)
    }
    support = float(n)
    report["accuracy"] = float(_divide(np.array(correct), np.array(pred_sum.sum())))
    report["macro avg"] = {
        "precision": float(np.mean(precision)),
        "recall": float(np.mean(recall)),
        "f1-score": float(np.mean(f1)),
        "support": support,
    }
    all_weights = true_sum.astype(np.float64)
    report["weighted avg"] = {
        "precision": float(np.average(precision, weights=all_weights)),
        "recall": float(np.average(recall, weights=all_weights)),
        "f1-score": float(np.average(f1, weights=all_weights)),
        "support": support,
    }
    result["classification_report"] = report
    result["confusion_matrix"] = matrix.tolist()
    # log_loss(labels, probs, labels=every class): probabilities clipped to [eps, 1 - eps] of float64
    eps = np.finfo(np.float64).eps
    picked = np.clip(probs[np.arange(n), labels], eps, 1 - eps)
    result["loss"] = float(np.mean(-np.log(picked)))
    return json_safe(result)


def regression_metrics(y_true: np.ndarray, output: np.ndarray) -> dict[str, Any]:
    """mse, mae and r2 (averaged uniformly over output units); r2 is None with fewer than two samples.

    With several target columns (an output of shape ``(N, k)``, k > 1, or more axes flattened per sample)
    ``per_target`` adds the same three metrics per column (scikit-learn's ``multioutput="raw_values"``),
    because a uniform average can hide one badly damaged target.
    """
    out = np.asarray(output, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.float64)
    if y.size != out.size:
        raise ValueError(f"{y.size} targets for {out.size} outputs")
    n = out.shape[0] if out.ndim else 1
    out2 = out.reshape(n, -1)
    y2 = y.reshape(n, -1)
    result: dict[str, Any] = {
        "mse": float(mean_squared_error(y2, out2)),
        "mae": float(mean_absolute_error(y2, out2)),
        "r2": float(r2_score(y2, out2)) if n >= 2 else None,
    }
    if out2.shape[1] > 1:
        result["per_target"] = {
            "mse": mean_squared_error(y2, out2, multioutput="raw_values").tolist(),
            "mae": mean_absolute_error(y2, out2, multioutput="raw_values").tolist(),
            "r2": r2_score(y2, out2, multioutput="raw_values").tolist() if n >= 2 else None,
        }
    return json_safe(result)


def evaluate_output(
    y: np.ndarray, output: np.ndarray, task: TaskChoice = "auto", from_logits: bool | None = None
) -> dict[str, Any]:
    """Metrics of one output against its labels, plus ``task`` (which set of metrics this is).

    ``task="auto"`` infers it from the labels (``infer_task``); ``from_logits=None`` infers it from labels and
    outputs (``infer_from_logits``). ``output`` may hold fewer rows than ``y`` (a signature with a fixed batch
    size scores whole batches only): ``y`` is cut to the outputs' length. Mismatched labels raise ValueError.
    """
    output = np.asarray(output)
    y = np.asarray(y)[: len(output)] if output.ndim else np.asarray(y)
    chosen: Task = infer_task(y, output) if task == "auto" else task
    if chosen == "regression":
        return {"task": chosen, **regression_metrics(y, output)}
    logits = infer_from_logits(y, output) if from_logits is None else from_logits
    return {"task": chosen, **classification_metrics(y, output, logits)}


def labels_for_outputs(
    outputs: Collection[str], arrays: Mapping[str, np.ndarray], selected: str | None = None
) -> dict[str, np.ndarray]:
    """Which label array belongs to which output (API.md's dataset convention).

    ``y.<output>`` labels that output; plain ``y`` labels ``selected`` (the output the pipeline compares labels
    with, ``worker.models.select_output``), or the only output. Outputs without labels are left out; other
    arrays (``x``, ``x.<input>``, ``y.<unknown>``) are ignored.
    """
    names = list(outputs)
    if selected is None and len(names) == 1:
        selected = names[0]
    found: dict[str, np.ndarray] = {}
    for name in sorted(names):
        key = f"y.{name}"
        if key in arrays:
            found[name] = np.asarray(arrays[key])
        elif name == selected and "y" in arrays:
            found[name] = np.asarray(arrays["y"])
    return found


def evaluate_outputs(
    outputs: Mapping[str, np.ndarray],
    arrays: Mapping[str, np.ndarray],
    selected: str | None = None,
    task: TaskChoice = "auto",
    from_logits: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """``{output name: evaluate_output(...)}`` for every output that has labels in ``arrays``, by name.

    ``outputs`` are a signature's predictions by output name; ``arrays`` the dataset (``y`` and/or
    ``y.<output>``; see ``labels_for_outputs``). ``task`` and ``from_logits`` apply to every labelled output;
    ``"auto"``/``None`` decide per output, so a classification head and a regression head of one model each get
    their own metrics. An empty dict means no output has labels. A ValueError names the output it is about.
    """
    result: dict[str, dict[str, Any]] = {}
    for name, y in labels_for_outputs(outputs, arrays, selected).items():
        try:
            result[name] = evaluate_output(y, outputs[name], task, from_logits)
        except ValueError as exc:
            raise ValueError(f"output {name!r}: {exc}") from exc
    return result


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays -> Python numbers/lists, NaN/inf -> None, keys -> str.

    The metrics document is strict JSON (``allow_nan=False``); an undefined metric is ``null``, never NaN.
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value
