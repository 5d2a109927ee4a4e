"""Criteria, scope (selection, targets, layer/global masks) and the TF pruner, on hand-checkable arrays."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, ClassVar

import numpy as np
import pytest

from worker.pruning.criteria import CRITERIA, Criterion, Magnitude, get_criterion, register
from worker.pruning.scope import global_masks, layer_masks, prune_count, resolve_targets, select_variables

# ---------------------------------------------------------------- import boundaries


def test_pure_modules_import_no_tensorflow_or_service_stack() -> None:
    code = (
        "import sys\n"
        "import worker.pruning.criteria, worker.pruning.scope, worker.pruning.schedules\n"
        "import worker.evaluation.metrics, worker.evaluation.latency, worker.evaluation.size\n"
        "bad = [m for m in ('tensorflow', 'keras', 'celery', 'fastapi', 'sqlalchemy', 'app.store')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


# ---------------------------------------------------------------- criteria


def test_magnitude_scores_are_absolute_values() -> None:
    w = np.array([[-3.0, 0.5], [0.0, -0.25]], dtype=np.float32)
    np.testing.assert_array_equal(Magnitude().score(w), [[3.0, 0.5], [0.0, 0.25]])
    assert Magnitude.needs_gradients is False


def test_registry_and_unknown_names() -> None:
    assert CRITERIA["magnitude"] is Magnitude
    crit = get_criterion("magnitude", seed=7)
    assert isinstance(crit, Magnitude) and crit.seed == 7
    with pytest.raises(ValueError, match="magnitude"):
        get_criterion("taylorr")


def test_register_refuses_duplicate_names() -> None:
    class Other(Criterion):
        name = "magnitude"

        def score(self, weight: np.ndarray, grad: Any = None, *, name: str = "") -> np.ndarray:
            return weight

    with pytest.raises(ValueError, match="already registered"):
        register(Other)
    assert CRITERIA["magnitude"] is Magnitude


# ---------------------------------------------------------------- selection and targets

NAMES = ["dense/kernel:0", "dense/bias:0", "dense_1/kernel:0", "conv/kernel:0"]


def test_select_variables_include_exclude_keep_order() -> None:
    assert select_variables(NAMES, [], []) == NAMES
    assert select_variables(NAMES, ["kernel"], ["^conv"]) == ["dense/kernel:0", "dense_1/kernel:0"]
    assert select_variables(NAMES, [], ["bias"]) == ["dense/kernel:0", "dense_1/kernel:0", "conv/kernel:0"]
    assert select_variables(NAMES, ["^conv", "bias"], []) == ["dense/bias:0", "conv/kernel:0"]


def test_resolve_targets_first_matching_override_wins() -> None:
    got = resolve_targets(NAMES, 0.9, {"dense_1": 0.3, "dense": 0.6})
    assert got == {"dense/kernel:0": 0.6, "dense/bias:0": 0.6, "dense_1/kernel:0": 0.3, "conv/kernel:0": 0.9}
    # Same patterns, other order: "dense" now matches dense_1 first.
    assert resolve_targets(NAMES, 0.9, {"dense": 0.6, "dense_1": 0.3})["dense_1/kernel:0"] == 0.6


def test_prune_count_rounding_and_guard() -> None:
    assert prune_count(0.5, 10) == 5
    assert prune_count(0.5, 5) == 2  # Python round: halves to even
    assert prune_count(0.5, 7) == 4
    assert prune_count(0.9, 1) == 0  # round(0.9) == 1 would empty the variable
    assert prune_count(0.99, 10) == 9
    assert prune_count(1.0, 10) == 10
    assert prune_count(0.0, 10) == 0
    with pytest.raises(ValueError):
        prune_count(1.5, 10)


# ---------------------------------------------------------------- layer masks


def test_layer_mask_on_known_matrix() -> None:
    w = np.array([[0.5, -2.0, 0.1], [3.0, -0.2, 1.0]])
    masks = layer_masks({"w": np.abs(w)}, {"w": 0.5})
    np.testing.assert_array_equal(masks["w"], [[False, True, False], [True, False, True]])
    assert masks["w"].dtype == bool


def test_layer_masks_exact_counts_per_variable() -> None:
    rng = np.random.default_rng(0)
    scores = {"a": rng.normal(size=(7, 13)), "b": rng.normal(size=(5,)), "c": rng.normal(size=(3, 3, 4))}
    targets = {"a": 0.37, "b": 0.5, "c": 0.9}
    masks = layer_masks(scores, targets)
    for name, score in scores.items():
        assert masks[name].shape == score.shape
        assert int((~masks[name]).sum()) == round(targets[name] * score.size)
        # Everything pruned scores no higher than everything kept.
        assert score[~masks[name]].max() <= score[masks[name]].min()


def test_layer_mask_ties_prune_lower_index_first() -> None:
    masks = layer_masks({"w": np.ones((2, 3))}, {"w": 0.5})
    np.testing.assert_array_equal(masks["w"], [[False, False, False], [True, True, True]])
    masks = layer_masks({"w": np.array([2.0, 1.0, 1.0, 1.0, 3.0])}, {"w": 0.4})
    np.testing.assert_array_equal(masks["w"], [True, False, False, True, True])


def test_layer_mask_nan_scores_rank_lowest() -> None:
    masks = layer_masks({"w": np.array([0.1, np.nan, 5.0, 2.0])}, {"w": 0.25})
    np.testing.assert_array_equal(masks["w"], [True, False, True, True])


def test_layer_masks_need_a_target_for_every_variable() -> None:
    with pytest.raises(ValueError, match="b"):
        layer_masks({"a": np.ones(3), "b": np.ones(3)}, {"a": 0.5})


# ---------------------------------------------------------------- global masks


def test_global_masks_allocate_across_layers() -> None:
    scores = {"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([0.1, 0.2, 0.3, 0.4, 20.0, 30.0])}
    masks = global_masks(scores, 0.5)  # 5 of 10 go: 0.1 0.2 0.3 0.4 and 1.0
    np.testing.assert_array_equal(masks["a"], [False, True, True, True])
    np.testing.assert_array_equal(masks["b"], [False, False, False, False, True, True])
    assert list(masks) == ["a", "b"]


def test_global_masks_fixed_targets_are_pruned_per_layer() -> None:
    scores = {"a": np.array([1.0, 2.0, 3.0, 4.0]), "b": np.array([0.1, 0.2, 0.3, 0.4, 20.0, 30.0])}
    masks = global_masks(scores, 0.5, fixed_targets={"a": 0.25})
    np.testing.assert_array_equal(masks["a"], [False, True, True, True])  # 1 of 4, on its own
    np.testing.assert_array_equal(masks["b"], [False, False, False, True, True, True])  # 3 of the 6 pooled
    with pytest.raises(ValueError, match="zzz"):
        global_masks(scores, 0.5, fixed_targets={"zzz": 0.1})


def test_global_masks_never_empty_a_variable_below_target_one() -> None:
    scores = {"small": np.array([0.01, 0.02]), "big": np.arange(1.0, 9.0)}
    masks = global_masks(scores, 0.2)  # 2 of 10; both of "small" are lowest but one must stay
    np.testing.assert_array_equal(masks["small"], [False, True])
    np.testing.assert_array_equal(masks["big"], [False, *[True] * 7])
    # A target too high for the guard: each variable keeps exactly its best entry.
    masks = global_masks({"a": np.array([100.0, 200.0]), "b": np.array([1.0, 2.0, 3.0, 4.0])}, 0.95)
    np.testing.assert_array_equal(masks["a"], [False, True])
    np.testing.assert_array_equal(masks["b"], [False, False, False, True])
    # Only an explicit 1.0 empties everything.
    masks = global_masks({"a": np.array([1.0, 2.0]), "b": np.array([3.0])}, 1.0)
    assert not masks["a"].any() and not masks["b"].any()


def test_global_masks_exact_total_count_and_single_threshold() -> None:
    rng = np.random.default_rng(1)
    scores = {f"v{i}": np.abs(rng.normal(scale=i + 1, size=(i + 3, 5))) for i in range(4)}
    total = sum(s.size for s in scores.values())
    masks = global_masks(scores, 0.6)
    pruned = np.concatenate([s[~masks[n]] for n, s in scores.items()])
    # One threshold, except for each variable's best entry, which the no-empty-layer guard protects.
    ranked_kept = np.concatenate([np.sort(s[masks[n]])[:-1] for n, s in scores.items()])
    assert pruned.size == round(0.6 * total)
    assert pruned.max() <= ranked_kept.min()
    assert all(masks[n].sum() >= 1 for n in scores)
    # Different scales: the low-scale variable loses more than the high-scale one.
    assert (~masks["v0"]).mean() > (~masks["v3"]).mean()


def test_global_masks_ties_prefer_first_name_then_lower_index() -> None:
    scores = {"b": np.ones(3), "a": np.ones(3)}
    masks = global_masks(scores, 0.5)  # 3 of 6 with all equal: a's first two, then b's first
    np.testing.assert_array_equal(masks["a"], [False, False, True])
    np.testing.assert_array_equal(masks["b"], [False, True, True])


# ---------------------------------------------------------------- pruner (TensorFlow)


class _GradTimesWeight(Criterion):
    """A test-only gradient criterion: exercises the needs_gradients hook without registering anything."""

    name = "test_taylor"
    needs_gradients: ClassVar[bool] = True

    def score(self, weight: np.ndarray, grad: Any = None, *, name: str = "") -> np.ndarray:
        assert grad is not None
        return np.abs(weight * grad)


@pytest.fixture
def tf_vars() -> dict[str, Any]:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    return {
        "w1": tf.Variable(rng.normal(size=(4, 5)).astype(np.float32)),
        "w2": tf.Variable((10.0 * rng.normal(size=(6,))).astype(np.float32)),
    }


@pytest.mark.tf
def test_pruner_layer_scope_exact_zeros(tf_vars: dict[str, Any]) -> None:
    from worker.pruning.pruner import Pruner

    before = {n: v.numpy().copy() for n, v in tf_vars.items()}
    pruner = Pruner(tf_vars, {"w1": 0.5, "w2": 0.5}, "layer", Magnitude())
    pruner.prune(1.0)
    assert pruner.sparsity() == {"w1": 0.5, "w2": 0.5}
    for name, var in tf_vars.items():
        value, mask = var.numpy(), pruner.masks[name]
        np.testing.assert_array_equal(value[~mask], 0.0)
        np.testing.assert_array_equal(value[mask], before[name][mask])  # kept weights untouched
        assert np.abs(before[name][~mask]).max() <= np.abs(before[name][mask]).min()


@pytest.mark.tf
def test_pruner_masks_are_monotone_when_weights_change(tf_vars: dict[str, Any]) -> None:
    from worker.pruning.pruner import Pruner

    pruner = Pruner(tf_vars, {"w1": 0.8, "w2": 0.8}, "layer", Magnitude())
    pruner.prune(0.5)  # 40%
    first = pruner.masks
    assert int((~first["w1"]).sum()) == 8
    # Training revives pruned weights with large values: they must stay pruned at the next, higher step.
    for name, var in tf_vars.items():
        var.assign(np.where(first[name], var.numpy(), 100.0).astype(np.float32))
    pruner.prune(1.0)  # 80%
    second = pruner.masks
    for name in tf_vars:
        assert not (second[name] & ~first[name]).any()
        np.testing.assert_array_equal(tf_vars[name].numpy()[~second[name]], 0.0)
    assert int((~second["w1"]).sum()) == 16
    # Asking for less later never revives anything.
    pruner.prune(0.25)
    assert pruner.sparsity()["w1"] == 0.8


@pytest.mark.tf
def test_apply_masks_rezeroes_after_updates_with_positive_zero(tf_vars: dict[str, Any]) -> None:
    from worker.pruning.pruner import Pruner

    pruner = Pruner(tf_vars, {"w1": 0.5, "w2": 0.5}, "layer", Magnitude())
    pruner.prune(1.0)
    tf_vars["w1"].assign_sub(np.full((4, 5), 0.3, dtype=np.float32))  # an "optimizer step"
    assert pruner.sparsity()["w1"] == 0.0
    pruner.apply_masks()
    value = tf_vars["w1"].numpy()
    assert pruner.sparsity()["w1"] == 0.5
    assert not np.signbit(value[~pruner.masks["w1"]]).any()  # +0.0, not -0.0


@pytest.mark.tf
def test_pruner_global_scope_with_fixed_override(tf_vars: dict[str, Any]) -> None:
    import tensorflow as tf

    from worker.pruning.pruner import Pruner

    tf_vars["w3"] = tf.Variable(np.arange(1.0, 11.0, dtype=np.float32))
    targets = {"w1": 0.6, "w2": 0.6, "w3": 0.2}
    pruner = Pruner(tf_vars, targets, "global", Magnitude(), global_target=0.6, fixed={"w3": 0.2})
    pruner.prune(1.0)
    sp = pruner.sparsity()
    assert sp["w3"] == 0.2
    np.testing.assert_array_equal(tf_vars["w3"].numpy()[:2], [0.0, 0.0])
    pooled_zeros = sum(int((tf_vars[n].numpy() == 0).sum()) for n in ("w1", "w2"))
    assert pooled_zeros == round(0.6 * 26)
    assert sp["w1"] > sp["w2"]  # w2 has 10x larger weights: the global threshold takes more of w1
    # Without global_target, the pooled variables must agree on one target.
    with pytest.raises(ValueError, match="global_target"):
        Pruner(tf_vars, {"w1": 0.6, "w2": 0.5, "w3": 0.2}, "global", Magnitude())
    inferred = Pruner(tf_vars, targets, "global", Magnitude(), fixed={"w3": 0.2})
    assert inferred.global_target == 0.6


@pytest.mark.tf
def test_pruner_gradient_hook_and_shape_checks(tf_vars: dict[str, Any]) -> None:
    from worker.pruning.pruner import Pruner

    pruner = Pruner(tf_vars, {"w1": 0.5, "w2": 0.5}, "layer", _GradTimesWeight())
    with pytest.raises(ValueError, match="needs gradients"):
        pruner.prune(1.0)
    w1 = tf_vars["w1"].numpy().copy()
    grads = {"w1": np.ones((4, 5), np.float32), "w2": np.ones(6, np.float32)}
    grads["w1"][0, :] = 1000.0  # makes the first row most important whatever its magnitude
    pruner.prune(1.0, grads=grads)
    np.testing.assert_array_equal(tf_vars["w1"].numpy()[0], w1[0])

    class WrongShape(Magnitude):
        def score(self, weight: np.ndarray, grad: Any = None, *, name: str = "") -> np.ndarray:
            return np.abs(weight).reshape(-1)

    with pytest.raises(ValueError, match="shape"):
        Pruner(tf_vars, {"w1": 0.5, "w2": 0.5}, "layer", WrongShape()).prune(1.0)
    with pytest.raises(ValueError, match="w2"):
        Pruner(tf_vars, {"w1": 0.5}, "layer", Magnitude())
    with pytest.raises(ValueError, match="fraction"):
        Pruner(tf_vars, {"w1": 0.5, "w2": 0.5}, "layer", Magnitude()).prune(1.5)
