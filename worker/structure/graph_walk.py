"""The walk over a frozen signature's graph: channel layouts per tensor, weight axes bound to them.

``Walker`` visits the ops in topological order and hands each to the rule its ``RuleTable`` has for the op
type (``rules.DEFAULT_RULES`` is the table ``channel_groups.find_groups`` passes in; a test may pass a table
of one rule, as Torch-Pruning's ``customized_pruners`` replace its defaults). Rules call back into the walker
to set layouts, couple channels (union-find over ``layout.Spaces``) and bind weight axes; whatever no rule
explains is frozen by the table's ``unknown``, so an unknown op never yields a wrong model. The walker knows
no op type itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np
import tensorflow as tf

from worker.models.handle import ModelHandle
from worker.structure.frozen import FrozenSignature
from worker.structure.layout import Layout, Spaces, same_structure, substituted

Role = Literal["producer", "carrier", "consumer"]
Key = tuple[str, int]  # (weight key, axis): weight key = NamedVariable.name, or "const:<sig>:<node>"
_ROLE_RANK = {"carrier": 0, "consumer": 1, "producer": 2}


@dataclass(frozen=True)
class ConsumerUse:
    """A kernel reading grouped channels: where a removed channel's constant value must be folded."""

    signature: str
    op: str
    input_tensor: str
    in_key: Key
    out_key: Key
    exact: bool  # a constant input channel folds exactly into a bias (no zero padding around it)
    layout: Layout | None = None  # the input tensor's layout when it is not the kernel axis' (merged heads)
    merge_last: int = 1  # trailing input axes ``layout`` spans ([.., heads, head_dim]: 2)


@dataclass(frozen=True)
class ShapePatch:
    """A constant in a shape vector that encodes a channel count: new value = multiplier * new length."""

    signature: str
    node: str
    index: int | None  # element of the Const, None for a scalar Const
    multiplier: int
    layout: Layout
    function: str | None = None  # the node lives in this library function (a loop body), not the graph


@dataclass(frozen=True)
class Source:
    """A weight a const-derived tensor reads, and which weight axis each tensor axis comes from."""

    key: str
    axes: tuple[int | None, ...]
    # Per tensor axis, how many consecutive indices one index of the weight axis covers: a kernel
    # ``[d, heads, head_dim]`` reshaped to ``[d, heads * head_dim]`` maps tensor axis 1 to weight axis 1 with
    # ``merged[1] == head_dim`` (the inner weight axes are never sliced). None: 1 everywhere.
    merged: tuple[int, ...] | None = None

    def factor(self, axis: int) -> int:
        return 1 if self.merged is None else self.merged[axis]


Rule = Callable[["Walker", tf.Operation], None]
ConstView = Callable[["Walker", tf.Tensor], list[Source] | None]


class Fallback(Protocol):
    """A rule with the reason to record (``rules.unknown``): an op's channels frozen, never guessed."""

    def __call__(self, walker: Walker, op: tf.Operation, reason: str | None = None) -> None: ...


@dataclass(frozen=True)
class RuleTable:
    """What the walker knows about ops: ``ops`` maps an op type to its rule; ``unknown`` freezes whatever an
    op without a rule (or whose rule failed) touches; ``const_view`` traces a const-derived tensor back to the
    weights it reads."""

    ops: Mapping[str, Rule]
    unknown: Fallback
    const_view: ConstView
    # Op types whose rules also map the channel layouts of axes other than the last (``Walker.inner``:
    # attention heads); any other op freezes the inner layouts of its inputs before its rule runs.
    axis_aware: frozenset[str] = frozenset()


