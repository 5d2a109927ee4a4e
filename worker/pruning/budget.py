"""Budgets: remove channel groups, least important per unit of cost first, until MACs or parameters are met.

Why: users do not want "50% of channels"; they want half the MACs, fewer than N parameters, or twice the speed
(Torch-Pruning #479, #448; ModelOpt's ``constraints={"flops": "60%"}``). A budget is a *ranking policy* over
the channel groups ``GroupPruner`` already holds, not another pruner:

- **cost of a channel**: the weights its group's members lose with it (a producer's output column, a
  carrier's entry, a consumer's input row), each weighted by how often the kernel is applied per sample
  (``positions``: a conv's output pixels, a Dense over tokens' sequence length) for MACs, or 1 for
  parameters;
- **priority** = the channel's (normalised) importance score / its cost; channels are removed in increasing
  priority, every group keeping at least its best channel (a layer is never emptied);
- **how many**: the smallest prefix of that order whose *exact* cost (kernels' new shapes: a kernel losing
  output channels in one group and input rows in another shrinks on both axes) is within the target; found by
  bisection, so the achieved cost is as close to the budget as whole channels allow;
- a target no removal can reach (every group at one channel is still over it) is ``budget_unreachable``,
  saying what was reachable.

Latency budgets run on top of the MACs policy (``worker.stages.budget``): the MACs fraction is adjusted from
measurements of the compacted model. Numbers in, numbers out: no TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from worker.errors import PipelineError

__all__ = ["UNITS", "BudgetPolicy", "CostModel", "SliceLike"]

# The spec's budget keys (app.schemas.vocabulary.BudgetUnit) -> what the policy counts.
UNITS: dict[str, Literal["macs", "params"]] = {"macs": "macs", "params": "params", "latency": "macs"}
FILL_WINDOW = 512  # channels after the bisection's boundary tried to land nearer the budget


class SliceLike(Protocol):
    """Where channel ``c`` of a group lies in one variable: ``index[c]`` along ``axis``."""

    variable: str
    axis: int
    index: np.ndarray


class GroupSlices(Protocol):
    id: str
    channels: int
    slices: list[SliceLike]
    keep: np.ndarray


@dataclass
class CostModel:
    """The cost of the model for given per-axis removal counts: per variable, ``weight`` (MACs per weight per
    sample, or 1 per parameter) x the product of its (shrunk) dims; variables no group touches are constant."""

    shapes: dict[str, tuple[int, ...]]
    weight: dict[str, float]

    def total(self, removed: Mapping[tuple[str, int], int] | None = None) -> float:
        removed = removed or {}
        cost = 0.0
        for name, shape in self.shapes.items():
            w = self.weight.get(name, 0.0)
            if not w:
                continue
            dims = [max(0, d - removed.get((name, axis), 0)) for axis, d in enumerate(shape)]
            cost += w * float(np.prod(dims, dtype=np.float64))
        return cost

    @classmethod
    def build(
        cls,
        unit: Literal["macs", "params"],
        shapes: Mapping[str, Sequence[int]],
        positions: Mapping[str, float | None],
    ) -> CostModel:
        """``positions``: per kernel, how many times each of its weights is applied per sample (None or absent:
        not counted, as the metrics' ``macs`` leave such kernels out)."""
        shaped = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        if unit == "params":
            return cls(shaped, dict.fromkeys(shaped, 1.0))
        return cls(shaped, {n: float(p) for n, p in positions.items() if p and n in shaped})


@dataclass
class BudgetPolicy:
    """Which channels to remove for a budget: ``target`` in the cost model's unit, absolute (MACs per sample or
    parameters). ``describe`` renders a cost for messages."""

    model: CostModel
    target: float
    unit: str
    describe_unit: str = ""
    _slots: dict[str, list[tuple[tuple[str, int], int]]] = field(default_factory=dict, repr=False)

    @property
    def dense(self) -> float:
        return self.model.total()

    def select(
        self, groups: Sequence[GroupSlices], priority: Mapping[str, np.ndarray], fraction: float = 1.0
    ) -> dict[str, np.ndarray]:
        """Keep vectors per group id reaching ``dense - fraction * (dense - target)``; channels with priority
        ``-inf`` (removed earlier) go first. Raises ``budget_unreachable`` at ``fraction`` 1 when removing
        every channel but each group's best still costs more than the target."""
        dense = self.dense
        goal = dense - min(1.0, max(0.0, fraction)) * (dense - self.target)
        order: list[tuple[float, int, str, int]] = []  # (priority, tie, group id, channel)
        for g in groups:
            p = np.asarray(priority[g.id], dtype=np.float64)
            live = np.flatnonzero(g.keep)
            if live.size == 0:
                continue
            keeper = int(live[np.argmax(p[live])])  # the group's best channel always stays
            for c in range(g.channels):
                if c != keeper:
                    order.append((float(p[c]), c, g.id, c))
        order.sort(key=lambda item: (item[0], item[1], item[2]))
        self._slots = {
            g.id: [((s.variable, s.axis), int(s.index.shape[1])) for s in g.slices] for g in groups
        }

        def removal(n: int) -> dict[tuple[str, int], int]:
            return removal_of(order[:n], self._slots)

        lo, hi = 0, len(order)
        if self.model.total(removal(hi)) > goal:
            reachable = self.model.total(removal(hi))
            if fraction >= 1.0:
                raise PipelineError(
                    "budget_unreachable",
                    f"the budget of {self._show(self.target)} cannot be met without emptying a layer: with every "
                    f"prunable channel group down to one channel the model still has {self._show(reachable)} "
                    f"(dense: {self._show(dense)}). Loosen the budget, or let more layers be pruned "
                    "(include/exclude; groups left whole are listed in metrics.structure.groups)",
                )
            lo = hi
        while lo < hi:  # smallest n whose exact cost is within the goal
            mid = (lo + hi) // 2
            if self.model.total(removal(mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        chosen = order[:lo]
        if lo > 0 and order[lo - 1][0] != -np.inf:
            chosen = self._fill(order, lo, goal, removal)
        keep = {g.id: np.ones(g.channels, dtype=bool) for g in groups}
        for _, _, gid, c in chosen:
            keep[gid][c] = False
        return keep

    def _fill(
        self,
        order: list[tuple[float, int, str, int]],
        n: int,
        goal: float,
        removal: Callable[[int], dict[tuple[str, int], int]],
    ) -> list[tuple[float, int, str, int]]:
        """The prefix of ``n`` items meets the goal, the one of ``n - 1`` does not; the ``n``-th item may be a
        costly channel (an attention head) that overshoots. Closer: from the ``n - 1`` prefix, take the next
        items in priority order while they keep the cost at or above the goal, then the one that lands
        nearest below it (``FILL_WINDOW`` items looked at)."""
        taken = list(order[: n - 1])
        counts = removal(n - 1)

        def cost_with(item: tuple[float, int, str, int]) -> tuple[float, dict[tuple[str, int], int]]:
            trial = dict(counts)
            for key, k in self._slots[item[2]]:
                trial[key] = trial.get(key, 0) + k
            return self.model.total(trial), trial

        finisher: tuple[float, tuple[float, int, str, int], dict[tuple[str, int], int]] | None = None
        closed: set[str] = set()  # a group whose next channel overshot: its later (better) ones stay
        for item in order[n - 1 : n - 1 + FILL_WINDOW]:
            if item[2] in closed:
                continue
            cost, trial = cost_with(item)
            if cost >= goal:
                taken.append(item)
                counts = trial
                if cost == goal:
                    return taken
            else:
                closed.add(item[2])
                if finisher is None or cost > finisher[0]:
                    finisher = (cost, item, trial)
        if finisher is not None and self.model.total(counts) > goal:
            taken.append(finisher[1])
        return taken if self.model.total(removal_of(taken, self._slots)) <= goal else list(order[:n])

    def achieved(self, groups: Sequence[GroupSlices]) -> float:
        """The cost with the groups' current keep vectors."""
        counts: dict[tuple[str, int], int] = {}
        for g in groups:
            removed = int((~np.asarray(g.keep, dtype=bool)).sum())
            for s in g.slices:
                key = (s.variable, s.axis)
                counts[key] = counts.get(key, 0) + removed * int(s.index.shape[1])
        return self.model.total(counts)

    def _show(self, value: float) -> str:
        if self.unit == "params":
            return f"{value:,.0f} parameters"
        dense = self.dense
        return f"{value:,.0f} MACs per sample ({value / dense:.1%} of the dense model)" if dense else "0 MACs"


def removal_of(
    items: Sequence[tuple[float, int, str, int]], slots: Mapping[str, list[tuple[tuple[str, int], int]]]
) -> dict[tuple[str, int], int]:
    """Indices removed per (variable, axis) when the channels ``items`` (priority, tie, group id, channel) go."""
    counts: dict[tuple[str, int], int] = {}
    for _, _, gid, _c in items:
        for key, k in slots[gid]:
            counts[key] = counts.get(key, 0) + k
    return counts


def channel_costs(group: GroupSlices, model: CostModel) -> float:
    """The cost one channel of ``group`` holds in the dense model (its members' slices, weighted)."""
    cost = 0.0
    for s in group.slices:
        shape = model.shapes.get(s.variable)
        w = model.weight.get(s.variable, 0.0)
        if shape is None or not w:
            continue
        rest = float(np.prod(shape, dtype=np.float64)) / max(shape[s.axis], 1)
        cost += w * rest * int(s.index.shape[1])
    return cost
