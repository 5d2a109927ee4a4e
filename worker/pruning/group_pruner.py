"""Group-aware channel pruning: coupled channels are ranked and zeroed as one.

Why: a convolution's output channel is not removable on its own. Its bias and BatchNorm entries carry it, the
next kernel reads it through an input slice, and a residual Add ties it to the same channel of another
branch. ``worker.structure.find_groups`` reads these couplings from the signature's graph and returns
*channel groups*; this module only needs their shape (``GroupLike`` / ``MemberLike``), not the graph:

- a group has ``channels`` channels and ``members``: ``(variable, axis, role, positions)``; channel ``c`` of
  a member is the index ``c`` along ``axis`` (or the indices ``positions[c]``, e.g. the rows of a Dense
  kernel a flattened conv channel feeds);
- ``role`` is ``producer`` (computes the channels: a kernel's output axis), ``carrier`` (per-channel vectors:
  bias, BatchNorm scale/shift, a depthwise kernel) or ``consumer`` (the next kernel's input slice).

Scoring (one rule per criterion, ``Criterion.group_reduce``): a channel's score combines the criterion's
element scores over the channel's slices of the group's *producers* that are selected for pruning (all
selected members when no producer is): ``l2`` -- the L2 norm over all producers' kernels (magnitude, l1, l2);
``sum`` -- summed Taylor / gradient scores; ``mean`` -- random. Scopes: ``layer`` ranks each group's
channels on their own at the group's target; ``global`` pools the channels of every group after a per-group
normalisation (``lamp``: LAMP over the group's channel scores; ``none``: divided by the group's mean, since
groups hold different numbers of weights per channel), like ``Pruner._global`` does per variable.

Targets: with groups, ``target`` is the fraction of a group's *channels* removed (layer scope) or of all
pooled channels (global), as Torch-Pruning's ``pruning_ratio``; the weight sparsity this gives (a kernel
loses output channels in one group and input slices in the next) is measured and reported, not forced. A
group's target is the lowest target of its producers (``layer_sparsity`` overrides); a group with a producer
in ``fixed`` is pruned at that target even in global scope. Each group keeps its best channel (below a
target of 1): a group is never emptied.

Zeroing: every trainable member's slice of a removed channel is set to exact zero -- producers' output
channels, carriers (bias, BatchNorm gamma and beta: the channel then outputs exactly 0 whatever its
statistics) and consumers' input slices -- and re-applied after every optimizer step (``apply_masks``), as
``Pruner`` does. Non-trainable members (BatchNorm moving statistics) are left as they are: with gamma and
beta zero they no longer reach the output. A group is left whole, with its reason, when the analysis says
so (``prunable`` False), when a producer is not among the selected variables (include/exclude), when a
member is unknown or its axis does not hold ``channels`` entries, or when a gradient criterion cannot score
it. Selected variables in no pruned group are left dense with a note.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import tensorflow as tf

from worker.pruning.budget import BudgetPolicy
from worker.pruning.criteria import Criterion, GradientStats, GradInput
from worker.pruning.granularity import Channel, Granularity, Kind, TileLayout
from worker.pruning.interface import PrunerLike, VariableReport
from worker.pruning.normalization import get_normalization
from worker.pruning.pruner import check_prune_args, compiled_mask_assign, variable_view
from worker.pruning.regularization import penalty_fn
from worker.pruning.scope import select_groups

__all__ = ["GroupLike", "GroupPruner", "MemberLike"]

Scope = Literal["layer", "global"]


class MemberLike(Protocol):
    """One variable's share of a channel group (``worker.structure.Member``)."""

    @property
    def variable(self) -> str: ...
    @property
    def axis(self) -> int: ...
    @property
    def role(self) -> str: ...
    @property
    def positions(self) -> np.ndarray | None: ...


class GroupLike(Protocol):
    """Channels removed together (``worker.structure.ChannelGroup``)."""

    @property
    def id(self) -> str: ...
    @property
    def channels(self) -> int: ...
    @property
    def members(self) -> Sequence[MemberLike]: ...
    @property
    def prunable(self) -> bool: ...
    @property
    def reason(self) -> str | None: ...


