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
        "import worker.pruning.granularity, worker.pruning.normalization\n"
        "import worker.evaluation.metrics, worker.evaluation.latency, worker.evaluation.size\n"
        "bad = [m for m in ('tensorflow', 'keras', 'celery', 'fastapi', 'sqlalchemy', 'app.db')"
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

        def score(self, weight: np.ndarray, grad: np.ndarray | None = None) -> np.ndarray:
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

    def score(self, weight: np.ndarray, grad: np.ndarray | None = None) -> np.ndarray:
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
        def score(self, weight: np.ndarray, grad: np.ndarray | None = None) -> np.ndarray:
            return np.abs(weight).reshape(-1)

    with pytest.raises(ValueError, match="shape"):
        Pruner(tf_vars, {"w1": 0.5, "w2": 0.5}, "layer", WrongShape()).prune(1.0)
    with pytest.raises(ValueError, match="w2"):
        Pruner(tf_vars, {"w1": 0.5}, "layer", Magnitude())
    with pytest.raises(ValueError, match="fraction"):
        Pruner(tf_vars, {"w1": 0.5, "w2": 0.5}, "layer", Magnitude()).prune(1.5)


# ---------------------------------------------------------------- pruner: granularities, biases, reports


def _conv_out(kind: str, kernel: Any, bias: Any, x: Any) -> np.ndarray:
    """The layer's output computed with TensorFlow ops, as the restored Keras layer would."""
    import tensorflow as tf

    if kind == "conv":
        out = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")
    elif kind == "depthwise":
        out = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="SAME")
    else:
        shape = [int(x.shape[0]), int(x.shape[1]), int(x.shape[2]), int(kernel.shape[-2])]
        out = tf.nn.conv2d_transpose(x, kernel, shape, strides=1, padding="SAME")
    return (out + bias).numpy()