class Walker:
    """State of the walk over all signatures; the rules of ``rules`` call its methods."""

    def __init__(self, handle: ModelHandle, rules: RuleTable) -> None:
        self.handle = handle
        self.rules = rules
        self.spaces = Spaces()
        self.bindings: dict[Key, Layout] = {}
        self.roles: dict[Key, Role] = {}
        self.dims: dict[Key, int] = {}
        self.order: list[Key] = []
        self.untracked: dict[Key, str] = {}
        self.tied: set[Key] = set()
        self.layouts: dict[str, Layout | None] = {}
        # Layouts of axes other than the last, by tensor: {axis counted from the end (-2, -3, ..): layout}.
        # Attention heads live there between the split ``[.., h*d] -> [.., h, d]`` and the merge back.
        self.inner: dict[str, dict[int, Layout]] = {}
        self.consumers: list[ConsumerUse] = []
        self.patches: list[ShapePatch] = []
        # Element layouts of TensorList handles (a recurrent loop's input and output sequences).
        self.lists: dict[str, Layout | None] = {}
        self.sig: FrozenSignature | None = None
        self._const: dict[str, bool] = {}
        self._views: dict[str, list[Source] | None] = {}

    # --- signature-level -------------------------------------------------------------------------
    def walk(self, sig: FrozenSignature) -> None:
        self.sig = sig
        self._const = {}
        self._views = {}
        input_names = {t.split(":")[0]: k for k, t in sig.inputs.items()}
        live = walk_up(sig.graph.get_tensor_by_name(self._tname(t)) for t in sig.outputs.values())
        ops = []
        for op in _topological(sig.graph):
            if op.type == "Placeholder" and op.name in input_names:
                self.set_layout(
                    op.outputs[0], None, f"carries the channels of signature input {input_names[op.name]!r}"
                )
            elif op.name in live:  # dead ops (Keras' first RNN step, run for its shape only) never run
                ops.append(op)
        self._walk_ops(ops)
        for key, tensor in sig.outputs.items():
            why = f"reaches signature output {key!r} ({sig.name})"
            self.spaces.freeze_layout(self.layouts.get(self._tname(tensor)), why)
            for layout in self.inner.get(self._tname(tensor), {}).values():
                self.spaces.freeze_layout(layout, why)

    def _walk_ops(self, ops: list[tf.Operation]) -> None:
        unknown = self.rules.unknown
        for op in ops:
            if self.is_const(op.outputs[0]) if op.outputs else True:
                continue
            if op.type not in self.rules.axis_aware:
                for inp in op.inputs:
                    self.freeze_inner(inp, f"unknown op {op.type} at {op.name} (on an inner axis: heads)")
            try:
                self.rules.ops.get(op.type, unknown)(self, op)
            except Exception as exc:  # a graph a rule did not foresee: freeze, never guess
                unknown(
                    self, op, f"op {op.type} at {op.name} not understood ({type(exc).__name__}: {exc})"[:300]
                )

    def walk_body(self, body: FrozenSignature, args: list[tf.Tensor], outputs: list[tf.Tensor]) -> None:
        """Walk a loop body (a library function imported as ``body.graph``) inside the current walk: ``args``
        already carry their layouts (``layouts``/``lists``), weights are ``body.weights``. Rules see ``body``
        as the signature; the caller re-homes the patches and consumer uses it records."""
        outer, saved = self.sig, (self._const, self._views)
        self.sig, self._const, self._views = body, {}, {}
        try:
            live = walk_up(outputs)
            arg_ops = {t.op.name for t in args}
            self._walk_ops(
                [op for op in _topological(body.graph) if op.name in live and op.name not in arg_ops]
            )
        finally:
            self.sig = outer
            self._const, self._views = saved

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

    def layout_at(self, t: tf.Tensor, axis: int) -> Layout | None:
        """The layout of ``t``'s axis ``axis`` counted from the end (-1: the channel axis)."""
        return self.layouts.get(t.name) if axis == -1 else self.inner.get(t.name, {}).get(axis)

    def set_inner(self, t: tf.Tensor, layouts: dict[int, Layout]) -> None:
        if layouts:
            self.inner[t.name] = dict(layouts)

    def freeze_inner(self, t: tf.Tensor, reason: str) -> None:
        for layout in self.inner.get(t.name, {}).values():
            self.spaces.freeze_layout(layout, reason)

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
        coarse = self._coarsen(a, b) or self._coarsen(b, a)
        if coarse is not None:
            return coarse
        reason = f"channel layouts do not line up at {where}"
        self.spaces.freeze_layout(a, reason)
        self.spaces.freeze_layout(b, reason)
        return a

    def _coarsen(self, fine: Layout, coarse: Layout) -> Layout | None:
        """Grouped-query attention: ``fine`` is one prunable space of single channels (the query heads) and
        ``coarse`` covers the same positions with fewer, wider channels (each key/value head repeated ``r``
        times). The fine space is re-expressed everywhere as the coarse one (a query head goes with its whole
        key/value group). None when the layouts are not of that shape."""
        if len(fine.segments) != 1 or fine.segments[0].positions.shape[1] != 1:
            return None
        fseg = fine.segments[0]
        root = self.spaces.find(fseg.space)
        if self.spaces.reasons(root) or self.spaces.size[root] != fine.length:
            return None
        if any(self.spaces.find(s.space) == root for s in coarse.segments):
            return None
        covered = np.concatenate([s.positions.ravel() for s in coarse.segments]) if coarse.segments else None
        if (
            covered is None
            or coarse.length != fine.length
            or sorted(covered.tolist()) != list(range(fine.length))
        ):
            return None
        if sum(s.positions.shape[0] for s in coarse.segments) >= fine.length:
            return None  # not coarser
        inverse = np.empty(fine.length, dtype=np.int64)  # axis position -> fine channel
        inverse[fseg.positions[:, 0]] = np.arange(fine.length)
        mapping = Layout(
            fine.length,
            tuple(type(s)(s.space, inverse[s.positions]) for s in coarse.segments),
        )
        self._substitute(root, mapping)
        return coarse

    def coarsen_blocks(self, layout: Layout, block: int) -> Layout | None:
        """Attention heads from a plain 2-D projection: its output channels (one prunable space of single
        positions) are re-expressed everywhere as ``length // block`` channels of ``block`` consecutive
        positions each (a head and its ``head_dim`` units go together). None when ``layout`` is not that."""
        if len(layout.segments) != 1 or layout.segments[0].positions.shape[1] != 1 or layout.length % block:
            return None
        seg = layout.segments[0]
        root = self.spaces.find(seg.space)
        if self.spaces.reasons(root) or self.spaces.size[root] != layout.length:
            return None
        inverse = np.empty(layout.length, dtype=np.int64)
        inverse[seg.positions[:, 0]] = np.arange(layout.length)
        heads = self.spaces.new(layout.length // block)
        blocks = inverse[np.arange(layout.length).reshape(-1, block)]
        self._substitute(root, Layout(layout.length, (type(seg)(heads, blocks),)))
        return substituted(layout, self.spaces.find, root, Layout(layout.length, (type(seg)(heads, blocks),)))

    def _substitute(self, root: int, mapping: Layout) -> None:
        """Every layout's segments of space class ``root`` re-expressed through ``mapping`` (see ``layout.
        substituted``): bindings, tensor layouts, inner layouts, shape patches and consumer layouts."""

        def swap(layout: Layout) -> Layout:
            if not any(self.spaces.find(s.space) == root for s in layout.segments):
                return layout
            return substituted(layout, self.spaces.find, root, mapping)

        self.bindings = {k: swap(v) for k, v in self.bindings.items()}
        self.layouts = {k: None if v is None else swap(v) for k, v in self.layouts.items()}
        self.inner = {k: {p: swap(v) for p, v in d.items()} for k, d in self.inner.items()}
        self.patches = [replace(p, layout=swap(p.layout)) for p in self.patches]
        self.consumers = [
            c if c.layout is None else replace(c, layout=swap(c.layout)) for c in self.consumers
        ]
        self.lists = {k: None if v is None else swap(v) for k, v in self.lists.items()}

    def gate_part(self, layout: Layout, start: int, stop: int) -> Layout | None:
        """Recurrent gates: a tensor ``[.., k * u]`` (one kernel's gate pre-activations) cut into parts of ``u``;
        ``[start, stop)`` is one part. The first cut re-expresses the whole space everywhere as ``u`` channels of
        ``k`` positions each (unit ``j`` is columns ``g * u + j``: its gates go together); the part is then a
        plain layout over those units. None when the layout is not one whole prunable space cut that way."""
        width = stop - start
        if width <= 0 or layout.length % width or start % width or len(layout.segments) != 1:
            return None
        parts, column = layout.length // width, start // width
        seg = layout.segments[0]
        root = self.spaces.find(seg.space)
        if self.spaces.size[root] * seg.positions.shape[1] != layout.length:
            return None
        if seg.positions.shape[1] == 1:
            if parts == 1:
                return layout
            if self.spaces.reasons(root):  # substituting would drop the reasons
                return None
            inverse = np.empty(layout.length, dtype=np.int64)
            inverse[seg.positions[:, 0]] = np.arange(layout.length)
            units = self.spaces.new(width)
            mapping = Layout(
                layout.length, (type(seg)(units, inverse[np.arange(layout.length).reshape(parts, width).T]),)
            )
            self._substitute(root, mapping)
            layout = substituted(layout, self.spaces.find, root, mapping)
            seg = layout.segments[0]
        if seg.positions.shape != (width, parts) or not np.array_equal(
            seg.positions[:, column], np.arange(start, stop)
        ):
            return None
        return Layout(width, (type(seg)(seg.space, np.arange(width, dtype=np.int64)[:, None]),))

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
        if t.name not in self._views:
            self._views[t.name] = self.rules.const_view(self, t)
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

    def const_ancestors_weights(self, t: tf.Tensor) -> bool:
        """Whether a const-derived tensor reads any weight (not only graph constants)."""
        assert self.sig is not None
        return any(not key.startswith("const:") for key in self.const_ancestors(t))

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


def walk_up(
    start: Iterable[tf.Tensor | tf.Operation], stop: Callable[[tf.Tensor], bool] | None = None
) -> set[str]:
    """Names of the ops (and tensors) ``start`` depends on through data and control inputs, not walking above
    a tensor for which ``stop`` is true (asked once per tensor)."""
    seen: set[str] = set()
    items = list(start)
    while items:
        item = items.pop()
        if item.name in seen:
            continue
        seen.add(item.name)
        if isinstance(item, tf.Tensor):
            if stop is not None and stop(item):
                continue
            item = item.op
            if item.name in seen:
                continue
            seen.add(item.name)
        items.extend(item.inputs)
        items.extend(item.control_inputs)
    return seen


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


__all__ = [
    "ConsumerUse",
    "Key",
    "Role",
    "Rule",
    "RuleTable",
    "ShapePatch",
    "Source",
    "Walker",
    "last_dim",
]