@dataclass(frozen=True)
class _Slice:
    """Where channel ``c`` of a group lies in one variable: ``index[c]`` along ``axis`` (non-negative)."""

    variable: str
    axis: int
    role: str
    index: np.ndarray  # (channels, k) int

    def gather(self, values: np.ndarray) -> np.ndarray:
        """``(channels, elements per channel)``: the channel's entries of ``values`` (shaped like the variable)."""
        moved = np.moveaxis(np.asarray(values), self.axis, 0)
        picked = moved[self.index]  # (channels, k, *rest)
        return picked.reshape(self.index.shape[0], -1)

    def zero(self, mask: np.ndarray, removed: np.ndarray) -> None:
        """Clear ``mask`` (in place) at the entries of the ``removed`` channels."""
        if not removed.any():
            return
        moved = np.moveaxis(mask, self.axis, 0)  # a view: writes reach ``mask``
        moved[self.index[removed].reshape(-1)] = False


@dataclass
class _Group:
    """A prunable group as the pruner holds it."""

    id: str
    channels: int
    slices: list[_Slice]
    scoring: list[_Slice]  # the slices whose element scores rank the channels
    keep: np.ndarray  # (channels,) bool: channels still kept
    target: float = 0.0
    fixed: bool = False


def _slice_of(member: MemberLike, channels: int, shape: tuple[int, ...]) -> tuple[_Slice | None, str | None]:
    """The member's channel slices, or why they cannot be trusted (the group is then left whole)."""
    rank = len(shape)
    if not -rank <= member.axis < rank:
        return None, f"{member.variable}: axis {member.axis} out of range for shape {list(shape)}"
    axis = member.axis % rank
    length = shape[axis]
    if member.positions is None:
        if length != channels:
            return None, f"{member.variable}: axis {axis} holds {length} entries, not the group's {channels}"
        index = np.arange(channels, dtype=np.intp).reshape(channels, 1)
    else:
        index = np.asarray(member.positions, dtype=np.intp)
        if index.ndim == 1 and index.size == channels:
            index = index.reshape(channels, 1)
        out_of_range = index.size > 0 and (index.min() < 0 or index.max() >= length)
        if index.ndim != 2 or index.shape[0] != channels or out_of_range:
            return (
                None,
                f"{member.variable}: positions {index.shape} do not map {channels} channels into axis {axis}",
            )
    return _Slice(member.variable, axis, member.role, index), None


