"""The one interface the stages see: what a pruner holds, does and reports, per variable or per channel group.

Two pruners implement it: ``pruner.Pruner`` (each variable alone, by its granularity) and
``group_pruner.GroupPruner`` (the coupled channel groups ``worker.structure`` reads from the graph). Both
subclass ``PrunerLike`` and so inherit its defaults, which describe a pruner that read no graph: no
``analysis``, no ``structure_groups`` rows, no ``group_keep`` and no notes on unpaired biases. A stage asks
these, never which class it holds (as Torch-Pruning keeps hooks on its base pruner rather than special-casing
one kind inside the loop).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from worker.pruning.criteria import Criterion, GradInput
from worker.pruning.granularity import Granularity, Kind

__all__ = ["PrunerLike", "VariableReport"]


@dataclass(frozen=True)
class VariableReport:
    """What happened to one variable, for the metrics' ``layers`` entry and ``notes``."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    granularity: str  # the spec's spelling: "unstructured", "channel", "2:4", "block 4x4"
    target: float
    sparsity: float  # measured: exact zeros / size
    groups_total: int | None = None  # channels or blocks (None for unstructured and N:M)
    groups_removed: int | None = None
    group_noun: str | None = None  # "channels" or "blocks"
    bias: str | None = None  # the paired bias zeroed with removed channels
    skipped: str | None = None  # why the variable was left dense
    notes: list[str] = field(default_factory=list)
    method: str | None = None  # calibration criteria: which method pruned it ("sparsegpt", or "magnitude")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``channels_removed``/``channels_total`` (or ``blocks_*``) only where meaningful."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "granularity": self.granularity,
            "target": self.target,
            "sparsity": self.sparsity,
        }
        if self.group_noun is not None and self.groups_total is not None:
            out[f"{self.group_noun}_removed"] = self.groups_removed
            out[f"{self.group_noun}_total"] = self.groups_total
        if self.bias is not None:
            out["bias"] = self.bias
        if self.skipped is not None:
            out["skipped"] = self.skipped
        if self.method is not None:
            out["method"] = self.method
        return out


class PrunerLike(Protocol):
    """Keep-masks over live ``tf.Variable`` values, recomputed by ``prune`` and held by ``apply_masks``."""

    variables: dict[str, tf.Variable]  # the selected variables by name
    targets: dict[str, float]
    criterion: Criterion
    kinds: dict[str, Kind]
    shapes: dict[str, tuple[int, ...]]
    granularities: dict[str, Granularity]
    biases: dict[str, str]  # kernel -> the bias paired with it by name (zeroed with its channels)
    analysis: Any = None  # the GroupAnalysis the pruner's groups came from (the compaction reuses it)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Keep-masks of the selected variables (True = kept), shaped like them."""
        ...

    @property
    def bias_masks(self) -> dict[str, np.ndarray]:
        """Keep-masks of the other variables the pruner zeroes (paired biases, group carriers)."""
        ...

    @property
    def active(self) -> list[str]:
        """The selected variables whose scores decide what is removed, in the given order."""
        ...

    def prune(
        self,
        fraction: float,
        grads: Mapping[str, GradInput] | None = None,
        calibration: Mapping[str, Any] | None = None,
    ) -> None:
        """Recompute the masks at ``fraction`` (0..1) of every target and write the zeros (``calibration``:
        per-variable statistics for criteria with ``needs_calibration``)."""
        ...

    def layer_targets(self, fraction: float = 1.0) -> dict[str, float]:
        """Each active variable's target at ``fraction`` (what a per-layer criterion such as SparseGPT prunes it
        at): ``fraction * targets[name]`` unless the pruner allocates them (``Pruner`` in global scope)."""
        return {name: fraction * self.targets[name] for name in self.active}

    def apply_masks(self) -> None:
        """Write the zeros again (after an optimizer step)."""
        ...

    def penalty(self, strength: float) -> Callable[[], tf.Tensor] | None:
        """The criterion's regularisation term over the active variables, or None."""
        ...

    def report(self) -> list[VariableReport]:
        """One report per selected variable."""
        ...

    def notes(self) -> list[str]:
        """Lines for the metrics' ``notes``."""
        ...

    def structure_groups(self) -> list[dict[str, Any]]:
        """The metrics' ``structure.groups`` rows: none without a channel-group analysis."""
        return []

    def group_keep(self) -> dict[str, np.ndarray]:
        """Kept channels per group id, for the compaction: none without a channel-group analysis."""
        return {}

    def unpaired_bias_notes(self) -> list[str]:
        """Channel-pruned kernels whose layer bias (if any) is not zeroed with them: none by default."""
        return []
