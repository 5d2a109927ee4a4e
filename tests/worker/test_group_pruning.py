"""Group-aware channel pruning against synthetic channel groups (the shape worker.structure returns)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import tensorflow as tf

from worker.pruning.criteria import GradientStats, get_criterion
from worker.pruning.group_pruner import GroupPruner
from worker.pruning.interface import PrunerLike
from worker.pruning.pruner import Pruner


@dataclass(frozen=True)
class Member:
    variable: str
    axis: int
    role: str
    positions: np.ndarray | None = None


@dataclass
class ChannelGroup:
    id: str
    channels: int
    members: list[Member]
    prunable: bool = True
    reason: str | None = None
    extra: dict = field(default_factory=dict)


def _var(value: np.ndarray, trainable: bool = True) -> tf.Variable:
    return tf.Variable(np.asarray(value, np.float32), trainable=trainable)


def _residual() -> tuple[dict[str, tf.Variable], list[ChannelGroup]]:
    """conv a and shortcut conv b feed one Add (4 channels), with a bias, BN and a consumer conv c."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3, 2, 4))
    b = rng.normal(size=(1, 1, 2, 4))
    # Channel L2 norms over both producers: channel 1 and 3 smallest.
    a[..., 1] *= 0.01
    b[..., 1] *= 0.01
    a[..., 3] *= 0.1
    b[..., 3] *= 0.1
    b[..., 0] *= 0.001  # tiny in b alone: the L2 over both producers still ranks channel 0 high
    variables = {
        "a/kernel": _var(a),
        "a/bias": _var(rng.normal(size=4)),
        "b/kernel": _var(b),
        "bn/gamma": _var(rng.normal(size=4)),
        "bn/beta": _var(rng.normal(size=4)),
        "bn/moving_mean": _var(rng.normal(size=4), trainable=False),
        "c/kernel": _var(rng.normal(size=(3, 3, 4, 5))),
        "c/bias": _var(rng.normal(size=5)),
    }
    group = ChannelGroup(
        "add",
        4,
        [
            Member("a/kernel", 3, "producer"),
            Member("b/kernel", -1, "producer"),
            Member("a/bias", 0, "carrier"),
            Member("bn/gamma", 0, "carrier"),
            Member("bn/beta", 0, "carrier"),
            Member("bn/moving_mean", 0, "carrier"),
            Member("c/kernel", 2, "consumer"),
        ],
    )
    head = ChannelGroup(
        "c_out",
        5,
        [Member("c/kernel", 3, "producer"), Member("c/bias", 0, "carrier")],
        prunable=False,
        reason="reaches signature output 'y'",
    )
    return variables, [group, head]


def _pruner(variables, groups, scope="layer", criterion="magnitude", target=0.5, **kw) -> GroupPruner:
    selected = {n: v for n, v in variables.items() if n.endswith("kernel")}
    return GroupPruner(
        groups,
        selected,
        {n: target for n in selected},
        scope,
        get_criterion(criterion),
        model_variables=variables,
        **kw,
    )


def test_magnitude_ranks_by_l2_over_all_producers_and_zeroes_every_member() -> None:
    variables, groups = _residual()
    mean_before = variables["bn/moving_mean"].numpy().copy()
    pruner = _pruner(variables, groups)
    pruner.prune(1.0)
    assert pruner.group_keep()["add"].tolist() == [True, False, True, False]
    for name in ("a/kernel", "b/kernel"):
        value = variables[name].numpy()
        assert not value[..., [1, 3]].any() and value[..., [0, 2]].all()
    for name in ("a/bias", "bn/gamma", "bn/beta"):
        assert variables[name].numpy()[[1, 3]].tolist() == [0, 0]
        assert variables[name].numpy()[[0, 2]].all()
    np.testing.assert_array_equal(variables["bn/moving_mean"].numpy(), mean_before)  # non-trainable: as is
    c = variables["c/kernel"].numpy()
    assert not c[:, :, [1, 3], :].any() and c[:, :, [0, 2], :].all()
    assert variables["c/bias"].numpy().all()  # its group was left whole
    rows = {r["id"]: r for r in pruner.structure_groups()}
    assert rows["add"]["channels_before"] == 4 and rows["add"]["channels_after"] == 2
    assert rows["c_out"]["reason"] == "reaches signature output 'y'"
    assert any("c_out left whole" in line for line in pruner.notes())