class GroupPruner(PrunerLike):
    """Keep-masks per channel group, behind the stages' one pruner interface (``PrunerLike``), with the
    group parts of it filled in: ``analysis``, ``group_keep`` and ``structure_groups``."""

    def __init__(
        self,
        groups: Sequence[GroupLike],
        variables: Mapping[str, tf.Variable],
        targets: Mapping[str, float],
        scope: Scope,
        criterion: Criterion,
        *,
        global_target: float | None = None,
        fixed: Mapping[str, float] | None = None,
        normalization: str = "none",
        kinds: Mapping[str, Kind] | None = None,
        model_variables: Mapping[str, tf.Variable] | None = None,
        budget: BudgetPolicy | None = None,
    ) -> None:
        """``variables``: the selected (prunable) variables by name; ``model_variables``: every variable of the
        model (carriers and consumers are looked up there); ``targets`` per selected variable. ``budget``:
        the same ranking (scope, normalisation), gone along as far as the budget needs
        (``worker.pruning.budget``) instead of a fraction of channels; ``prune(fraction)`` then goes
        ``fraction`` of the way from the dense cost to the budget."""
        if scope not in ("layer", "global"):
            raise ValueError(f"unknown scope {scope!r}; known scopes: global, layer")
        missing = [name for name in variables if name not in targets]
        if missing:
            raise ValueError(f"no target for variable(s): {', '.join(missing)}")
        self.variables = dict(variables)
        self.targets = {name: float(targets[name]) for name in variables}
        self.scope: Scope = scope
        self.criterion = criterion
        self.fixed = {name: float(t) for name, t in (fixed or {}).items()}
        self.normalization = normalization
        self._normalize = get_normalization(normalization)
        self.global_target = float(global_target) if global_target is not None else None
        if scope == "global" and self.global_target is None:
            pooled = {t for n, t in self.targets.items() if n not in self.fixed}
            self.global_target = pooled.pop() if len(pooled) == 1 else max(pooled, default=0.0)
        self.all_variables: dict[str, tf.Variable] = {**dict(model_variables or {}), **self.variables}
        self.shapes = {n: tuple(int(d) for d in v.shape) for n, v in self.variables.items()}
        self.kinds: dict[str, Kind] = {n: (kinds or {}).get(n, "other") for n in self.variables}
        channel = Channel()
        self.granularities: dict[str, Granularity] = {n: channel for n in self.variables}
        self.biases: dict[str, str] = {}  # no name pairing: carriers come from the graph
        self.analysis: Any = (
            None  # the GroupAnalysis the groups came from (set by the caller, for compaction)
        )
        self.budget = budget

        self.groups: list[_Group] = []
        self.left_whole: dict[str, tuple[list[str], str]] = {}  # group id -> (member variables, reason)
        for group in groups:
            members = [m.variable for m in group.members]
            built, reason = self._build(group)
            if built is None:
                self.left_whole[group.id] = (members, reason or "left whole")
            else:
                self.groups.append(built)

        in_groups = {s.variable for g in self.groups for s in g.slices}
        self.skipped: dict[str, str] = {}
        for name in self.variables:
            if name not in in_groups:
                self.skipped[name] = self._why_dense(name)
        # Masks: selected variables in ``_masks``; other trainable members (biases, BatchNorm, consumers
        # outside the selection) in ``_extra_masks``; both are zeroed and re-applied alike.
        self._masks = {n: np.ones(self.shapes[n], dtype=bool) for n in self.variables}
        self._extra_masks: dict[str, np.ndarray] = {}
        for g in self.groups:
            for s in g.slices:
                if s.variable not in self._masks and self._zeroable(s.variable):
                    self._extra_masks.setdefault(
                        s.variable, np.ones(tuple(self.all_variables[s.variable].shape), dtype=bool)
                    )
        self._mask_tensors: dict[str, tf.Tensor] = {}
        self._apply: tuple[list[str], Any] | None = None

    # ------------------------------------------------------------------ building

    def _zeroable(self, name: str) -> bool:
        var = self.all_variables[name]
        return bool(var.trainable) or name in self.variables

    def _build(self, group: GroupLike) -> tuple[_Group | None, str | None]:
        if not group.prunable:
            return None, group.reason or "the structure analysis left it whole"
        if group.channels < 2:
            return None, f"{group.channels} channel(s): nothing to remove while keeping one"
        slices: list[_Slice] = []
        for member in group.members:
            var = self.all_variables.get(member.variable)
            if var is None:
                return None, f"member {member.variable} is not a variable of the model"
            built, problem = _slice_of(member, group.channels, tuple(int(d) for d in var.shape))
            if built is None:
                return None, problem
            slices.append(built)
        producers = [s for s in slices if s.role == "producer"]
        if not producers:
            return None, "no producer: its channels are not computed by a kernel of the model"
        unselected = sorted({s.variable for s in producers if s.variable not in self.variables})
        if unselected:
            return (
                None,
                f"producer(s) {unselected} not selected for pruning (include/exclude, trainable rank >= 2)",
            )
        scoring = producers
        targets = [self.targets[s.variable] for s in scoring]
        fixed = [self.fixed[s.variable] for s in scoring if s.variable in self.fixed]
        target = min(fixed) if fixed else min(targets)
        return (
            _Group(
                group.id, group.channels, slices, scoring, np.ones(group.channels, bool), target, bool(fixed)
            ),
            None,
        )

    def _why_dense(self, name: str) -> str:
        for gid, (members, reason) in self.left_whole.items():
            if name in members:
                return f"its channels are in group {gid}, left whole: {reason}"
        return "in no channel group the structure analysis found"

    # ------------------------------------------------------------------ what the pipeline reads

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Keep-masks of the selected variables (True = kept)."""
        return dict(self._masks)

    @property
    def bias_masks(self) -> dict[str, np.ndarray]:
        """Keep-masks of the other zeroed members (biases, BatchNorm scale/shift, consumers not selected)."""
        return dict(self._extra_masks)

    @property
    def active(self) -> list[str]:
        """Variables whose scores rank channels (the producers of the prunable groups), in the given order."""
        scoring = {s.variable for g in self.groups for s in g.scoring}
        return [n for n in self.variables if n in scoring]

    def group_keep(self) -> dict[str, np.ndarray]:
        """Kept channels per group id (every channel of a group left whole), for the compaction."""
        keep = {g.id: g.keep.copy() for g in self.groups}
        return keep

    def prune(
        self,
        fraction: float,
        grads: Mapping[str, GradInput] | None = None,
        calibration: Mapping[str, Any] | None = None,
    ) -> None:
        """Recompute group masks at ``fraction`` of every target; channels removed earlier stay removed.
        ``calibration``: unused (the spec refuses calibration criteria with channel granularity)."""
        if self.criterion.needs_calibration:
            raise ValueError(f"criterion {self.criterion.name!r} does not rank channel groups")
        check_prune_args(self.criterion, fraction, grads)
        if self.criterion.needs_gradients and grads is not None:
            self._drop_unconnected(grads)
        element = self._element_scores(grads)
        scores = {g.id: np.where(g.keep, self._channel_scores(g, element), -np.inf) for g in self.groups}
        by_id = {g.id: g for g in self.groups}
        if self.budget is not None:  # the same ranking; how far along it to go is the budget's
            new = self.budget.along(self.groups, lambda t: self._select(scores, t), fraction)
        else:
            new = self._select(scores, fraction)
        for gid, keep in new.items():
            by_id[gid].keep &= keep
        self._rebuild_masks()
        self.apply_masks()

    def _select(self, scores: Mapping[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
        """Keep flags per group at ``fraction`` of the targets: per group (layer scope, fixed groups) or one
        ranking of the normalised channel scores over the pooled groups (global scope)."""
        new: dict[str, np.ndarray] = {}
        pooled = [g for g in self.groups if not (self.scope == "layer" or g.fixed)]
        for g in self.groups:
            if g not in pooled:
                new[g.id] = select_groups({g.id: scores[g.id]}, fraction * g.target)[g.id]
        if pooled:
            assert self.global_target is not None
            normalized = {}
            for g in pooled:
                sizes = np.full(
                    g.channels, sum(s.index.shape[1] * _rest(self, s) for s in g.scoring), np.int64
                )
                normalized[g.id] = self._normalize(scores[g.id], sizes)
            new.update(select_groups(normalized, fraction * self.global_target))
        return new

    def _drop_unconnected(self, grads: Mapping[str, GradInput]) -> None:
        """Groups whose producers the loss does not reach cannot be ranked by gradients: left whole."""
        for g in list(self.groups):
            dead = [
                s.variable
                for s in g.scoring
                if isinstance(grads.get(s.variable), GradientStats) and not grads[s.variable].connected  # type: ignore[union-attr]
            ]
            if dead and g.keep.all():
                self.groups.remove(g)
                self.left_whole[g.id] = (
                    [s.variable for s in g.slices],
                    f"the loss does not depend on {dead}: criterion {self.criterion.name!r} cannot score it",
                )
                in_groups = {s.variable for gg in self.groups for s in gg.slices}
                for name in self.variables:
                    if name not in in_groups and name not in self.skipped:
                        self.skipped[name] = self._why_dense(name)
                for s in g.slices:
                    if s.variable in self._extra_masks and s.variable not in in_groups:
                        del self._extra_masks[s.variable]

    def _element_scores(self, grads: Mapping[str, GradInput] | None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in self.active:
            var = self.variables[name]
            grad = None if grads is None else grads[name]
            if self.criterion.uses_name:
                score = np.asarray(self.criterion.score(variable_view(var), grad, name=name))
            else:
                score = np.asarray(self.criterion.score(variable_view(var), grad))
            if score.shape != self.shapes[name]:
                raise ValueError(
                    f"criterion {self.criterion.name!r} returned shape {score.shape} for {name} of shape "
                    f"{self.shapes[name]}"
                )
            out[name] = np.nan_to_num(score.astype(np.float64), nan=0.0)
        return out

    def _channel_scores(self, group: _Group, element: Mapping[str, np.ndarray]) -> np.ndarray:
        """One score per channel: the criterion's ``group_reduce`` over all scoring slices."""
        reduce = self.criterion.group_reduce
        total = np.zeros(group.channels)
        count = 0
        for s in group.scoring:
            values = s.gather(element[s.variable])
            total += (values**2).sum(axis=1) if reduce == "l2" else values.sum(axis=1)
            count += values.shape[1]
        if reduce == "l2":
            return np.sqrt(total)
        if reduce == "mean":
            return total / max(count, 1)
        return total

    def _rebuild_masks(self) -> None:
        for name in self._masks:
            self._masks[name] = np.ones(self.shapes[name], dtype=bool)
        for name in self._extra_masks:
            self._extra_masks[name] = np.ones(self._extra_masks[name].shape, dtype=bool)
        for g in self.groups:
            removed = ~g.keep
            for s in g.slices:
                target = self._masks.get(s.variable)
                if target is None:
                    target = self._extra_masks.get(s.variable)
                if target is not None:
                    s.zero(target, removed)
        changed = {**self._masks, **self._extra_masks}
        self._mask_tensors = {n: tf.constant(m) for n, m in changed.items() if not m.all()}

    def apply_masks(self) -> None:
        """Exact zeros where masks say so, for every zeroed variable (call after every optimizer step)."""
        names = list(self._mask_tensors)
        if not names:
            return
        if self._apply is None or self._apply[0] != names:
            self._apply = (names, compiled_mask_assign([self.all_variables[n] for n in names]))
        self._apply[1]([self._mask_tensors[n] for n in names])

    def sparsity(self) -> dict[str, float]:
        """Fraction of exact zeros per selected variable, measured from the values."""
        result: dict[str, float] = {}
        for name, var in self.variables.items():
            size = int(np.prod(var.shape))
            nonzero = int(np.count_nonzero(variable_view(var))) if size else 0
            result[name] = (size - nonzero) / size if size else 0.0
        return result

    def penalty(self, strength: float) -> Callable[[], tf.Tensor] | None:
        """l1: L1 over the producers; l2: group lasso over each producer's output channels."""
        regularizer = self.criterion.regularizer
        if regularizer is None:
            return None
        slices = {s.variable: s for g in self.groups for s in g.scoring}
        names = [n for n in self.active if n in slices]
        layouts: list[TileLayout | None] = [_channel_tiles(self.shapes[n], slices[n]) for n in names]
        return penalty_fn(regularizer, [self.variables[n] for n in names], layouts, strength)

    def report(self) -> list[VariableReport]:
        """One ``VariableReport`` per selected variable: channels removed where it is a producer."""
        sparsity = self.sparsity()
        produced: dict[str, _Group] = {}
        for g in self.groups:
            for s in g.scoring:
                produced.setdefault(s.variable, g)
        reports = []
        for name in self.variables:
            common: dict[str, Any] = {
                "name": name,
                "shape": self.shapes[name],
                "kind": self.kinds[name],
                "granularity": "channel",
                "target": self.targets[name],
                "sparsity": sparsity[name],
            }
            if name in self.skipped:
                reports.append(VariableReport(**common, skipped=self.skipped[name]))
                continue
            group = produced.get(name)
            reports.append(
                VariableReport(
                    **common,
                    groups_total=None if group is None else group.channels,
                    groups_removed=None if group is None else int((~group.keep).sum()),
                    group_noun="channels",
                )
            )
        return reports

    def notes(self) -> list[str]:
        """Metrics notes: the target's meaning, variables left dense and groups left whole."""
        if self.budget is not None:
            lines = [
                f"budget ({self.budget.unit}): channels removed along the spec's ranking (scope {self.scope!r}, "
                f"normalization {self.normalization!r}) until the compacted model's exact cost meets the budget"
            ]
        else:
            lines = [
                "channel granularity over coupled channel groups: target_sparsity is the fraction of channels "
                f"removed ({'per group' if self.scope == 'layer' else 'over all groups'}); weight sparsity is "
                "measured"
            ]
        lines += [f"{name} left dense under channel granularity: {why}" for name, why in self.skipped.items()]
        lines += [f"channel group {gid} left whole: {why}" for gid, (_, why) in self.left_whole.items()]
        return lines

    def structure_groups(self) -> list[dict[str, Any]]:
        """The metrics' ``structure.groups``: channels before/after for pruned groups, the reason otherwise."""
        rows: list[dict[str, Any]] = []
        for g in self.groups:
            rows.append(
                {
                    "id": g.id,
                    "members": sorted({s.variable for s in g.slices}),
                    "channels_before": g.channels,
                    "channels_after": int(g.keep.sum()),
                }
            )
        for gid, (members, why) in self.left_whole.items():
            rows.append({"id": gid, "members": sorted(set(members)), "reason": why})
        return rows


