"""Penalty values by hand (L1, ridge, group lasso on channels and blocks), their gradients, and L1 fine-tuning."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.tf

tf = pytest.importorskip("tensorflow")

from worker.pruning.criteria import L1, L2, Magnitude  # noqa: E402
from worker.pruning.finetune import fine_tune  # noqa: E402
from worker.pruning.granularity import NM, Block, Channel, TileLayout  # noqa: E402
from worker.pruning.pruner import Pruner  # noqa: E402
from worker.pruning.regularization import group_norms, penalty, penalty_fn  # noqa: E402

A = np.array([[1.0, -2.0], [3.0, -4.0]], dtype=np.float32)
B = np.array([[0.5]], dtype=np.float32)
# Block (0,0) = [[1, 2], [2, 4]] -> 5; (0,1) = 0 -> 0; (1,0) = [[3, 0], [0, 4]] -> 5; (1,1) = ones -> 2.
M44 = np.array(
    [[1.0, 2.0, 0.0, 0.0], [2.0, 4.0, 0.0, 0.0], [3.0, 0.0, 1.0, 1.0], [0.0, 4.0, 1.0, 1.0]], dtype=np.float32
)


def test_l1_and_ridge_by_hand() -> None:
    a, b = tf.Variable(A), tf.Variable(B)
    assert float(penalty("l1", [a, b], 0.1)) == pytest.approx(0.1 * (10 + 0.5))
    assert float(penalty("l2", [a, b], 0.1)) == pytest.approx(0.1 * (1 + 4 + 9 + 16 + 0.25))
    assert float(penalty("l1", [a], 0.0)) == 0.0


def test_group_lasso_on_channels_by_hand() -> None:
    dense = tf.Variable(np.array([[3.0, 1.0], [4.0, 0.0]], dtype=np.float32))  # column norms 5 and 1
    layout = Channel().penalty_layout("dense", (2, 2))
    assert float(penalty("group_lasso", [dense], 0.5, [layout])) == pytest.approx(0.5 * 6)
    conv = np.zeros((1, 1, 2, 2), np.float32)
    conv[0, 0, :, 0] = [3.0, 4.0]  # channel 0 norm 5, channel 1 all zero
    conv_layout = Channel().penalty_layout("conv", conv.shape)
    np.testing.assert_allclose(group_norms(tf.constant(conv), conv_layout).numpy().reshape(-1), [5.0, 0.0])


def test_group_lasso_on_blocks_with_edges_by_hand() -> None:
    layout = Block((2, 2)).penalty_layout("dense", (4, 4))
    assert layout is not None
    np.testing.assert_allclose(group_norms(tf.constant(M44), layout).numpy(), [[5.0, 0.0], [5.0, 2.0]])
    assert float(penalty("group_lasso", [tf.Variable(M44)], 1.0, [layout])) == pytest.approx(12.0)
    edges = TileLayout((3, 3), (3, 3), (2, 2))  # norms 2, sqrt 2, sqrt 2, 1
    value = penalty("group_lasso", [tf.ones((3, 3))], 1.0, [edges])
    assert float(value) == pytest.approx(3 + 2 * math.sqrt(2), rel=1e-6)


def test_group_lasso_gradient_is_w_over_norm_and_zero_on_a_zero_group() -> None:
    var = tf.Variable(M44)
    layout = Block((2, 2)).penalty_layout("dense", (4, 4))
    with tf.GradientTape() as tape:
        value = penalty("group_lasso", [var], 1.0, [layout])
    grad = tape.gradient(value, var).numpy()
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[0:2, 2:4], 0.0)  # the all-zero block: no NaN, no push
    np.testing.assert_allclose(grad[0:2, 0:2], M44[0:2, 0:2] / 5.0, rtol=1e-6)
    np.testing.assert_allclose(grad[2:4, 2:4], M44[2:4, 2:4] / 2.0, rtol=1e-6)


def test_penalty_refuses_bad_arguments() -> None:
    var = tf.Variable(A)
    with pytest.raises(ValueError, match="layout"):
        penalty("group_lasso", [var], 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        penalty("l1", [var], -1.0)
    with pytest.raises(ValueError, match="unknown penalty"):
        penalty("l0", [var], 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="regularizer"):
        penalty_fn("l3", [var], [None], 1.0)  # type: ignore[arg-type]


def test_penalty_fn_l2_is_group_lasso_where_there_are_groups_and_ridge_elsewhere() -> None:
    dense = tf.Variable(np.array([[3.0, 1.0], [4.0, 0.0]], dtype=np.float32))
    plain = tf.Variable(B)
    fn = penalty_fn("l2", [dense, plain], [Channel().penalty_layout("dense", (2, 2)), None], 0.5)
    assert float(fn()) == pytest.approx(0.5 * 6 + 0.5 * 0.25)
    dense.assign(np.zeros((2, 2), np.float32))  # read at every call, not frozen at construction
    assert float(fn()) == pytest.approx(0.5 * 0.25)
    assert float(penalty_fn("l1", [dense, plain], [None, None], 2.0)()) == pytest.approx(1.0)


def test_pruner_builds_the_criterions_penalty_over_pruned_variables_only() -> None:
    variables = {
        "dense/kernel": tf.Variable(np.array([[3.0, 1.0], [4.0, 0.0]], dtype=np.float32)),
        "dense_1/kernel": tf.Variable(np.array([[1.0], [-1.0]], dtype=np.float32)),
    }
    targets = dict.fromkeys(variables, 0.5)
    assert Pruner(variables, targets, "layer", Magnitude()).penalty(0.1) is None
    skip = {"dense_1/kernel": "the output layer"}
    group = Pruner(variables, targets, "layer", L2(), granularity=Channel(), skip=skip).penalty(0.1)
    assert group is not None and float(group()) == pytest.approx(0.1 * 6)
    l1 = Pruner(variables, targets, "layer", L1(), granularity=NM(1, 2)).penalty(0.1)
    assert l1 is not None and float(l1()) == pytest.approx(0.1 * (8 + 2))
    ridge = Pruner(variables, targets, "layer", L2()).penalty(1.0)  # unstructured: no groups
    assert ridge is not None and float(ridge()) == pytest.approx(9 + 1 + 16 + 1 + 1)


def test_l1_fine_tuning_shrinks_weights_compared_with_no_penalty() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)[:600]
    y = digits.target[:600].astype(np.int64)

    def train(strength: float) -> tuple[np.ndarray, list[float]]:
        w0 = np.random.default_rng(0).normal(scale=0.1, size=(64, 10)).astype(np.float32)
        w, b = tf.Variable(w0), tf.Variable(np.zeros(10, np.float32))
        history = fine_tune(
            lambda inputs, training: tf.matmul(inputs["x"], w) + b,
            [w, b],
            {"x": x},
            y,
            loss="sparse_categorical_crossentropy",
            from_logits=True,
            epochs=3,
            batch_size=64,
            learning_rate=0.1,
            optimizer="sgd",
            seed=0,
            lr_decay="constant",
            penalty=(lambda: penalty("l1", [w], strength)) if strength else None,
        )
        return np.abs(w.numpy()), history

    plain, plain_history = train(0.0)
    shrunk, l1_history = train(1e-2)
    assert shrunk.sum() < 0.85 * plain.sum()
    assert (shrunk < 1e-2).mean() > 2 * (plain < 1e-2).mean()
    # The history is the data loss: the ~0.5 penalty (0.01 * sum |w|) is not in it.
    assert abs(l1_history[0] - plain_history[0]) < 0.05
