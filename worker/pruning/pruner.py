"""The pruner: scores live ``tf.Variable`` values, turns scores into keep-masks, writes exact zeros.

It works on plain variables (what ``tf.saved_model.load`` gives back for any SavedModel), not Keras layers.

Scopes (``_SCOPES`` table, one entry per spec ``scope``):
- ``layer``: each variable ``n`` is pruned at ``fraction * targets[n]``.
- ``global``: variables named in ``fixed`` (the spec's ``layer_sparsity`` overrides) are pruned per layer at
  ``fraction * fixed[n]``; all the others are ranked together at ``fraction * global_target``.
  ``global_target`` defaults to the value ``targets`` gives the pooled variables (they must agree).

Masks are monotone, as in tfmot: entries pruned earlier get a score of ``-inf`` (so they are the first chosen
again) and the new mask is AND-ed with the old one, so a schedule whose fraction rises never revives a weight;
asking for a lower fraction later keeps the higher sparsity already reached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import tensorflow as tf

from worker.pruning.criteria import Criterion
from worker.pruning.scope import global_masks, layer_masks

__all__ = ["Pruner"]

Scope = Literal["layer", "global"]


class Pruner:
    """Holds one keep-mask per variable and keeps the variables consistent with it."""

    def __init__(
        self,
        variables: dict[str, tf.Variable],
        targets: dict[str, float],
        scope: Scope,
        criterion: Criterion,
        *,
        global_target: float | None = None,
        fixed: dict[str, float] | None = None,
    ) -> None:
        if scope not in _SCOPES:
            raise ValueError(f"unknown scope {scope!r}; known scopes: {', '.join(sorted(_SCOPES))}")
        missing = [name for name in variables if name not in targets]
        if missing:
            raise ValueError(f"no target for variable(s): {', '.join(missing)}")
        self.variables = dict(variables)
        self.targets = {name: float(targets[name]) for name in variables}
        self.scope: Scope = scope
        self.criterion = criterion
        self.fixed = {name: float(t) for name, t in (fixed or {}).items()}
        unknown = [name for name in self.fixed if name not in variables]
        if unknown:
            raise ValueError(f"fixed targets for unknown variable(s): {', '.join(unknown)}")
        self.global_target = self._pooled_target(global_target) if scope == "global" else None
        self._masks = {name: np.ones(var.shape, dtype=bool) for name, var in variables.items()}
        self._mask_tensors: dict[str, tf.Tensor] = {}

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Current keep-masks (True = kept), one boolean array per variable, shaped like it."""
        return dict(self._masks)

    def prune(self, fraction: float, grads: dict[str, np.ndarray] | None = None) -> None:
        """Recompute masks at ``fraction`` (0..1) of every target from current values; zero the variables.

        ``grads`` (same names and shapes as the variables) is required by criteria with ``needs_gradients``.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be within [0, 1], got {fraction!r}")
        if self.criterion.needs_gradients and grads is None:
            raise ValueError(f"criterion {self.criterion.name!r} needs gradients: pass grads=")
        scores: dict[str, np.ndarray] = {}
        for name, var in self.variables.items():
            score = np.asarray(self.criterion.score(var.numpy(), None if grads is None else grads[name]))
            if score.shape != tuple(var.shape):
                raise ValueError(
                    f"criterion {self.criterion.name!r} returned shape {score.shape} "
                    f"for {name} of shape {tuple(var.shape)}"
                )
            if not np.issubdtype(score.dtype, np.floating):  # ints, bfloat16: -inf must be representable
                score = score.astype(np.float32)
            scores[name] = np.where(self._masks[name], score, -np.inf)  # pruned stay pruned
        new = _SCOPES[self.scope](self, scores, fraction)
        self._masks = {name: new[name] & self._masks[name] for name in self.variables}
        self._mask_tensors = {name: tf.constant(mask) for name, mask in self._masks.items()}
        self.apply_masks()

    def apply_masks(self) -> None:
        """Write exact zeros where masks say so (call after every optimizer step: updates revive weights).

        ``tf.where`` rather than ``var * mask``: the result is +0.0 even for inf/NaN or negative weights.
        """
        for name, mask in self._mask_tensors.items():
            var = self.variables[name]
            var.assign(tf.where(mask, var, tf.zeros_like(var)))

    def sparsity(self) -> dict[str, float]:
        """Measured from the variables, not the masks: fraction of entries that are exactly zero."""
        result: dict[str, float] = {}
        for name, var in self.variables.items():
            size = int(np.prod(var.shape))
            nonzero = int(tf.math.count_nonzero(var).numpy()) if size else 0
            result[name] = (size - nonzero) / size if size else 0.0
        return result

    def _pooled_target(self, global_target: float | None) -> float:
        if global_target is not None:
            return float(global_target)
        pooled = {t for name, t in self.targets.items() if name not in self.fixed}
        if len(pooled) > 1:
            raise ValueError(
                "global scope: pooled variables have different targets; pass global_target= and put the "
                "per-variable overrides in fixed="
            )
        return pooled.pop() if pooled else 0.0

    def _layer(self, scores: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
        return layer_masks(scores, {name: fraction * t for name, t in self.targets.items()})

    def _global(self, scores: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
        assert self.global_target is not None
        fixed = {name: fraction * t for name, t in self.fixed.items()}
        return global_masks(scores, fraction * self.global_target, fixed)


_SCOPES: dict[str, Callable[[Pruner, dict[str, np.ndarray], float], dict[str, np.ndarray]]] = {
    "layer": Pruner._layer,
    "global": Pruner._global,
}
