"""K-fold cross-validation: which samples each fold trains and tests on, and mean +- std over the folds.

One held-out split says little on small datasets (the digits test set has 450 samples: one sample is 0.2%
accuracy). K folds give every sample one turn in a test set and a spread to judge differences by. This module
only plans folds and summarises per-fold metrics; the pipeline prunes (and fine-tunes) once per fold.

Stratification: for classification, ``StratifiedKFold`` keeps every class's share of each test fold within one
sample of its share of the data, so a fold never tests on a skewed class mix. When some class has fewer than
``k`` members that guarantee cannot hold (some folds lack the class entirely; scikit-learn only warns), so the
plan falls back to plain shuffled ``KFold`` and says why in ``FoldPlan.note``. Regression targets and
datasets without labels always use ``KFold``. Both shuffle with ``seed``: the same seed gives the same folds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from worker.evaluation.metrics import TaskChoice

__all__ = [
    "MAX_FOLDS",
    "MIN_FOLDS",
    "FoldPlan",
    "cross_validation_report",
    "fold_indices",
    "plan_folds",
    "summarize_folds",
]

MIN_FOLDS, MAX_FOLDS = 2, 10  # API.md: evaluation.cross_validation.folds is 2..10

Folds = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class FoldPlan:
    """``folds``: (train indices, test indices) per fold, each sorted; ``note``: why not stratified, if so."""

    folds: Folds
    stratified: bool
    note: str | None = None


def _class_ids(y: np.ndarray, n: int) -> np.ndarray:
    """One class id per sample: one-hot rows -> argmax; ``(n,)`` or ``(n, 1)`` ids/0-1 targets as they are."""
    y = np.asarray(y)
    if y.ndim >= 2 and math.prod(y.shape[1:]) > 1:
        return np.argmax(y.reshape(n, -1), axis=1)
    return y.reshape(n)


def plan_folds(
    y: np.ndarray | None, n: int, k: int, task: TaskChoice | None = "classification", seed: int = 0
) -> FoldPlan:
    """Plan ``k`` shuffled folds over ``n`` samples; stratified by ``y`` when ``task`` is classification.

    ``task`` is the decided task (``"auto"`` and ``None`` are treated as "no class structure known" and use
    plain KFold: decide the task from the labels first, e.g. with ``infer_task``). Raises ValueError unless
    ``2 <= k <= 10`` and ``k <= n``, or when ``y`` does not have ``n`` rows.
    """
    if not MIN_FOLDS <= k <= MAX_FOLDS:
        raise ValueError(f"folds must be between {MIN_FOLDS} and {MAX_FOLDS}, got {k}")
    if k > n:
        raise ValueError(f"{k} folds need at least {k} samples, got {n}")
    if y is not None and (np.asarray(y).ndim == 0 or len(y) != n):
        raise ValueError(f"labels have {np.shape(y)} rows for {n} samples")
    placeholder = np.zeros((n, 1))  # scikit-learn's splitters only read len(X)
    note = None
    if task == "classification" and y is not None:
        classes = _class_ids(y, n)
        values, counts = np.unique(classes, return_counts=True)
        if counts.min() >= k:
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
            return FoldPlan(_sorted(splitter.split(placeholder, classes)), stratified=True)
        rare = [v.item() for v, c in zip(values, counts, strict=True) if c < k]
        shown = f"{rare}" if len(rare) <= 10 else f"{rare[:10]} and {len(rare) - 10} more"
        note = (
            f"cross-validation folds are not stratified: classes {shown} have fewer than {k} samples, so "
            "stratified folds could not each hold every class; plain shuffled K-fold was used"
        )
    splitter_plain = KFold(n_splits=k, shuffle=True, random_state=seed)
    return FoldPlan(_sorted(splitter_plain.split(placeholder)), stratified=False, note=note)


def _sorted(splits: Any) -> Folds:
    """Sorted indices: slicing the dataset in order keeps memory access (and batch composition) predictable."""
    return [(np.sort(train), np.sort(test)) for train, test in splits]


def fold_indices(
    y: np.ndarray | None, n: int, k: int, task: TaskChoice | None = "classification", seed: int = 0
) -> Folds:
    """``[(train_idx, test_idx), ...]`` of ``plan_folds`` (use ``plan_folds`` to also get the fallback note)."""
    return plan_folds(y, n, k, task, seed).folds


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def summarize_folds(per_fold: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{key: {"mean", "std"}}`` for every key whose value is a finite number in EVERY fold, nested alike.

    Nested dicts (per-output metrics, the classification report) are summarised key by key and keep their
    nesting. Lists (confusion matrices, per-target lists), strings (``task``) and keys that are missing or
    None in some fold are left out: a mean over some folds only would not be comparable to the others.
    ``std`` is the population standard deviation (``ddof=0``), the convention of scikit-learn's
    cross-validation examples (``scores.std()``); with k folds the sample std is ``std * sqrt(k / (k - 1))``.
    """
    if not per_fold:
        raise ValueError("no folds to summarise")
    summary: dict[str, Any] = {}
    for key, first in per_fold[0].items():
        values = [fold.get(key) for fold in per_fold]
        if all(_is_number(v) for v in values):
            arr = np.asarray(values, dtype=np.float64)
            summary[key] = {"mean": float(np.mean(arr)), "std": float(np.std(arr, ddof=0))}
        elif isinstance(first, Mapping) and all(isinstance(v, Mapping) for v in values):
            nested = summarize_folds(values)  # type: ignore[arg-type]
            if nested:
                summary[key] = nested
    return summary


def cross_validation_report(
    plan: FoldPlan,
    per_fold: Sequence[Mapping[str, Any]],
    sizes: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """The metrics document's ``cross_validation`` section.

    ``per_fold``: one dict per fold, in fold order, holding at least ``baseline`` and ``pruned`` metrics (dict or
    None); anything else in it (e.g. ``fidelity``, ``sparsity``) is summarised too when numeric. Returns
    ``{"folds", "stratified", "note"?, "per_fold" (with "fold", "n_train", "n_test" added), "summary"}`` where
    ``summary`` is ``summarize_folds`` over the per-fold entries (``summary["pruned"]["accuracy"]["mean"]``).
    ``sizes``: ``(n_train, n_test)`` per fold when the folds are not index arrays (a streamed train set's
    folds are shard or record-hash subsets, counted by the reader); default: the plan's index lengths.
    """
    if sizes is None:
        sizes = [(len(train), len(test)) for train, test in plan.folds]
    if len(per_fold) != len(sizes):
        raise ValueError(f"{len(per_fold)} fold results for {len(sizes)} folds")
    rows = [
        {"fold": i, "n_train": n_train, "n_test": n_test, **dict(result)}
        for i, ((n_train, n_test), result) in enumerate(zip(sizes, per_fold, strict=True))
    ]
    summary = summarize_folds([dict(result) for result in per_fold])
    report: dict[str, Any] = {"folds": len(sizes), "stratified": plan.stratified}
    if plan.note:
        report["note"] = plan.note
    report["per_fold"] = rows
    report["summary"] = summary
    return report
