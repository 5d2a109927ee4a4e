"""The pruner: scores live ``tf.Variable`` values, turns scores into keep-masks, writes exact zeros.

It works on plain variables (what ``tf.saved_model.load`` gives back for any SavedModel), not Keras layers.
Each variable has a *kind* (``granularity.infer_kind``: dense, conv, depthwise, ...) and a *granularity*
(unstructured, channel, N:M, block); a granularity that has no meaning for a kind leaves the variable dense
and says why (``skipped``), so the pipeline can put the reason in the metrics' notes.

Scopes (one per spec ``scope``):
- ``layer``: each variable ``n`` is pruned at ``fraction * targets[n]`` by its granularity.
- ``global``: variables named in ``fixed`` (the spec's ``layer_sparsity`` overrides), and variables whose
  granularity is not rankable (N:M: a local pattern by definition), are pruned per layer at
  ``fraction * their target``; all the others are ranked together at ``fraction * global_target``: their
  groups' scores (elements, channels, blocks) are normalised per variable (``normalization.py``) and pooled.
  ``global_target`` defaults to the value ``targets`` gives the pooled variables (they must agree).
  A criterion whose statistics fix each variable's mask (``per_layer_masks``: SparseGPT) is not pooled: each
  variable is pruned at the sparsity the magnitude global ranking allocates it (``layer_targets``).

Masks are monotone, as in tfmot: entries pruned earlier get a score of ``-inf`` (so they are the first chosen
again) and the new mask is AND-ed with the old one, so a schedule whose fraction rises never revives a weight;
asking for a lower fraction later keeps the higher sparsity already reached. With ``channel`` granularity the
bias entry of a removed channel is masked too (when Keras naming pairs a bias, see ``paired_bias``), and
``apply_masks`` keeps it zero through fine-tuning.

Memory: a one-shot job on a 1 B-parameter model must fit beside the loaded weights, so ``prune`` handles one
variable at a time in layer scope (a view of its value, its score, its mask, its zeros written) and keeps only
the boolean masks; global scope keeps each variable's group scores (the element scores when unstructured).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from worker.pruning.criteria import Criterion, GradientStats, GradInput
from worker.pruning.granularity import (
    NM,
    Granularity,
    Kind,
    Unstructured,
    bias_keep_mask,
    infer_kinds,
    nm_achieved_sparsity,
    paired_bias,
)
from worker.pruning.interface import PrunerLike, VariableReport
from worker.pruning.normalization import get_normalization
from worker.pruning.regularization import penalty_fn
from worker.pruning.scope import select_groups

__all__ = ["Pruner", "variable_view"]

Scope = Literal["layer", "global"]


class Pruner(PrunerLike):
    """Holds one keep-mask per variable (and per paired bias) and keeps the variables consistent with it."""

    def __init__(
        self,
        variables: dict[str, tf.Variable],
        targets: dict[str, float],
        scope: Scope,
        criterion: Criterion,
        *,
        global_target: float | None = None,
        fixed: dict[str, float] | None = None,
        granularity: Granularity | Mapping[str, Granularity] | None = None,
        normalization: str = "none",
        kinds: Mapping[str, Kind] | None = None,
        model_variables: Mapping[str, tf.Variable] | None = None,
        skip: Mapping[str, str] | None = None,
    ) -> None:
        """``granularity``: one for all variables or one per variable (default unstructured).
        ``kinds``: overrides of the inferred kinds. ``model_variables``: every variable of the model by name,
        where paired biases are looked up (and their shapes refine kind inference). ``skip``: variables to
        leave dense, with the reason to report (e.g. the output layer under channel granularity)."""
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
        unknown = [name for name in [*self.fixed, *(skip or {}), *(kinds or {})] if name not in variables]
        if unknown:
            raise ValueError(f"fixed targets, kinds or skips for unknown variable(s): {', '.join(unknown)}")
        self.global_target = self._pooled_target(global_target) if scope == "global" else None
        self.normalization = normalization
        self._normalize = get_normalization(normalization)

        if granularity is None or isinstance(granularity, Granularity):
            single = granularity or Unstructured()
            self.granularities = {name: single for name in variables}
        else:
            absent = [name for name in variables if name not in granularity]
            if absent:
                raise ValueError(f"no granularity for variable(s): {', '.join(absent)}")
            self.granularities = {name: granularity[name] for name in variables}

        others = dict(model_variables or {})
        shapes = {name: tuple(int(d) for d in var.shape) for name, var in variables.items()}
        self.shapes = shapes
        inferred = infer_kinds(shapes, {n: tuple(int(d) for d in v.shape) for n, v in others.items()})
        self.kinds: dict[str, Kind] = {**inferred, **dict(kinds or {})}
        self.skipped: dict[str, str] = {}
        for name in variables:
            reason = (skip or {}).get(name) or self.granularities[name].skip_reason(
                self.kinds[name], shapes[name]
            )
            if reason is not None:
                self.skipped[name] = reason

        # Paired biases, only where the granularity removes output channels that own one bias entry each.
        self.biases: dict[str, str] = {}
        self._bias_vars: dict[str, tf.Variable] = {}
        all_names = {*others, *variables}
        for name in variables:
            gran, kind = self.granularities[name], self.kinds[name]
            if name in self.skipped or not gran.zeroes_bias(kind):
                continue
            bias = paired_bias(name, all_names)
            if bias is None or bias in variables:  # a bias being pruned itself keeps its own mask
                continue
            bias_var = others[bias]
            layout = gran.layout(kind, shapes[name])
            if int(np.prod(bias_var.shape)) == layout.n_groups:
                self.biases[name] = bias
                self._bias_vars[bias] = bias_var

        self._masks = {name: np.ones(var.shape, dtype=bool) for name, var in variables.items()}
        self._bias_masks = {bias: np.ones(var.shape, dtype=bool) for bias, var in self._bias_vars.items()}
        self._mask_tensors: dict[str, tf.Tensor] = {}
        self._apply: tuple[list[str], Any] | None = None  # (names, compiled assign), see apply_masks
        # Calibration criteria: the statistics of the current prune, and which method scored each variable
        # (the criterion, or "magnitude" where it had no statistics): the metrics' per-layer ``method``.
        self._calibration: Mapping[str, Any] = {}
        self.methods: dict[str, str] = {}
        # Global scope with a per-layer-mask criterion: (fraction, per-variable targets) from ``layer_targets``.
        self._allocated: tuple[float, dict[str, float]] | None = None

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Current keep-masks (True = kept), one boolean array per variable, shaped like it."""
        return dict(self._masks)

    @property
    def bias_masks(self) -> dict[str, np.ndarray]:
        """Keep-masks of the paired biases (by bias name): False where the channel was removed."""
        return dict(self._bias_masks)

    @property
    def active(self) -> list[str]:
        """Variables that are pruned (not skipped), in the given order."""
        return [name for name in self.variables if name not in self.skipped]

    def prune(
        self,
        fraction: float,
        grads: Mapping[str, GradInput] | None = None,
        calibration: Mapping[str, Any] | None = None,
    ) -> None:
        """Recompute masks at ``fraction`` (0..1) of every target from current values; zero the variables.

        ``calibration`` (by variable name) is read by criteria with ``needs_calibration``: the statistics
        ``worker.stages.calibration`` collected (a variable without any is scored by magnitude, and its
        ``method`` says so).

        ``grads`` (by variable name) is required by criteria with ``needs_gradients``: a ``GradientStats``
        from ``gradients.accumulate_gradients`` (or a gradient array shaped like the variable). A variable
        whose statistics say the loss does not depend on it (``connected=False``, e.g. another output's head)
        cannot be ranked by gradients: it is left dense and reported as skipped rather than pruned by ties.
        """
        check_prune_args(self.criterion, fraction, grads)
        self._calibration = calibration or {}
        if self.criterion.needs_calibration:
            for name in self.active:
                self.methods[name] = self.criterion.name if name in self._calibration else "magnitude"
        if self.criterion.needs_gradients and grads is not None:
            for name in self.active:
                stats = grads.get(name)
                if isinstance(stats, GradientStats) and not stats.connected and self._masks[name].all():
                    self.skipped[name] = (
                        f"the loss does not depend on it: criterion {self.criterion.name!r} cannot score it"
                    )
        if self.scope == "layer" or self.criterion.per_layer_masks:  # one variable at a time
            targets = self.layer_targets(fraction)
            for name in self.active:
                score = self._alone(name, self._score(name, grads))
                self._set_mask(name, self._own_mask(name, score, targets[name]))
        else:
            for name, mask in self._global(lambda name: self._score(name, grads), fraction).items():
                self._set_mask(name, mask)
        self._mask_tensors = {}  # rebuilt by apply_masks only when fine-tuning asks for them

    def _score(self, name: str, grads: Mapping[str, GradInput] | None) -> np.ndarray:
        """The criterion's scores of one variable; NaN and already-pruned entries become ``-inf``.

        Read from a view of the variable, copied only where entries must change: every full-model copy here
        is one more model's worth of worker memory (a 1 B-parameter model is 4 GB)."""
        var = self.variables[name]
        if self.criterion.needs_calibration:
            grad: Any = self._calibration.get(name)
        else:
            grad = None if grads is None else grads[name]
        weight = variable_view(var)
        if self.criterion.uses_name:
            score = np.asarray(self.criterion.score(weight, grad, name=name))
        else:
            score = np.asarray(self.criterion.score(weight, grad))
        if score.shape != tuple(var.shape):
            raise ValueError(
                f"criterion {self.criterion.name!r} returned shape {score.shape} "
                f"for {name} of shape {tuple(var.shape)}"
            )
        if not np.issubdtype(score.dtype, np.floating):  # ints, bfloat16: -inf must be representable
            score = score.astype(np.float32)
        lowest = np.isnan(score)  # a NaN weight is the first thing to remove
        np.logical_or(lowest, ~self._masks[name], out=lowest)  # pruned stay pruned
        return np.where(lowest, -np.inf, score) if lowest.any() else score

    def _alone(self, name: str, score: np.ndarray) -> np.ndarray:
        """Scores of a variable ranked on its own (the criterion's ``layer_scores``: Wanda per output unit)."""
        return self.criterion.layer_scores(score, self._calibration.get(name))

    def _set_mask(self, name: str, mask: np.ndarray) -> None:
        """AND the new mask in (masks only grow), derive the paired bias's, and write the zeros now."""
        self._masks[name] = mask & self._masks[name]
        _zero_where_pruned(self.variables[name], self._masks[name])
        bias = self.biases.get(name)
        if bias is not None:
            layout = self.granularities[name].layout(self.kinds[name], self.shapes[name])
            keep = bias_keep_mask(layout, self._masks[name], self._bias_masks[bias].shape)
            if keep is not None:
                self._bias_masks[bias] &= keep
                _zero_where_pruned(self._bias_vars[bias], self._bias_masks[bias])

    def apply_masks(self) -> None:
        """Write exact zeros where masks say so (call after every optimizer step: updates revive weights).

        ``tf.where`` rather than ``var * mask``: the result is +0.0 even for inf/NaN or negative weights.
        """
        if not self._mask_tensors:  # built on first use after a prune (one-shot jobs never need them)
            self._mask_tensors = {name: tf.constant(self._masks[name]) for name in self.active}
            self._mask_tensors.update({bias: tf.constant(mask) for bias, mask in self._bias_masks.items()})
        names = list(self._mask_tensors)
        if self._apply is None or self._apply[0] != names:
            self._apply = (names, self._compiled_apply(names))
        self._apply[1]([self._mask_tensors[name] for name in names])

    def _compiled_apply(self, names: list[str]) -> Any:
        """A new set of variables builds a new function (``compiled_mask_assign`` says why one graph)."""
        targets = []
        for name in names:
            var = self.variables.get(name)
            targets.append(self._bias_vars[name] if var is None else var)
        return compiled_mask_assign(targets)

    def sparsity(self) -> dict[str, float]:
        """Measured from the variables, not the masks: fraction of entries that are exactly zero."""
        result: dict[str, float] = {}
        for name, var in self.variables.items():
            size = int(np.prod(var.shape))
            nonzero = int(np.count_nonzero(variable_view(var))) if size else 0
            result[name] = (size - nonzero) / size if size else 0.0
        return result

    def penalty(self, strength: float) -> Callable[[], tf.Tensor] | None:
        """The criterion's regularisation penalty over the pruned variables, for ``fine_tune(penalty=...)``.

        None when the criterion has no ``regularizer``. ``l2`` acts on the same groups the granularity removes
        (group lasso on channels/blocks; ridge for unstructured and N:M).
        """
        regularizer = self.criterion.regularizer
        if regularizer is None:
            return None
        names = self.active
        layouts = [self.granularities[n].penalty_layout(self.kinds[n], self.shapes[n]) for n in names]
        return penalty_fn(regularizer, [self.variables[n] for n in names], layouts, strength)

    def report(self) -> list[VariableReport]:
        """One ``VariableReport`` per variable, in the given order, measured from the current values."""
        sparsity = self.sparsity()
        reports = []
        for name in self.variables:
            gran, kind, shape = self.granularities[name], self.kinds[name], self.shapes[name]
            common: dict[str, Any] = {
                "name": name,
                "shape": shape,
                "kind": kind,
                "granularity": gran.label,
                "target": self.targets[name],
                "sparsity": sparsity[name],
            }
            if name in self.skipped:
                reports.append(VariableReport(**common, skipped=self.skipped[name]))
                continue
            notes: list[str] = []
            total = removed = None
            if gran.group_noun is not None:
                layout = gran.layout(kind, shape)
                total = layout.n_groups
                removed = int(layout.removed(self._masks[name]).sum())
            if isinstance(gran, NM):
                axis = gran.axis(kind)
                assert axis is not None
                length = shape[axis]
                if length % gran.m:
                    achieved = nm_achieved_sparsity(gran.n, gran.m, length)
                    notes.append(
                        f"{name}: input axis of {length} is not a multiple of {gran.m}; its last group of "
                        f"{length % gran.m} keeps at most {gran.n}: {gran.label} reaches {achieved:.4g} here, "
                        f"not {1 - gran.n / gran.m:.4g}"
                    )
            reports.append(
                VariableReport(
                    **common,
                    groups_total=total,
                    groups_removed=removed,
                    group_noun=gran.group_noun,
                    bias=self.biases.get(name),
                    notes=notes,
                    method=self.methods.get(name),
                )
            )
        return reports

    def notes(self) -> list[str]:
        """Human-readable lines for the metrics' ``notes``: skipped variables and partial N:M patterns."""
        lines = [
            f"{name} left dense under {self.granularities[name].label} granularity: {reason}"
            for name, reason in self.skipped.items()
        ]
        for report in self.report():
            lines.extend(report.notes)
        return lines

    def unpaired_bias_notes(self) -> list[str]:
        """Channel-pruned kernels whose bias naming is unknown: a bias there would still output act(bias)."""
        notes: list[str] = []
        for name in self.active:
            gran, kind = self.granularities[name], self.kinds[name]
            leaf = name.rpartition("/")[2].split(":")[0]
            if gran.zeroes_bias(kind) and name not in self.biases and not leaf.endswith("kernel"):
                notes.append(
                    f"{name}: no bias is paired with it by name (Keras '<layer>/kernel' + '<layer>/bias'); "
                    "if its layer adds a bias, each removed channel still outputs the constant act(bias)"
                )
        return notes

    def layer_targets(self, fraction: float = 1.0) -> dict[str, float]:
        """Each active variable's target at ``fraction`` of the schedule: its own in layer scope; in global
        scope, the sparsity the global ranking of magnitude scores (under the spec's normalization) gives it,
        i.e. the allocation a magnitude global prune makes (fixed and non-rankable variables: their own).

        Why: SparseGPT (``per_layer_masks``) prunes each op at a target with weight updates, so it cannot be
        pooled; at 95% on the Fashion-MNIST CNN every kernel at 95% lost 61 points, SparseGPT at the per-layer
        sparsities global LAMP magnitude chose lost 12.6 (bench/RESULTS.md "Calibration"). Computed once per
        fraction, before the calibration stage updates any weight (it calls this first), and reused by
        ``prune``."""
        if self.scope == "layer":
            return {name: fraction * self.targets[name] for name in self.active}
        if self._allocated is not None and self._allocated[0] == fraction:
            return dict(self._allocated[1])

        def magnitude(name: str) -> np.ndarray:
            score = np.abs(variable_view(self.variables[name])).astype(np.float32)
            return np.where(self._masks[name], score, -np.inf)

        masks = self._global(magnitude, fraction, alone=lambda name, score: score)
        targets = {}
        for name in self.active:
            if name in self.fixed or not self.granularities[name].rankable:
                targets[name] = fraction * self.fixed.get(name, self.targets[name])
            else:
                mask = masks[name]
                targets[name] = float(np.count_nonzero(~mask)) / mask.size
        self._allocated = (fraction, targets)
        return dict(targets)

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

    def _own_mask(self, name: str, score: np.ndarray, target: float) -> np.ndarray:
        return self.granularities[name].mask(score, self.kinds[name], target)

    def _global(
        self,
        score_of: Callable[[str], np.ndarray],
        fraction: float,
        alone: Callable[[str, np.ndarray], np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Scores are asked for one variable at a time and only their group scores are kept (one number per
        channel or block; for unstructured, the scores themselves). ``alone``: how a variable ranked on its
        own compares its scores (default the criterion's ``layer_scores``)."""
        alone = alone or self._alone
        assert self.global_target is not None
        masks: dict[str, np.ndarray] = {}
        group_scores: dict[str, np.ndarray] = {}
        group_sizes: dict[str, np.ndarray] = {}
        layouts = {}
        for name in self.active:
            score = score_of(name)
            gran = self.granularities[name]
            if name in self.fixed or not gran.rankable:
                target = self.fixed.get(name, self.targets[name])
                masks[name] = self._own_mask(name, alone(name, score), fraction * target)
                continue
            layout = gran.layout(self.kinds[name], self.shapes[name])
            values, sizes = layout.group_scores(score, gran.reduce)
            layouts[name] = layout
            group_scores[name] = self._normalize(values, sizes)
            group_sizes[name] = np.ones(values.size, np.int64) if sizes is None else sizes
            del score, values
        unit = all(bool((s == 1).all()) for s in group_sizes.values())
        keep = select_groups(group_scores, fraction * self.global_target, None if unit else group_sizes)
        for name, flags in keep.items():
            masks[name] = layouts[name].expand(flags)
        return masks


def variable_view(var: tf.Variable) -> np.ndarray:
    """The variable's current value as a read-only NumPy view: ``var.numpy()`` copies the whole tensor."""
    return np.asarray(var.value())


def _zero_where_pruned(var: tf.Variable, keep: np.ndarray) -> None:
    """Exact +0.0 where ``keep`` is False, one variable at a time (so the temporary is one variable's size);
    nothing to write when the mask keeps everything."""
    if keep.all():
        return
    var.assign(tf.where(tf.constant(keep), var, tf.zeros([], var.dtype)))


_SCOPES = ("layer", "global")


def check_prune_args(criterion: Criterion, fraction: float, grads: Mapping[str, GradInput] | None) -> None:
    """ValueError for a fraction outside [0, 1] or a gradient criterion without gradients (every pruner)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction!r}")
    if criterion.needs_gradients and grads is None:
        raise ValueError(f"criterion {criterion.name!r} needs gradients: pass grads=")


def compiled_mask_assign(targets: list[tf.Variable]) -> Callable[[list[tf.Tensor]], None]:
    """One graph for all the mask assigns: called after every optimizer step, one eager ``assign`` per variable
    cost 27% of fine-tuning throughput (bench/RESULTS.md). Masks are arguments, so re-pruning (new masks,
    same shapes) reuses the trace. ``tf.where``, not ``var * mask``: +0.0 even for inf/NaN weights."""

    @tf.function(autograph=False, reduce_retracing=True)
    def apply(masks: list[tf.Tensor]) -> None:
        for var, mask in zip(targets, masks, strict=True):
            var.assign(tf.where(mask, var, tf.zeros([], var.dtype)))  # a broadcast scalar: no zeros tensor

    return apply