def test_masks_hold_after_updates_and_only_grow() -> None:
    variables, groups = _residual()
    pruner = _pruner(variables, groups)
    pruner.prune(1.0)
    keep = pruner.group_keep()["add"].copy()
    variables["a/kernel"].assign_add(tf.ones_like(variables["a/kernel"]))
    variables["bn/beta"].assign_add(tf.ones_like(variables["bn/beta"]))
    pruner.apply_masks()
    assert not variables["a/kernel"].numpy()[..., ~keep].any()
    assert not variables["bn/beta"].numpy()[~keep].any()
    pruner.prune(0.5)  # a lower fraction later keeps what was removed
    assert (pruner.group_keep()["add"] == keep).all()


def test_taylor_sums_scores_over_producers() -> None:
    variables, groups = _residual()
    pruner = _pruner(variables, groups, criterion="taylor", target=0.25)
    assert set(pruner.active) == {"a/kernel", "b/kernel"}  # gradients are needed for the producers only
    grads = {}
    for name in pruner.active:
        shape = variables[name].shape
        taylor = np.ones(shape)
        taylor[..., 2] = 0.0 if name == "a/kernel" else 0.5  # channel 2: lowest summed Taylor score
        grads[name] = GradientStats(abs_grad=np.ones(shape), abs_taylor=taylor, batches=1, samples=8)
    with pytest.raises(ValueError, match="needs gradients"):
        pruner.prune(1.0)
    pruner.prune(1.0, grads)
    assert pruner.group_keep()["add"].tolist() == [True, True, False, True]


def test_unconnected_producers_leave_their_group_whole() -> None:
    variables, groups = _residual()
    pruner = _pruner(variables, groups, criterion="gradient")
    grads = {
        n: GradientStats(np.zeros(variables[n].shape), np.zeros(variables[n].shape), 1, 8, connected=False)
        for n in pruner.active
    }
    pruner.prune(1.0, grads)
    assert pruner.group_keep() == {}
    assert "cannot score it" in {r["id"]: r for r in pruner.structure_groups()}["add"]["reason"]
    assert variables["a/kernel"].numpy().all()


def test_global_lamp_pools_channels_over_groups_and_keeps_each_groups_best() -> None:
    rng = np.random.default_rng(1)
    variables = {
        "p/kernel": _var(rng.normal(size=(4, 6)) * 100.0),  # large scale: raw scores would spare it
        "q/kernel": _var(rng.normal(size=(6, 10))),
        "r/kernel": _var(rng.normal(size=(10, 3))),
    }
    groups = [
        ChannelGroup("p", 6, [Member("p/kernel", 1, "producer"), Member("q/kernel", 0, "consumer")]),
        ChannelGroup("q", 10, [Member("q/kernel", 1, "producer"), Member("r/kernel", 0, "consumer")]),
    ]
    pruner = _pruner(variables, groups, scope="global", target=0.5, normalization="lamp")
    pruner.prune(1.0)
    keep = pruner.group_keep()
    assert int((~keep["p"]).sum() + (~keep["q"]).sum()) == 8  # round(0.5 * 16) channels over both groups
    assert keep["p"].any() and keep["q"].any()
    assert (~keep["p"]).any()  # LAMP makes the large-scale group compete
    q = variables["q/kernel"].numpy()
    assert not q[~keep["p"], :].any() and not q[:, ~keep["q"]].any()
    assert not variables["r/kernel"].numpy()[~keep["q"], :].any()
    report = {r.name: r for r in pruner.report()}
    assert report["r/kernel"].skipped is None and report["r/kernel"].groups_total is None  # consumer only
    assert report["q/kernel"].groups_removed == int((~keep["q"]).sum())


def test_layer_scope_targets_per_group_and_fixed_override() -> None:
    rng = np.random.default_rng(2)
    variables = {"p/kernel": _var(rng.normal(size=(4, 8))), "q/kernel": _var(rng.normal(size=(8, 8)))}
    groups = [
        ChannelGroup("p", 8, [Member("p/kernel", 1, "producer"), Member("q/kernel", 0, "consumer")]),
        ChannelGroup("q", 8, [Member("q/kernel", 1, "producer")]),
    ]
    selected = dict(variables)
    pruner = GroupPruner(
        groups,
        selected,
        {"p/kernel": 0.25, "q/kernel": 0.5},
        "global",
        get_criterion("magnitude"),
        global_target=0.5,
        fixed={"p/kernel": 0.25},
        model_variables=variables,
    )
    pruner.prune(1.0)
    keep = pruner.group_keep()
    assert int((~keep["p"]).sum()) == 2  # fixed at 0.25 of 8
    assert int((~keep["q"]).sum()) == 4  # pooled alone at 0.5


