"""The budget policy on hand-made groups: exact costs of shrunk kernels, the cheapest importance per cost
removed first, the target met as closely as whole channels allow, and an unreachable budget refused with what
was reachable. Numbers only: no TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from worker.errors import PipelineError
from worker.pruning.budget import BudgetPolicy, CostModel, channel_costs


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


def test_cost_model_counts_shrunk_kernels_exactly() -> None:
    model, _ = _mlp()
    assert model.total() == 8 * 16 * 10 + 16 * 32 + 32 * 4
    # b loses 4 input rows (g1) and 8 output columns (g2): 12 x 24, not 16 x 32 - 4 x 32 - 8 x 16.
    assert model.total({("a", 1): 4, ("a_bias", 0): 4, ("b", 0): 4, ("b", 1): 8, ("c", 0): 8}) == (
        8 * 12 * 10 + 12 * 24 + 24 * 4
    )
    params = CostModel.build("params", {"a": (8, 16), "a_bias": (16,)}, {})
    assert params.total({("a_bias", 0): 6}) == 128 + 10


def test_policy_meets_the_budget_cheapest_priority_first() -> None:
    model, groups = _mlp()
    dense = model.total()
    policy = BudgetPolicy(model, 0.5 * dense, "macs")
    rng = np.random.default_rng(0)
    priority = {g.id: rng.random(g.channels) / channel_costs(g, model) for g in groups}
    keep = policy.select(groups, priority)
    for g in groups:
        g.keep = keep[g.id]
    achieved = policy.achieved(groups)
    assert achieved <= 0.5 * dense
    # Within one channel's cost of the goal: the most expensive single channel is g1's (8*10 + 32 MACs).
    assert achieved > 0.5 * dense - (8 * 10 + 32)
    for g in groups:  # inside a group, lower priority goes first; the best channel always stays
        p = priority[g.id]
        assert keep[g.id][np.argmax(p)]
        assert p[~keep[g.id]].max(initial=-np.inf) <= p[keep[g.id]].min()


def test_earlier_removals_stay_and_fractions_ramp() -> None:
    model, groups = _mlp()
    dense = model.total()
    policy = BudgetPolicy(model, 0.4 * dense, "macs")
    priority = {g.id: np.linspace(1, 2, g.channels) for g in groups}
    priority["g2"][5] = -np.inf  # removed earlier
    half = policy.select(groups, priority, fraction=0.5)
    assert not half["g2"][5]
    for g in groups:
        g.keep = half[g.id]
    assert 0.4 * dense < policy.achieved(groups) <= 0.7 * dense


def test_unreachable_budget_says_what_was_reachable() -> None:
    model, groups = _mlp()
    policy = BudgetPolicy(model, 10.0, "macs")
    priority = {g.id: np.ones(g.channels) for g in groups}
    with pytest.raises(PipelineError) as info:
        policy.select(groups, priority)
    assert info.value.code == "budget_unreachable"
    floor = 8 * 1 * 10 + 1 * 1 + 1 * 4  # every group down to one channel
    assert f"{floor:,} MACs" in info.value.message
    partial = policy.select(groups, priority, fraction=0.5)  # on the way there: as far as it goes
    assert all(k.sum() >= 1 for k in partial.values())
