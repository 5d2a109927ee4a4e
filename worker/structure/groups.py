"""Channel groups read from a signature's graph (never from layer names).

Every signature of the model is frozen (``frozen.py``) and walked in topological order; each op type has a rule
(``rules.py``) saying how the channels (last axis, NHWC) of its inputs relate to those of its outputs and which
weight axes they index. Coupled channels end up in one union-find class; each class with a member weight is a
``ChannelGroup``. Whatever a rule cannot explain (an op with no rule, a reduction or normalisation over the
channel axis, a weight read in a way no rule tracks, a signature input or output) *freezes* the classes it
touches: they are reported with the reason and never removed, so an unknown op never yields a wrong model.
All signatures are walked into the same classes, because the compact model must serve all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tensorflow as tf

from worker.models.handle import ModelHandle
from worker.structure.frozen import FrozenSignature, const_value, freeze_signature
from worker.structure.layout import Layout, Segment, Spaces, same_structure

Role = Literal["producer", "carrier", "consumer"]
Key = tuple[str, int]  # (weight key, axis): weight key = NamedVariable.name, or "const:<sig>:<node>"
_ROLE_RANK = {"carrier": 0, "consumer": 1, "producer": 2}


@dataclass(frozen=True)
class Member:
    """One weight axis indexed by a group's channels."""

    variable: str
    axis: int
    role: Role
    positions: np.ndarray | None = None  # (channels, k) indices along ``axis``; None = channel c is index c
    tied: bool = False  # a depthwise kernel: its input channels are its output channels (not a source)

    def indices(self, channels: np.ndarray) -> np.ndarray:
        """Indices along ``axis`` of the given channel numbers."""
        if self.positions is None:
            return np.asarray(channels, dtype=np.int64)
        return self.positions[np.asarray(channels, dtype=np.int64)].ravel()


@dataclass
class ChannelGroup:
    id: str
    channels: int
    members: list[Member]
    prunable: bool
    reason: str | None
    constants: list[Member] = field(default_factory=list)  # frozen (non-variable) consts sliced with it

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "producer"]


@dataclass(frozen=True)
class ConsumerUse:
    """A kernel reading grouped channels: where a removed channel's constant value must be folded."""

    signature: str
    op: str
    input_tensor: str
    in_key: Key
    out_key: Key
    exact: bool  # a constant input channel folds exactly into a bias (no zero padding around it)


@dataclass(frozen=True)
class ShapePatch:
    """A constant in a shape vector that encodes a channel count: new value = multiplier * new length."""

    signature: str
    node: str
    index: int | None  # element of the Const, None for a scalar Const
    multiplier: int
    layout: Layout