@pytest.mark.tf
@pytest.mark.parametrize(
    ("name", "shape", "channels"),
    [
        ("conv2d/kernel", (3, 3, 2, 4), 4),  # [kh, kw, in, out]
        ("depthwise_conv2d/kernel", (3, 3, 2, 2), 4),  # [kh, kw, in, mult]: in * mult outputs
        ("conv2d_transpose/kernel", (3, 3, 4, 2), 4),  # [kh, kw, out, in]
    ],
)
def test_channel_pruning_removes_output_channels_with_their_bias(
    name: str, shape: tuple[int, ...], channels: int
) -> None:
    import tensorflow as tf

    from worker.pruning.granularity import Channel
    from worker.pruning.pruner import Pruner

    rng = np.random.default_rng(0)
    kernel = tf.Variable(rng.normal(size=shape).astype(np.float32))
    bias_name = name.replace("kernel", "bias")
    bias = tf.Variable(rng.normal(size=channels).astype(np.float32) + 3.0)
    x = tf.constant(
        rng.normal(size=(1, 5, 5, shape[-1] if "transpose" in name else shape[2])).astype(np.float32)
    )
    pruner = Pruner(
        {name: kernel},
        {name: 0.5},
        "layer",
        Magnitude(),
        granularity=Channel(),
        model_variables={bias_name: bias},
    )
    kind = pruner.kinds[name]
    before = _conv_out(kind, kernel, bias, x)
    pruner.prune(1.0)
    after = _conv_out(kind, kernel, bias, x)
    removed = ~pruner.bias_masks[bias_name]
    assert pruner.biases == {name: bias_name} and int(removed.sum()) == channels // 2
    np.testing.assert_array_equal(after[..., removed], 0.0)  # removed channels output exactly 0
    np.testing.assert_allclose(after[..., ~removed], before[..., ~removed], rtol=1e-5, atol=1e-5)
    report = pruner.report()[0]
    assert (report.groups_removed, report.groups_total, report.bias) == (channels // 2, channels, bias_name)
    assert report.sparsity == 0.5
    # An optimizer step revives the bias: apply_masks zeroes it again.
    bias.assign_add(np.ones(channels, np.float32))
    pruner.apply_masks()
    np.testing.assert_array_equal(bias.numpy()[removed], 0.0)


@pytest.mark.tf
def test_channel_masks_grow_whole_channels_over_a_schedule() -> None:
    import tensorflow as tf

    from worker.pruning.granularity import Channel
    from worker.pruning.pruner import Pruner

    kernel = tf.Variable(np.random.default_rng(1).normal(size=(3, 3, 2, 8)).astype(np.float32))
    pruner = Pruner({"c/kernel": kernel}, {"c/kernel": 0.75}, "layer", Magnitude(), granularity=Channel())
    pruner.prune(0.5)  # 37.5% -> 3 channels
    first = pruner.masks["c/kernel"]
    kernel.assign(np.where(first, kernel.numpy(), 50.0).astype(np.float32))  # training revives them big
    pruner.prune(1.0)  # 75% -> 6 channels
    second = pruner.masks["c/kernel"]
    assert not (second & ~first).any()
    per_channel = second.reshape(-1, 8)
    assert (per_channel.all(axis=0) | ~per_channel.any(axis=0)).all()  # whole channels only
    assert int((~per_channel.any(axis=0)).sum()) == 6
    assert pruner.report()[0].to_dict() == {
        "name": "c/kernel",
        "kind": "conv",
        "granularity": "channel",
        "target": 0.75,
        "sparsity": 0.75,
        "channels_removed": 6,
        "channels_total": 8,
    }


@pytest.mark.tf
def test_nm_pruner_exact_pattern_tail_note_and_skipped_variables() -> None:
    import tensorflow as tf

    from worker.pruning.granularity import NM
    from worker.pruning.pruner import Pruner

    rng = np.random.default_rng(2)
    variables = {
        "dense/kernel": tf.Variable(rng.normal(size=(8, 3)).astype(np.float32)),
        "dense_1/kernel": tf.Variable(rng.normal(size=(6, 3)).astype(np.float32)),
        "conv2d/kernel": tf.Variable(rng.normal(size=(3, 3, 1, 4)).astype(np.float32)),  # one input channel
    }
    before = {n: v.numpy().copy() for n, v in variables.items()}
    targets = dict.fromkeys(variables, 0.5)
    pruner = Pruner(variables, targets, "global", Magnitude(), granularity=NM(2, 4))
    pruner.prune(1.0)
    sparsity = pruner.sparsity()
    assert sparsity["dense/kernel"] == 0.5
    assert (variables["dense/kernel"].numpy().reshape(2, 4, 3) != 0).sum(axis=1).max() == 2
    assert sparsity["dense_1/kernel"] == pytest.approx(2 / 6)  # groups [4] + tail [2]: the tail keeps both
    np.testing.assert_array_equal(variables["conv2d/kernel"].numpy(), before["conv2d/kernel"])
    assert "conv2d/kernel" in pruner.skipped and "length 1" in pruner.skipped["conv2d/kernel"]
    notes = pruner.notes()
    assert any(n.startswith("conv2d/kernel left dense under 2:4") for n in notes)
    assert any("dense_1/kernel: input axis of 6" in n for n in notes)
    report = {r.name: r for r in pruner.report()}
    assert report["conv2d/kernel"].to_dict()["skipped"] == pruner.skipped["conv2d/kernel"]
    assert report["dense/kernel"].groups_total is None


@pytest.mark.tf
def test_global_lamp_through_the_pruner_spares_a_small_layer() -> None:
    import tensorflow as tf

    from worker.pruning.pruner import Pruner

    def build() -> dict[str, Any]:
        rng = np.random.default_rng(4)
        return {
            "big/kernel": tf.Variable(rng.normal(scale=1.0, size=(20, 20)).astype(np.float32)),
            "small/kernel": tf.Variable(rng.normal(scale=0.01, size=(4, 5)).astype(np.float32)),
        }

    sparsity = {}
    for normalization in ("none", "lamp"):
        variables = build()
        pruner = Pruner(
            variables, dict.fromkeys(variables, 0.5), "global", Magnitude(), normalization=normalization
        )
        pruner.prune(1.0)
        sparsity[normalization] = pruner.sparsity()
        zeros = sum(int((v.numpy() == 0).sum()) for v in variables.values())
        assert zeros == round(0.5 * 420)
    assert sparsity["none"]["small/kernel"] == pytest.approx(19 / 20)
    assert sparsity["lamp"]["small/kernel"] < 0.75
    with pytest.raises(ValueError, match="normalization"):
        Pruner(build(), {"big/kernel": 0.5, "small/kernel": 0.5}, "global", Magnitude(), normalization="l2")


@pytest.mark.tf
def test_global_channel_ranking_pools_layers_of_different_channel_sizes() -> None:
    import tensorflow as tf

    from worker.pruning.granularity import Block, Channel
    from worker.pruning.pruner import Pruner

    rng = np.random.default_rng(5)
    variables = {
        "conv2d/kernel": tf.Variable(rng.normal(size=(3, 3, 1, 8)).astype(np.float32)),  # 9 weights/channel
        "conv2d_1/kernel": tf.Variable(rng.normal(size=(3, 3, 8, 16)).astype(np.float32)),  # 72
        "dense/kernel": tf.Variable(rng.normal(size=(64, 4)).astype(np.float32)),
    }
    targets = dict.fromkeys(variables, 0.6)
    granularity = {"conv2d/kernel": Channel(), "conv2d_1/kernel": Channel(), "dense/kernel": Block((8, 2))}
    pruner = Pruner(variables, targets, "global", Magnitude(), granularity=granularity, normalization="lamp")
    pruner.prune(1.0)
    total = sum(int(np.prod(v.shape)) for v in variables.values())
    zeros = sum(int((v.numpy() == 0).sum()) for v in variables.values())
    assert abs(zeros - round(0.6 * total)) <= 72 // 2  # whole groups: within half the largest group
    reports = {r.name: r for r in pruner.report()}
    for name in ("conv2d/kernel", "conv2d_1/kernel"):
        r = reports[name]
        assert r.groups_removed is not None and r.groups_total is not None
        assert 0 < r.groups_removed < r.groups_total  # both layers lose some, none is emptied
        assert r.sparsity == pytest.approx(r.groups_removed / r.groups_total)
    assert reports["dense/kernel"].group_noun == "blocks"


@pytest.mark.tf
def test_random_and_taylor_criteria_through_the_pruner() -> None:
    import tensorflow as tf

    from worker.pruning.criteria import GradientStats, Random, Taylor
    from worker.pruning.pruner import Pruner

    def masks(seed: int) -> np.ndarray:
        var = tf.Variable(np.arange(1.0, 21.0, dtype=np.float32).reshape(4, 5))
        pruner = Pruner({"w": var}, {"w": 0.5}, "layer", Random(seed=seed))
        pruner.prune(1.0)
        return pruner.masks["w"]

    np.testing.assert_array_equal(masks(1), masks(1))
    assert not np.array_equal(masks(1), masks(2))
    assert masks(1).sum() == 10

    var = tf.Variable(np.ones((2, 2), np.float32))
    head = tf.Variable(np.ones((2, 2), np.float32))  # another output's head: no gradient reaches it
    taylor = np.array([[4.0, 1.0], [3.0, 2.0]])
    stats = {
        "w": GradientStats(abs_grad=np.zeros((2, 2)), abs_taylor=taylor, batches=1, samples=8),
        "head": GradientStats(np.zeros((2, 2)), np.zeros((2, 2)), batches=1, samples=8, connected=False),
    }
    pruner = Pruner({"w": var, "head": head}, {"w": 0.5, "head": 0.5}, "layer", Taylor())
    pruner.prune(1.0, grads=stats)
    np.testing.assert_array_equal(pruner.masks["w"], [[True, False], [True, False]])
    np.testing.assert_array_equal(head.numpy(), 1.0)  # left dense, not pruned by ties
    assert "does not depend" in pruner.skipped["head"] and pruner.active == ["w"]


@pytest.mark.tf
def test_pruner_skip_kinds_and_argument_checks(tf_vars: dict[str, Any]) -> None:
    from worker.pruning.granularity import Channel
    from worker.pruning.pruner import Pruner

    targets = {"w1": 0.5, "w2": 0.5}
    w1 = tf_vars["w1"].numpy().copy()
    pruner = Pruner(tf_vars, targets, "layer", Magnitude(), skip={"w1": "the output layer"})
    pruner.prune(1.0)
    np.testing.assert_array_equal(tf_vars["w1"].numpy(), w1)
    assert pruner.active == ["w2"] and pruner.notes() == [
        "w1 left dense under unstructured granularity: the output layer"
    ]
    # w2 is rank 1: channel has no meaning for it and it is left dense with the reason.
    channel = Pruner(tf_vars, targets, "layer", Magnitude(), granularity=Channel())
    assert channel.kinds == {"w1": "dense", "w2": "vector"} and "rank-0/1" in channel.skipped["w2"]
    overridden = Pruner(tf_vars, targets, "layer", Magnitude(), granularity=Channel(), kinds={"w1": "bias"})
    assert "w1" in overridden.skipped
    with pytest.raises(ValueError, match="zzz"):
        Pruner(tf_vars, targets, "layer", Magnitude(), skip={"zzz": "x"})
    with pytest.raises(ValueError, match="granularity"):
        Pruner(tf_vars, targets, "layer", Magnitude(), granularity={"w1": Channel()})