def test_flatten_positions_zero_the_rows_a_channel_feeds() -> None:
    rng = np.random.default_rng(3)
    # conv with 3 channels on a 2x2 map, flattened (h, w, c order) into a dense of 12 inputs.
    variables = {
        "conv/kernel": _var(rng.normal(size=(3, 3, 1, 3))),
        "dense/kernel": _var(rng.normal(size=(12, 2))),
    }
    variables["conv/kernel"].assign(variables["conv/kernel"] * np.array([1.0, 0.01, 1.0], np.float32))
    positions = np.arange(12).reshape(4, 3).T  # channel c at rows c, c+3, c+6, c+9
    groups = [
        ChannelGroup(
            "conv",
            3,
            [Member("conv/kernel", 3, "producer"), Member("dense/kernel", 0, "consumer", positions)],
        )
    ]
    pruner = _pruner(variables, groups, target=1 / 3)
    pruner.prune(1.0)
    assert pruner.group_keep()["conv"].tolist() == [True, False, True]
    dense = variables["dense/kernel"].numpy()
    assert not dense[[1, 4, 7, 10]].any() and dense[[0, 2, 3, 5]].all()


def test_groups_that_cannot_be_trusted_are_left_whole_and_variables_dense() -> None:
    rng = np.random.default_rng(4)
    variables = {
        "p/kernel": _var(rng.normal(size=(4, 6))),
        "q/kernel": _var(rng.normal(size=(6, 5))),
        "lone/kernel": _var(rng.normal(size=(5, 5))),
    }
    groups = [
        ChannelGroup("wrong_axis", 6, [Member("p/kernel", 0, "producer")]),  # axis 0 holds 4, not 6
        ChannelGroup("unknown", 5, [Member("q/kernel", 1, "producer"), Member("ghost", 0, "carrier")]),
    ]
    pruner = GroupPruner(
        groups,
        {"p/kernel": variables["p/kernel"], "lone/kernel": variables["lone/kernel"]},
        {"p/kernel": 0.5, "lone/kernel": 0.5},
        "layer",
        get_criterion("magnitude"),
        model_variables=variables,
    )
    pruner.prune(1.0)
    rows = {r["id"]: r for r in pruner.structure_groups()}
    assert "not the group's 6" in rows["wrong_axis"]["reason"]
    assert "ghost" in rows["unknown"]["reason"]
    assert pruner.skipped["lone/kernel"] == "in no channel group the structure analysis found"
    assert "wrong_axis" in pruner.skipped["p/kernel"]
    assert all(v.numpy().all() for v in variables.values())


def test_unselected_producer_leaves_the_group_whole() -> None:
    variables, groups = _residual()
    selected = {"a/kernel": variables["a/kernel"], "c/kernel": variables["c/kernel"]}  # b excluded
    pruner = GroupPruner(
        groups,
        selected,
        dict.fromkeys(selected, 0.5),
        "layer",
        get_criterion("magnitude"),
        model_variables=variables,
    )
    pruner.prune(1.0)
    assert "b/kernel" in {r["id"]: r for r in pruner.structure_groups()}["add"]["reason"]
    assert variables["a/kernel"].numpy().all()


def test_group_lasso_penalty_acts_on_producer_channels() -> None:
    variables, groups = _residual()
    pruner = _pruner(variables, groups, criterion="l2")
    penalty = pruner.penalty(1.0)
    assert penalty is not None
    a, b = variables["a/kernel"].numpy(), variables["b/kernel"].numpy()
    expected = sum(np.linalg.norm(w[..., c]) for w in (a, b) for c in range(4))
    assert float(penalty()) == pytest.approx(expected, rel=1e-5)
    assert _pruner(variables, groups).penalty(1.0) is None


def test_both_pruners_answer_the_group_questions_without_type_checks() -> None:
    """The stages ask any pruner for its groups; a per-variable pruner answers with the interface's defaults."""
    variables, groups = _residual()
    per_variable = Pruner(
        {"a/kernel": variables["a/kernel"]}, {"a/kernel": 0.5}, "layer", get_criterion("magnitude")
    )
    grouped = _pruner(variables, groups)
    assert PrunerLike in type(per_variable).__mro__ and PrunerLike in type(grouped).__mro__
    assert per_variable.analysis is None and per_variable.structure_groups() == []
    assert per_variable.group_keep() == {} and grouped.unpaired_bias_notes() == []
    assert {r["id"] for r in grouped.structure_groups()} == {"add", "c_out"}
    assert set(grouped.group_keep()) == {"add"}