def _rest(pruner: GroupPruner, s: _Slice) -> int:
    """Elements per index along the slice's axis (the product of the other axes)."""
    shape = pruner.shapes.get(s.variable) or tuple(int(d) for d in pruner.all_variables[s.variable].shape)
    return int(np.prod(shape)) // max(shape[s.axis], 1)


def _channel_tiles(shape: tuple[int, ...], s: _Slice) -> TileLayout | None:
    """The output channels of a producer as tiles (for group lasso); None when positions are not 1:1."""
    if s.index.shape[1] != 1 or not np.array_equal(s.index[:, 0], np.arange(s.index.shape[0])):
        return None
    before = int(np.prod(shape[: s.axis]))
    after = int(np.prod(shape[s.axis + 1 :]))
    return TileLayout(shape, (before, shape[s.axis], after), (before, 1, after))


def zero_channel_keep(
    groups: Sequence[GroupLike], shapes: Mapping[str, Sequence[int]], values: Callable[[str], np.ndarray]
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """For compaction after another granularity: per prunable group, channels kept unless every producer's
    slice of the channel is exactly zero (each group keeps at least its first channel), and the
    ``structure.groups`` rows. ``values(name)`` reads a variable's current value. A removed channel may
    still carry a constant (its bias): the compaction folds it, and the equivalence check decides."""
    keep: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    for group in groups:
        members = sorted({m.variable for m in group.members})
        reason = None if group.prunable else (group.reason or "the structure analysis left it whole")
        flags = np.ones(group.channels, dtype=bool)
        producers: list[_Slice] = []
        for member in group.members if reason is None else []:
            if member.variable not in shapes:
                reason = f"member {member.variable} is not a variable of the model"
                break
            built, problem = _slice_of(member, group.channels, tuple(int(d) for d in shapes[member.variable]))
            if built is None:
                reason = problem
                break
            if built.role == "producer":
                producers.append(built)
        if reason is None and not producers:
            reason = "no producer: its channels are not computed by a kernel of the model"
        if reason is not None:
            rows.append({"id": group.id, "members": members, "reason": reason})
            continue
        flags[:] = False
        for s in producers:
            flags |= s.gather(values(s.variable)).any(axis=1)
        if not flags.any() and flags.size:
            flags[0] = True
        keep[group.id] = flags
        rows.append(
            {
                "id": group.id,
                "members": members,
                "channels_before": group.channels,
                "channels_after": int(flags.sum()),
            }
        )
    return keep, rows
