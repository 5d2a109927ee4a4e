"""K-fold planning (partition, stratification, seeds, fallback) and fold summaries. No TensorFlow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from worker.evaluation.crossval import (
    FoldPlan,
    cross_validation_report,
    fold_indices,
    plan_folds,
    summarize_folds,
)
from worker.evaluation.metrics import evaluate_output


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def assert_partition(folds: list[tuple[np.ndarray, np.ndarray]], n: int, k: int) -> None:
    assert len(folds) == k
    for train, test in folds:
        assert len(np.intersect1d(train, test)) == 0
        np.testing.assert_array_equal(np.union1d(train, test), np.arange(n))
    every_test = np.concatenate([test for _, test in folds])
    np.testing.assert_array_equal(np.sort(every_test), np.arange(n))  # each index tested exactly once
    sizes = [len(test) for _, test in folds]
    assert max(sizes) - min(sizes) <= 1  # balanced folds


@pytest.mark.parametrize("k", [2, 5, 10])
def test_stratified_folds_partition_and_keep_class_proportions(
    digits: tuple[np.ndarray, np.ndarray], k: int
) -> None:
    _, y = digits
    plan = plan_folds(y, len(y), k, "classification", seed=3)
    assert plan.stratified and plan.note is None
    assert_partition(plan.folds, len(y), k)
    classes, totals = np.unique(y, return_counts=True)
    for _, test in plan.folds:
        counts = np.array([np.sum(y[test] == c) for c in classes])
        assert np.all(np.abs(counts - totals / k) <= 1), counts


def test_one_hot_labels_stratify_like_class_ids(digits: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = digits
    ids = fold_indices(y, len(y), 5, "classification", seed=1)
    one_hot = fold_indices(np.eye(10)[y], len(y), 5, "classification", seed=1)
    for (a_train, a_test), (b_train, b_test) in zip(ids, one_hot, strict=True):
        np.testing.assert_array_equal(a_train, b_train)
        np.testing.assert_array_equal(a_test, b_test)


def test_regression_and_unlabelled_data_use_plain_kfold() -> None:
    from sklearn.datasets import load_diabetes

    _, y = load_diabetes(return_X_y=True)
    for labels, task in ((y, "regression"), (None, "classification"), (None, None), (y, "auto")):
        plan = plan_folds(labels, len(y), 3, task, seed=0)  # type: ignore[arg-type]
        assert not plan.stratified and plan.note is None
        assert_partition(plan.folds, len(y), 3)
        assert sorted(len(test) for _, test in plan.folds) == [147, 147, 148]


def test_folds_are_reproducible_per_seed(digits: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = digits
    first = fold_indices(y, len(y), 5, "classification", seed=7)
    again = fold_indices(y, len(y), 5, "classification", seed=7)
    other = fold_indices(y, len(y), 5, "classification", seed=8)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    plain = fold_indices(None, 100, 4, None, seed=7)
    assert all(
        np.array_equal(a[1], b[1]) for a, b in zip(plain, fold_indices(None, 100, 4, None, 7), strict=True)
    )


def test_rare_class_falls_back_to_kfold_and_says_why() -> None:
    y = np.array([0] * 20 + [1] * 20 + [2] * 2)  # class 2 cannot appear in each of 3 test folds
    plan = plan_folds(y, len(y), 3, "classification", seed=0)
    assert not plan.stratified
    assert plan.note is not None and "[2]" in plan.note and "fewer than 3" in plan.note
    assert_partition(plan.folds, len(y), 3)
    assert plan_folds(y, len(y), 2, "classification", seed=0).stratified  # 2 members suffice for 2 folds
    many = plan_folds(np.arange(40) % 20, 40, 3, "classification", seed=0)  # 20 classes of 2
    assert many.note is not None and "and 10 more" in many.note


@pytest.mark.parametrize(
    ("y", "n", "k", "match"),
    [
        (None, 10, 1, "between 2 and 10"),
        (None, 100, 11, "between 2 and 10"),
        (None, 3, 4, "at least 4 samples"),
        (np.zeros(5), 6, 2, "rows for 6 samples"),
    ],
)
def test_fold_arguments_are_validated(y: np.ndarray | None, n: int, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fold_indices(y, n, k, "classification", seed=0)


def test_summarize_folds_means_and_population_std() -> None:
    per_fold = [
        {"accuracy": 0.8, "loss": 0.5, "task": "classification", "confusion_matrix": [[1]], "r2": None, "flag": True,
         "per_output": {"a": {"mse": 1.0}, "b": {"mse": 4.0, "only_here": 1.0}}},
        {"accuracy": 0.9, "loss": 0.3, "task": "classification", "confusion_matrix": [[2]], "r2": 0.5, "flag": False,
         "per_output": {"a": {"mse": 3.0}, "b": {"mse": 6.0}}},
        {"accuracy": 1.0, "loss": 0.1, "task": "classification", "confusion_matrix": [[3]], "r2": 0.7, "flag": True,
         "per_output": {"a": {"mse": 5.0}, "b": {"mse": 8.0}}},
    ]  # fmt: skip
    got = summarize_folds(per_fold)
    assert set(got) == {"accuracy", "loss", "per_output"}  # strings, lists, bools, sometimes-None left out
    assert got["accuracy"]["mean"] == pytest.approx(0.9)
    assert got["accuracy"]["std"] == pytest.approx(np.std([0.8, 0.9, 1.0], ddof=0))
    assert got["accuracy"]["std"] != pytest.approx(np.std([0.8, 0.9, 1.0], ddof=1))
    assert got["per_output"] == {
        "a": {"mse": {"mean": pytest.approx(3.0), "std": pytest.approx(np.std([1.0, 3.0, 5.0]))}},
        "b": {"mse": {"mean": pytest.approx(6.0), "std": pytest.approx(np.std([4.0, 6.0, 8.0]))}},
    }
    with pytest.raises(ValueError, match="no folds"):
        summarize_folds([])


def test_cross_validation_report_matches_sklearn_cross_val_score(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    """Fold accuracies of a LogisticRegression on our folds equal scikit-learn's own cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    x, y = digits
    plan = plan_folds(y, len(y), 3, "classification", seed=0)
    per_fold = []
    for train, test in plan.folds:
        model = LogisticRegression(max_iter=300, C=0.05).fit(x[train], y[train])
        masked = LogisticRegression(max_iter=300, C=0.05).fit(x[train][:, ::2], y[train])  # the "pruned" one
        per_fold.append(
            {
                "baseline": evaluate_output(y[test], model.predict_proba(x[test])),
                "pruned": evaluate_output(y[test], masked.predict_proba(x[test][:, ::2])),
            }
        )
    report = cross_validation_report(plan, per_fold)
    reference = cross_val_score(
        LogisticRegression(max_iter=300, C=0.05),
        x,
        y,
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring="accuracy",
    )
    accuracies = [row["baseline"]["accuracy"] for row in report["per_fold"]]
    np.testing.assert_allclose(accuracies, reference)
    summary = report["summary"]
    assert summary["baseline"]["accuracy"]["mean"] == pytest.approx(reference.mean())
    assert summary["baseline"]["accuracy"]["std"] == pytest.approx(reference.std())
    assert summary["pruned"]["f1_macro"]["mean"] == pytest.approx(
        np.mean([row["pruned"]["f1_macro"] for row in report["per_fold"]])
    )
    assert "confusion_matrix" not in summary["pruned"]
    assert report["folds"] == 3 and report["stratified"] is True and "note" not in report
    assert [row["fold"] for row in report["per_fold"]] == [0, 1, 2]
    assert sum(row["n_test"] for row in report["per_fold"]) == len(y)
    assert all(row["n_train"] + row["n_test"] == len(y) for row in report["per_fold"])
    json.dumps(report, allow_nan=False)
    with pytest.raises(ValueError, match="2 fold results for 3 folds"):
        cross_validation_report(plan, per_fold[:2])
    fallback = FoldPlan(plan.folds, stratified=False, note="why")
    assert cross_validation_report(fallback, per_fold)["note"] == "why"
