"""Every registered criterion on hand-checkable arrays; gradient statistics on a tiny linear model."""

from __future__ import annotations

import numpy as np
import pytest

from worker.pruning.criteria import (
    CRITERIA,
    L1,
    L2,
    Gradient,
    GradientStats,
    Magnitude,
    Random,
    Taylor,
    get_criterion,
)

W = np.array([[2.0, -1.0], [0.5, 0.0]])
G = np.array([[0.1, -3.0], [-2.0, 5.0]])


def _stats(abs_grad: np.ndarray, abs_taylor: np.ndarray) -> GradientStats:
    return GradientStats(abs_grad=abs_grad, abs_taylor=abs_taylor, batches=1, samples=1)


def test_get_criterion_passes_the_seed() -> None:
    for name in CRITERIA:  # the names themselves are the spec's (tests/test_vocabularies.py)
        assert get_criterion(name, seed=3).seed == 3


def test_gradient_scores_mean_abs_gradient() -> None:
    stats = _stats(np.array([[1.0, 2.0], [3.0, 4.0]]), np.zeros((2, 2)))
    np.testing.assert_array_equal(Gradient().score(W, stats), [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(Gradient().score(W, G), [[0.1, 3.0], [2.0, 5.0]])  # one batch's gradient
    assert Gradient.needs_gradients and Gradient().needs_train_data
    with pytest.raises(ValueError, match="needs gradients"):
        Gradient().score(W)


def test_taylor_scores_abs_weight_times_gradient() -> None:
    np.testing.assert_allclose(Taylor().score(W, G), [[0.2, 3.0], [1.0, 0.0]])
    stats = _stats(np.zeros((2, 2)), np.array([[9.0, 8.0], [7.0, 6.0]]))
    np.testing.assert_array_equal(Taylor().score(W, stats), [[9.0, 8.0], [7.0, 6.0]])
    assert Taylor.needs_gradients
    with pytest.raises(ValueError, match="taylor"):
        Taylor().score(W, None)


def test_random_is_reproducible_per_seed_and_name() -> None:
    w = np.zeros((6, 7))
    first = Random(seed=1).score(w, name="dense/kernel")
    assert first.shape == (6, 7) and (first >= 0).all() and (first < 1).all()
    np.testing.assert_array_equal(Random(seed=1).score(w, name="dense/kernel"), first)
    assert not np.array_equal(Random(seed=2).score(w, name="dense/kernel"), first)
    assert not np.array_equal(Random(seed=1).score(w, name="dense_1/kernel"), first)
    # Independent of the weights' values: a baseline, not a criterion in disguise.
    np.testing.assert_array_equal(Random(seed=1).score(np.ones((6, 7)), name="dense/kernel"), first)
    assert not Random.needs_gradients and Random.regularizer is None
    # Only Random asks for the variable name; criteria written as score(weight, grad) keep working.
    assert [n for n, cls in CRITERIA.items() if cls.uses_name] == ["random"]


def test_regularisation_criteria_declare_their_phase_and_score_by_magnitude() -> None:
    assert (L1.regularizer, L2.regularizer, Magnitude.regularizer) == ("l1", "l2", None)
    for crit in (L1(), L2()):
        np.testing.assert_array_equal(crit.score(W), np.abs(W))
        assert crit.needs_train_data and not crit.needs_gradients
    assert not Magnitude().needs_train_data


# ---------------------------------------------------------------- gradients (TensorFlow)

# y_hat = x @ w with mse and y = 0: the batch-mean gradient is 2/n * X^T (X w). With w = [2, -1]:
#   batch 1: X = [[1, 0], [0, 1]] -> X w = [2, -1] -> g = [2, -1]
#   batch 2: X = [[1, 1], [2, 0]] -> X w = [1, 4]  -> g = X^T [1, 4] = [9, 1]
# mean |g| = [5.5, 1] (while |mean g| would be [5.5, 0]); mean |w g| = mean([4, 1], [18, 1]) = [11, 1].
X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]], dtype=np.float32)
Y = np.zeros(4, dtype=np.float32)


@pytest.fixture
def linear() -> tuple[object, dict[str, object]]:
    tf = pytest.importorskip("tensorflow")

    class Linear(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable([[2.0], [-1.0]], name="w")
            self.unused = tf.Variable([[1.0, 2.0]], name="unused")

        def forward(self, inputs: dict, training: bool) -> object:
            return tf.matmul(inputs["x"], self.w)

    model = Linear()
    return model, {"w": model.w, "unused": model.unused}


@pytest.mark.tf
def test_accumulate_gradients_mean_abs_grad_and_taylor_by_hand(linear: tuple) -> None:
    from worker.pruning.gradients import accumulate_gradients

    model, variables = linear
    stats = accumulate_gradients(
        model.forward, variables, {"x": X}, Y, loss="mse", from_logits=False, batch_size=2, seed=None
    )
    np.testing.assert_allclose(stats["w"].abs_grad[:, 0], [5.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(stats["w"].abs_taylor[:, 0], [11.0, 1.0], rtol=1e-6)
    assert (stats["w"].batches, stats["w"].samples, stats["w"].connected) == (2, 4, True)
    assert not stats["unused"].connected
    np.testing.assert_array_equal(stats["unused"].abs_grad, 0.0)
    # The criteria read those statistics.
    np.testing.assert_allclose(Taylor().score(model.w.numpy(), stats["w"])[:, 0], [11.0, 1.0], rtol=1e-6)

    first = accumulate_gradients(
        model.forward,
        variables,
        {"x": X},
        Y,
        loss="mse",
        from_logits=False,
        batch_size=2,
        max_batches=1,
        seed=None,
    )
    np.testing.assert_allclose(first["w"].abs_grad[:, 0], [2.0, 1.0], rtol=1e-6)


@pytest.mark.tf
def test_accumulate_gradients_weights_batches_by_size_and_is_seeded(linear: tuple) -> None:
    from worker.pruning.gradients import accumulate_gradients

    model, variables = linear
    w = model.w.numpy().astype(np.float64)

    def batch_grad(rows: np.ndarray) -> np.ndarray:
        xb = X[rows].astype(np.float64)
        return 2.0 / len(rows) * xb.T @ (xb @ w)

    # batch_size 3 over 4 samples in order: batches [0, 1, 2] and [3], weighted 3 and 1.
    stats = accumulate_gradients(
        model.forward, variables, {"x": X}, Y, loss="mse", from_logits=False, batch_size=3, seed=None
    )
    expected = (3 * np.abs(batch_grad(np.arange(3))) + np.abs(batch_grad(np.array([3])))) / 4
    np.testing.assert_allclose(stats["w"].abs_grad, expected, rtol=1e-6)

    run = [
        accumulate_gradients(
            model.forward,
            variables,
            {"x": X},
            Y,
            loss="mse",
            from_logits=False,
            batch_size=1,
            max_batches=2,
            seed=s,
        )["w"].abs_grad
        for s in (0, 0, 1)
    ]
    np.testing.assert_array_equal(run[0], run[1])
    for seed, got in ((0, run[0]), (1, run[2])):  # the first two samples of each seed's permutation
        order = np.random.default_rng(seed).permutation(4)[:2]
        expected = (np.abs(batch_grad(order[:1])) + np.abs(batch_grad(order[1:]))) / 2
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert not np.array_equal(run[0], run[2])
    with pytest.raises(ValueError, match="length"):
        accumulate_gradients(model.forward, variables, {"x": X[:3]}, Y, loss="mse", from_logits=False)