@dataclass
class GroupAnalysis:
    groups: list[ChannelGroup]
    signature: str
    frozen: dict[str, FrozenSignature] = field(repr=False, default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # signature -> the identical one analysed
    bindings: dict[Key, Layout] = field(repr=False, default_factory=dict)
    dims: dict[Key, int] = field(repr=False, default_factory=dict)
    consumers: list[ConsumerUse] = field(repr=False, default_factory=list)
    patches: list[ShapePatch] = field(repr=False, default_factory=list)
    group_of_space: dict[int, str] = field(repr=False, default_factory=dict)
    spaces: Spaces = field(repr=False, default_factory=Spaces)

    def group(self, group_id: str) -> ChannelGroup:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    def summary(self) -> list[dict[str, object]]:
        """JSON-ready view for metrics: id, channels, prunable/reason and members."""
        return [
            {
                "id": g.id,
                "channels": g.channels,
                "prunable": g.prunable,
                "reason": g.reason,
                "members": [{"variable": m.variable, "axis": m.axis, "role": m.role} for m in g.members],
            }
            for g in self.groups
        ]


@dataclass(frozen=True)
class Source:
    """A weight a const-derived tensor reads, and which weight axis each tensor axis comes from."""

    key: str
    axes: tuple[int | None, ...]


class Walker:
    """State of the walk over all signatures; rules call its methods."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.spaces = Spaces()
        self.bindings: dict[Key, Layout] = {}
        self.roles: dict[Key, Role] = {}
        self.dims: dict[Key, int] = {}
        self.order: list[Key] = []
        self.untracked: dict[Key, str] = {}
        self.tied: set[Key] = set()
        self.layouts: dict[str, Layout | None] = {}
        self.consumers: list[ConsumerUse] = []
        self.patches: list[ShapePatch] = []
        self.sig: FrozenSignature | None = None
        self._const: dict[str, bool] = {}
        self._views: dict[str, list[Source] | None] = {}

    # --- signature-level -------------------------------------------------------------------------
    def walk(self, sig: FrozenSignature) -> None:
        from worker.structure.rules import RULES, unknown

        self.sig = sig
        self._const = {}
        self._views = {}
        input_names = {t.split(":")[0]: k for k, t in sig.inputs.items()}
        for op in _topological(sig.graph):
            if op.type == "Placeholder" and op.name in input_names:
                self.set_layout(
                    op.outputs[0], None, f"carries the channels of signature input {input_names[op.name]!r}"
                )
                continue
            if self.is_const(op.outputs[0]) if op.outputs else True:
                continue
            try:
                RULES.get(op.type, unknown)(self, op)
            except Exception as exc:  # a graph a rule did not foresee: freeze, never guess
                unknown(
                    self, op, f"op {op.type} at {op.name} not understood ({type(exc).__name__}: {exc})"[:300]
                )
        for key, tensor in sig.outputs.items():
            self.spaces.freeze_layout(
                self.layouts.get(self._tname(tensor)), f"reaches signature output {key!r} ({sig.name})"
            )

    @staticmethod
    def _tname(name: str) -> str:
        return name if ":" in name else f"{name}:0"

    # --- tensors ---------------------------------------------------------------------------------
    def key_of(self, op: tf.Operation) -> str:
        assert self.sig is not None
        if op.name in self.sig.weights:
            return self.sig.weights[op.name]
        return f"const:{self.sig.name}:{op.name}"

    def is_const(self, t: tf.Tensor) -> bool:
        """Whether ``t`` depends on no signature input (weights and constants only)."""
        op = t.op
        if op.name in self._const:
            return self._const[op.name]
        assert self.sig is not None
        stack = [op]
        while stack:
            cur = stack[-1]
            if cur.name in self._const:
                stack.pop()
                continue
            if cur.type == "Const" or cur.name in self.sig.weights:
                self._const[cur.name] = True
                stack.pop()
                continue
            if cur.type == "Placeholder" or not cur.inputs or _STATEFUL(cur):
                self._const[cur.name] = False
                stack.pop()
                continue
            pending = [i.op for i in cur.inputs if i.op.name not in self._const]
            if pending:
                stack.extend(pending)
                continue
            self._const[cur.name] = all(self._const[i.op.name] for i in cur.inputs)
            stack.pop()
        return self._const[op.name]

    def layout(self, t: tf.Tensor) -> Layout | None:
        return self.layouts.get(t.name)

    def set_layout(self, t: tf.Tensor, layout: Layout | None, reason: str | None = None) -> None:
        """Record ``t``'s channel layout; a channel tensor with none gets a frozen space (``reason``)."""
        last = last_dim(t)
        if not t.dtype.is_floating or last is None or last <= 1:
            if layout is not None and reason:
                self.spaces.freeze_layout(layout, reason)
            self.layouts[t.name] = None
            return
        if layout is None or layout.length != last:
            if layout is not None:
                self.spaces.freeze_layout(layout, reason or f"channel count changes at {t.op.name}")
            layout = self.spaces.identity(last, reason or f"channels of unknown origin at {t.op.name}")
        elif reason:
            self.spaces.freeze_layout(layout, reason)
        self.layouts[t.name] = layout

    def unify(self, a: Layout, b: Layout, where: str) -> Layout:
        if a is b:
            return a
        if same_structure(a, b):
            for sa, sb in zip(a.segments, b.segments, strict=True):
                self.spaces.union(sa.space, sb.space)
            return a
        reason = f"channel layouts do not line up at {where}"
        self.spaces.freeze_layout(a, reason)
        self.spaces.freeze_layout(b, reason)
        return a

    # --- weights ---------------------------------------------------------------------------------
    def _note_key(self, key: Key, dim: int, role: Role) -> None:
        if key not in self.dims:
            self.dims[key] = dim
            self.order.append(key)
        if _ROLE_RANK[role] > _ROLE_RANK.get(self.roles.get(key, "carrier"), -1) or key not in self.roles:
            self.roles[key] = role

    def key_layout(self, key: Key, dim: int, role: Role) -> Layout:
        """The layout bound to a weight axis, a fresh space if none yet."""
        self._note_key(key, dim, role)
        if key not in self.bindings:
            self.bindings[key] = self.spaces.identity(dim)
        return self.bindings[key]

    def bind(self, key: Key, layout: Layout, role: Role, where: str) -> Layout:
        self._note_key(key, layout.length, role)
        if key not in self.bindings:
            self.bindings[key] = layout
            return layout
        return self.unify(self.bindings[key], layout, where)

    def view(self, t: tf.Tensor) -> list[Source] | None:
        """The weights a const-derived tensor reads and their axis maps; None when not traceable."""
        from worker.structure.rules import const_view

        if t.name not in self._views:
            self._views[t.name] = const_view(self, t)
        return self._views[t.name]

    def mark_untracked(self, sources: list[Source], tracked: set[tuple[str, int]], where: str) -> None:
        """Axes of the weights a use reads but no rule maps: they must never be sliced."""
        assert self.sig is not None
        for src in sources:
            for ax in src.axes:
                if ax is not None and (src.key, ax) not in tracked:
                    self.untracked.setdefault((src.key, ax), where)

    def const_ancestors(self, t: tf.Tensor) -> list[str]:
        assert self.sig is not None
        seen: set[str] = set()
        keys: list[str] = []
        stack = [t.op]
        while stack:
            op = stack.pop()
            if op.name in seen:
                continue
            seen.add(op.name)
            if op.type == "Const" or op.name in self.sig.weights:
                keys.append(self.key_of(op))
                continue
            stack.extend(i.op for i in op.inputs)
        return keys

    def untrack_all(self, t: tf.Tensor, where: str) -> None:
        for key in self.const_ancestors(t):
            self.untracked.setdefault((key, -1), where)


def _STATEFUL(op: tf.Operation) -> bool:
    try:
        return bool(op.op_def.is_stateful)
    except Exception:
        return True


def last_dim(t: tf.Tensor) -> int | None:
    shape = t.shape
    if shape.rank is None or shape.rank == 0:
        return None if shape.rank is None else 1
    return shape[-1]


def _topological(graph: tf.Graph) -> list[tf.Operation]:
    ops = graph.get_operations()
    indeg = {op.name: len({i.op.name for i in op.inputs}) for op in ops}
    users: dict[str, list[tf.Operation]] = {}
    for op in ops:
        for name in {i.op.name for i in op.inputs}:
            users.setdefault(name, []).append(op)
    ready = [op for op in ops if indeg[op.name] == 0]
    out: list[tf.Operation] = []
    while ready:
        op = ready.pop(0)
        out.append(op)
        for user in users.get(op.name, []):
            indeg[user.name] -= 1
            if indeg[user.name] == 0:
                ready.append(user)
    return out


def find_groups(handle: ModelHandle, signature: str) -> GroupAnalysis:
    """Channel groups of ``handle`` read from every signature's graph, ``signature`` first (its groups are
    listed in its topological order); a group is prunable only if every signature allows it."""
    handle.function(signature)  # PipelineError signature_not_found
    names = [signature] + [n for n in sorted(handle.signatures) if n != signature]
    walker = Walker(handle)
    frozen: dict[str, FrozenSignature] = {}
    aliases: dict[str, str] = {}
    seen: dict[bytes, str] = {}
    for name in names:
        mark = _fingerprint(handle, name)
        if mark in seen:  # Keras 3 export: `serve` and `serving_default` wrap the same call
            aliases[name] = seen[mark]
            continue
        seen[mark] = name
        frozen[name] = freeze_signature(handle, name)
        walker.walk(frozen[name])
    analysis = _collect(walker, signature, frozen)
    analysis.aliases = aliases
    return analysis


def _fingerprint(handle: ModelHandle, name: str) -> bytes:
    """Equal for two signatures whose wrapper graphs (inputs, the call, outputs) and captures are equal."""
    fn = handle.function(name)
    gdef = fn.graph.as_graph_def()
    del gdef.library.function[:]
    del gdef.library.gradient[:]
    for node in gdef.node:
        node.ClearField("device")
    captures = ",".join(str(id(ext)) for ext, _ in fn.graph.captures)
    return (
        gdef.SerializeToString(deterministic=True) + captures.encode() + repr(fn.structured_outputs).encode()
    )


def _collect(walker: Walker, signature: str, frozen: dict[str, FrozenSignature]) -> GroupAnalysis:
    spaces = walker.spaces
    variables = {nv.name for nv in walker.handle.variables()}
    for (wkey, axis), where in walker.untracked.items():
        for key, layout in walker.bindings.items():
            if key[0] == wkey and (axis == -1 or key[1] == axis):
                spaces.freeze_layout(layout, f"weight {wkey} is also read by {where}")
    by_root: dict[int, dict[Key, list[np.ndarray]]] = {}
    first: dict[int, int] = {}
    for rank, key in enumerate(walker.order):
        layout = walker.bindings.get(key)
        if layout is None:
            continue
        for seg in layout.segments:
            root = spaces.find(seg.space)
            by_root.setdefault(root, {}).setdefault(key, []).append(seg.positions)
            first.setdefault(root, rank)
    groups: list[ChannelGroup] = []
    group_of_space: dict[int, str] = {}
    for root in sorted(by_root, key=lambda r: first[r]):
        members: list[Member] = []
        constants: list[Member] = []
        for key, parts in by_root[root].items():
            pos = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            channels = spaces.size[root]
            identity = (
                pos.shape == (channels, 1)
                and walker.dims[key] == channels
                and np.array_equal(pos[:, 0], np.arange(channels))
            )
            member = Member(key[0], key[1], walker.roles[key], None if identity else pos, key in walker.tied)
            (members if key[0] in variables else constants).append(member)
        if not members:  # constants only (shape vectors, folded-in tensors): nothing a user can prune
            continue
        producers = [m for m in members if m.role == "producer"]
        reasons = spaces.reasons(root)
        if not reasons and not producers:
            reasons = ["no layer's weights produce these channels"]
        if not reasons and spaces.size[root] <= 1:
            reasons = ["a single channel: removing it would remove the layer"]
        label = (producers or members)[0].variable
        gid = f"g{len(groups)}:{label}"
        group_of_space[root] = gid
        groups.append(
            ChannelGroup(
                id=gid,
                channels=spaces.size[root],
                members=members,
                prunable=not reasons,
                reason="; ".join(reasons[:3]) if reasons else None,
                constants=constants,
            )
        )
    return GroupAnalysis(
        groups=groups,
        signature=signature,
        frozen=frozen,
        bindings=walker.bindings,
        dims=walker.dims,
        consumers=walker.consumers,
        patches=walker.patches,
        group_of_space=group_of_space,
        spaces=spaces,
    )


__all__ = [
    "ChannelGroup",
    "ConsumerUse",
    "GroupAnalysis",
    "Member",
    "Segment",
    "ShapePatch",
    "const_value",
    "find_groups",
]
