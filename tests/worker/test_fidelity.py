"""Fidelity of pruned to baseline predictions, checked against scikit-learn/scipy called directly. No labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import rel_entr, softmax
from sklearn import metrics as skm

from worker.evaluation.fidelity import KL_EPSILON, fidelity, fidelity_by_output, infer_output_task


@pytest.fixture(scope="module")
def two_models() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Logits and probabilities of two digits classifiers that mostly, not always, agree ("baseline", "pruned")."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    base = LogisticRegression(max_iter=500, C=0.1).fit(x[:1200], y[:1200])
    # "Pruned": the same kind of model that never saw half of the pixels.
    masked = x.copy()
    masked[:, ::2] = 0.0
    pruned = LogisticRegression(max_iter=500, C=0.1).fit(masked[:1200], y[:1200])
    test, test_masked = x[1200:], masked[1200:]
    return (
        base.decision_function(test),
        pruned.decision_function(test_masked),
        base.predict_proba(test),
        pruned.predict_proba(test_masked),
    )


def test_classification_fidelity_equals_direct_computation(
    two_models: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    _, _, p_base, p_pruned = two_models
    got = fidelity(p_base, p_pruned)
    agreement = skm.accuracy_score(p_base.argmax(axis=1), p_pruned.argmax(axis=1))
    assert got["task"] == "classification" and got["n_predictions"] == len(p_base)
    assert got["top1_agreement"] == pytest.approx(agreement)
    assert 0.5 < got["top1_agreement"] < 1.0  # the two models do disagree sometimes
    assert got["mean_abs_output_diff"] == pytest.approx(np.mean(np.abs(p_base - p_pruned)))
    assert got["max_abs_output_diff"] == pytest.approx(np.max(np.abs(p_base - p_pruned)))
    p = np.clip(p_base, KL_EPSILON, 1)
    q = np.clip(p_pruned, KL_EPSILON, 1)
    p, q = p / p.sum(axis=1, keepdims=True), q / q.sum(axis=1, keepdims=True)
    assert got["kl_divergence"] == pytest.approx(np.mean(rel_entr(p, q).sum(axis=1)), rel=1e-6)
    assert got["kl_divergence"] > 0
    assert json.loads(json.dumps(got, allow_nan=False)) == got


def test_logits_are_compared_as_probabilities_for_kl_and_raw_for_differences(
    two_models: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    z_base, z_pruned, p_base, p_pruned = two_models
    from_logits = fidelity(z_base, z_pruned)  # from_logits inferred: values outside [0, 1]
    from_probs = fidelity(p_base, p_pruned)
    assert from_logits["top1_agreement"] == from_probs["top1_agreement"]
    assert from_logits["kl_divergence"] == pytest.approx(from_probs["kl_divergence"], rel=1e-4)
    assert from_logits["mean_abs_output_diff"] == pytest.approx(np.mean(np.abs(z_base - z_pruned)))
    # Reading probabilities as logits is a different (flatter) comparison: the flag is used.
    forced = fidelity(p_base, p_pruned, from_logits=True)
    assert forced["kl_divergence"] < from_probs["kl_divergence"]
    np.testing.assert_allclose(softmax(z_base, axis=1), p_base, atol=1e-9)  # the fixture's premise


def test_identical_models_agree_fully() -> None:
    out = softmax(np.random.default_rng(0).normal(size=(50, 4)), axis=1)
    got = fidelity(out, out.copy())
    assert got["top1_agreement"] == 1.0
    assert got["mean_abs_output_diff"] == got["max_abs_output_diff"] == 0.0
    assert got["kl_divergence"] == pytest.approx(0.0, abs=1e-12)


def test_binary_sigmoid_agreement_is_thresholded() -> None:
    base = np.array([[0.2], [0.6], [0.9], [0.5]])
    pruned = np.array([[0.4], [0.4], [0.95], [0.51]])  # flips the 2nd (0.6 -> 0.4) and the 4th (0.5 -> 0.51)
    got = fidelity(base, pruned)
    assert got["task"] == "classification"
    assert got["top1_agreement"] == pytest.approx(0.5)
    b, p = base[:, 0], pruned[:, 0]
    expected_kl = np.mean([rel_entr([1 - bi, bi], [1 - pi, pi]).sum() for bi, pi in zip(b, p, strict=True)])
    assert got["kl_divergence"] == pytest.approx(expected_kl)
    assert got["max_abs_output_diff"] == pytest.approx(0.2)
    # Logits of a single unit look like a regression output without labels; told the task, they are
    # thresholded at 0 (= probability 0.5).
    z_base, z_pruned = np.array([[-1.0], [2.0], [3.0]]), np.array([[1.0], [2.5], [-0.1]])
    assert fidelity(z_base, z_pruned)["task"] == "regression"
    assert fidelity(z_base, z_pruned, task="classification")["top1_agreement"] == pytest.approx(1 / 3)


def test_regression_outputs_get_differences_only() -> None:
    base = np.array([[10.0], [20.0], [30.0]])
    pruned = np.array([[11.0], [18.0], [30.0]])
    got = fidelity(base, pruned)
    assert got["task"] == "regression"
    assert "top1_agreement" not in got and "kl_divergence" not in got
    assert got["mean_abs_output_diff"] == pytest.approx(1.0)
    assert got["max_abs_output_diff"] == pytest.approx(2.0)
    # A multi-unit regression output would be guessed as classification: an explicit task wins.
    two = fidelity(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 2.5], [3.0, 4.0]]), task="regression")
    assert set(two) == {"task", "n_predictions", "mean_abs_output_diff", "max_abs_output_diff"}
    assert two["mean_abs_output_diff"] == pytest.approx(0.5 / 4)


def test_zero_probabilities_keep_kl_finite() -> None:
    base = np.array([[0.5, 0.5, 0.0]])
    pruned = np.array([[1.0, 0.0, 0.0]])  # a float32 softmax can underflow like this
    got = fidelity(base, pruned)
    assert got["kl_divergence"] is not None and 0 < got["kl_divergence"] < 20
    json.dumps(got, allow_nan=False)


def test_infer_output_task_from_outputs_alone() -> None:
    assert infer_output_task(np.zeros((3, 5))) == "classification"
    assert infer_output_task(np.array([[0.1], [0.9]])) == "classification"
    assert infer_output_task(np.array([[0.1], [1.9]])) == "regression"
    assert infer_output_task(np.array([-3.0, 2.0])) == "regression"


def test_fidelity_by_output_and_errors(
    two_models: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    z_base, z_pruned, p_base, p_pruned = two_models
    score = np.arange(len(p_base), dtype=np.float64).reshape(-1, 1)
    baseline = {"probs": p_base, "logits": z_base, "score": score}
    pruned = {"probs": p_pruned, "logits": z_pruned, "score": score + 3.0}
    got = fidelity_by_output(baseline, pruned, tasks={"score": "regression"})
    assert list(got) == ["logits", "probs", "score"]
    assert got["probs"] == fidelity(p_base, p_pruned)
    assert got["score"]["mean_abs_output_diff"] == pytest.approx(3.0) and "top1_agreement" not in got["score"]
    with pytest.raises(ValueError, match="score"):
        fidelity_by_output(baseline, {"probs": p_pruned, "logits": z_pruned})
    with pytest.raises(ValueError, match="shape"):
        fidelity(p_base, p_pruned[:, :5])
    with pytest.raises(ValueError, match="at least one"):
        fidelity(np.zeros((0, 3)), np.zeros((0, 3)))
