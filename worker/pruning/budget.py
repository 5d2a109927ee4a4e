"""Budgets: remove channel groups along the pruner's ranking until MACs or parameters are met.

Why: users do not want "50% of channels"; they want half the MACs, fewer than N parameters, or twice the speed
(Torch-Pruning #479, #448; ModelOpt's ``constraints={"flops": "60%"}``). A budget is a *policy* over the channel
groups ``GroupPruner`` already ranks, not another pruner:

- **the order** is the spec's own ranking (criterion, ``scope``, ``normalization``), as for
  ``target_sparsity``; each group keeps its best channel (a layer is never emptied);
- **the cost** of a state is exact: every variable's shape shrunk by the indices its groups' removed channels
  hold (a kernel losing output channels in one group and input rows in another shrinks on both axes), each
  weight weighted by how often its kernel runs per sample (``positions``: a conv's output pixels, a Dense over
  tokens' sequence length; the metrics' ``macs``) or by 1 (parameters);
- **how far** along the ranking: bisection on the fraction of it, the smallest whose cost is within the
  budget;
- a target the end of the ranking cannot reach is ``budget_unreachable``, saying what was reachable.

Ranking channels by importance *per unit of cost* instead was measured first and is not used: on ResNet-50
at 64x64 it took every early-stage group down to one channel (their weights run at 64x the positions of the
last stage's), and on a transformer it removed either all heads or none depending on how a channel's
importance was scaled. Latency budgets run on top of the MACs policy (``worker.stages.budget``). Numbers in,
numbers out: no TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from worker.errors import PipelineError

__all__ = ["UNITS", "BudgetPolicy", "CostModel", "SliceLike"]

# The spec's budget keys (app.schemas.vocabulary.BudgetUnit) -> what the policy counts.
UNITS: dict[str, Literal["macs", "params"]] = {"macs": "macs", "params": "params", "latency": "macs"}
T_MAX = 1.0 - 1e-9  # the end of a ranking: below 1, every group keeps its best channel
BISECTION_STEPS = 40  # on the fraction of the ranking: far below one channel of any model


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
    parameters); messages render costs in that unit."""

    model: CostModel
    target: float
    unit: str

    @property
    def dense(self) -> float:
        return self.model.total()

    def cost(self, groups: Sequence[GroupSlices], keep: Mapping[str, np.ndarray] | None = None) -> float:
        """The exact cost with each group's channels kept where ``g.keep`` (and ``keep[g.id]``, if given)
        hold: every kernel shrinks on each axis by the removed channels' indices."""
        counts: dict[tuple[str, int], int] = {}
        for g in groups:
            kept = np.asarray(g.keep, dtype=bool)
            if keep is not None and g.id in keep:
                kept = kept & np.asarray(keep[g.id], dtype=bool)
            removed = int((~kept).sum())
            if not removed:
                continue
            for s in g.slices:
                key = (s.variable, s.axis)
                counts[key] = counts.get(key, 0) + removed * int(s.index.shape[1])
        return self.model.total(counts)

    def along(
        self,
        groups: Sequence[GroupSlices],
        at: Callable[[float], dict[str, np.ndarray]],
        fraction: float = 1.0,
    ) -> dict[str, np.ndarray]:
        """Keep vectors reaching ``dense - fraction * (dense - target)``: ``at(t)`` is the pruner's own
        selection at ``t`` of the way along its ranking (monotone: a larger ``t`` removes a superset), and the
        smallest ``t`` whose exact cost is within the goal wins (bisection). Raises ``budget_unreachable`` at
        ``fraction`` 1 when even the end of the ranking (each group down to its best channel) costs more."""
        dense = self.dense
        goal = dense - min(1.0, max(0.0, fraction)) * (dense - self.target)
        end = at(T_MAX)
        reachable = self.cost(groups, end)
        if reachable > goal:
            if fraction >= 1.0:
                raise PipelineError(
                    "budget_unreachable",
                    f"the budget of {self._show(self.target)} cannot be met without emptying a layer: with every "
                    f"prunable channel group down to one channel the model still has {self._show(reachable)} "
                    f"(dense: {self._show(dense)}). Loosen the budget, or let more layers be pruned "
                    "(include/exclude; groups left whole are listed in metrics.structure.groups)",
                )
            return end
        lo, hi, best = 0.0, T_MAX, end
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            keep = at(mid)
            if self.cost(groups, keep) <= goal:
                hi, best = mid, keep
            else:
                lo = mid
        return best

    def _show(self, value: float) -> str:
        if self.unit == "params":
            return f"{value:,.0f} parameters"
        dense = self.dense
        return f"{value:,.0f} MACs per sample ({value / dense:.1%} of the dense model)" if dense else "0 MACs"
