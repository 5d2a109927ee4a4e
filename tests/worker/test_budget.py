"""The budget policy on hand-made groups: exact costs of shrunk kernels, the ranking gone along just as far as
the budget needs, and an unreachable budget refused with what was reachable. Numbers only: no TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from worker.errors import PipelineError
from worker.pruning.budget import BudgetPolicy, CostModel


@dataclass
class _Slice:
    variable: str
    axis: int
    index: np.ndarray


@dataclass
class _Group:
    id: str
    channels: int
    slices: list[_Slice]
    keep: np.ndarray = field(default_factory=lambda: np.ones(0, bool))

    def __post_init__(self) -> None:
        if self.keep.size == 0:
            self.keep = np.ones(self.channels, bool)


def _ident(n: int) -> np.ndarray:
    return np.arange(n).reshape(n, 1)


def _mlp() -> tuple[CostModel, list[_Group]]:
    """x(8) -> a[8, 16] -> b[16, 32] -> c[32, 4]; a's 16 and b's 32 outputs are the groups; a is applied at 10
    positions, b and c once (as MACs count them)."""
    shapes = {"a": (8, 16), "a_bias": (16,), "b": (16, 32), "c": (32, 4)}
    model = CostModel.build("macs", shapes, {"a": 10, "b": 1, "c": 1})
    g1 = _Group("g1", 16, [_Slice("a", 1, _ident(16)), _Slice("a_bias", 0, _ident(16)), _Slice("b", 0, _ident(16))])
    g2 = _Group("g2", 32, [_Slice("b", 1, _ident(32)), _Slice("c", 0, _ident(32))])
    return model, [g1, g2]


def _uniform(groups: list[_Group]):
    """The layer-scope selection: each group drops round(t * n) of its lowest channels, keeping one."""

    def at(t: float) -> dict[str, np.ndarray]:
        out = {}
        for g in groups:
            keep = np.ones(g.channels, bool)
            keep[: min(g.channels - 1, round(t * g.channels))] = False
            out[g.id] = keep
        return out

    return at


def test_cost_model_counts_shrunk_kernels_exactly() -> None:
    model, groups = _mlp()
    assert model.total() == 8 * 16 * 10 + 16 * 32 + 32 * 4
    # b loses 4 input rows (g1) and 8 output columns (g2): 12 x 24, not 16 x 32 - 4 x 32 - 8 x 16.
    assert model.total({("a", 1): 4, ("a_bias", 0): 4, ("b", 0): 4, ("b", 1): 8, ("c", 0): 8}) == (
        8 * 12 * 10 + 12 * 24 + 24 * 4
    )
    policy = BudgetPolicy(model, 0.0, "macs")
    keep = {"g1": np.arange(16) >= 4, "g2": np.arange(32) >= 8}
    assert policy.cost(groups, keep) == 8 * 12 * 10 + 12 * 24 + 24 * 4
    params = CostModel.build("params", {"a": (8, 16), "a_bias": (16,)}, {})
    assert params.total({("a_bias", 0): 6}) == 128 + 10


def test_policy_goes_just_as_far_as_the_budget() -> None:
    model, groups = _mlp()
    dense = model.total()
    policy = BudgetPolicy(model, 0.5 * dense, "macs")
    at = _uniform(groups)
    keep = policy.along(groups, at)
    cost = policy.cost(groups, keep)
    assert cost <= 0.5 * dense
    smaller = {g: k.copy() for g, k in keep.items()}  # one channel fewer removed anywhere: over budget
    for gid, k in smaller.items():
        nxt = smaller.copy()
        nxt[gid] = k.copy()
        nxt[gid][np.flatnonzero(~k).max()] = True
        assert policy.cost(groups, nxt) > 0.5 * dense or not (~k).any()


def test_fractions_ramp_and_earlier_removals_count() -> None:
    model, groups = _mlp()
    dense = model.total()
    policy = BudgetPolicy(model, 0.4 * dense, "macs")
    at = _uniform(groups)
    half = policy.cost(groups, policy.along(groups, at, fraction=0.5))
    assert 0.4 * dense < half <= 0.7 * dense
    groups[1].keep[:16] = False  # removed earlier: already part of the cost
    assert policy.cost(groups) < dense
    assert policy.cost(groups, policy.along(groups, at)) <= 0.4 * dense


def test_unreachable_budget_says_what_was_reachable() -> None:
    model, groups = _mlp()
    policy = BudgetPolicy(model, 10.0, "macs")
    with pytest.raises(PipelineError) as info:
        policy.along(groups, _uniform(groups))
    assert info.value.code == "budget_unreachable"
    floor = 8 * 1 * 10 + 1 * 1 + 1 * 4  # every group down to one channel
    assert f"{floor:,} MACs" in info.value.message
    partial = policy.along(groups, _uniform(groups), fraction=0.5)  # on the way there: as far as it goes
    assert all(k.sum() >= 1 for k in partial.values())
