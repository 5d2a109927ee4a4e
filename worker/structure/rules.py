"""One rule per op type: how the channels (last axis, NHWC) flow through it.

``RULES`` maps an op type to a function ``(walker, op)`` that sets the layouts of the op's outputs and binds the
weight axes the op indexes by channel; ``DEFAULT_RULES`` is the table the walker gets (``graph_walk``):

- producers (Conv1D/2D/3D, MatMul/Dense, BatchMatMul with a 2-D weight, Einsum with a clean 2-D weight, the
  pointwise half of a separable conv): the kernel's output axis starts a space, its input axis is a *consumer*
  slice of the input's layout;
- depthwise convs tie their input channels to their output channels (multiplier ``m``: channel ``c`` is outputs
  ``c*m .. c*m+m-1``);
- grouped convs (a plain ``Conv2D``, or Keras 3's XLA-compiled call of one: ``function_call``) make each
  whole group one channel: the input's ``cin/g`` channels of group ``j`` with the kernel's ``cout/g`` outputs;
- carriers keep the layout (activations, bias, BatchNorm fused or lowered, pooling, padding, casts, reductions
  over spatial axes, resizes); element-wise binary ops couple their operands (residual Add, squeeze-excite Mul);
- ``Select``/``SelectV2`` couple their data operands like an element-wise op when the condition is the same
  along every channel/head axis (a padding mask broadcast over the heads); otherwise those axes stay whole;
- ConcatV2 on the channel axis concatenates layouts; Reshape either keeps the channel axis or flattens it;
- a ``While`` loop (Keras LSTM/GRU/SimpleRNN) has its body walked with these rules (``recurrent_loop``): the
  loop's states are coupled with what the body returns for them, and a gate pre-activation cut into gates
  (``Split``, ``StridedSlice``) makes each unit's gate columns one channel;
- anything else is ``unknown``: its inputs' channels are frozen with the op's type and name.

Weights reach ops through const-only subgraphs (Keras 3: ``ReadVariableOp -> Reshape -> Squeeze -> BiasAdd``,
lowered BatchNorm ``Rsqrt(var + eps) * gamma``); ``const_view`` traces those back to the weights and the axis
each tensor axis comes from, and records the shape constants a compaction must rewrite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import tensorflow as tf

from worker.structure.frozen import FrozenSignature, const_value
from worker.structure.graph_walk import ConsumerUse, Rule, RuleTable, ShapePatch, Source, Walker, last_dim
from worker.structure.layout import Layout

UNARY = {
    "Identity", "Snapshot", "StopGradient", "PreventGradient", "Cast", "CheckNumerics",
    "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Sigmoid", "Tanh", "Softplus", "Softsign", "Erf", "Erfc",
    "Exp", "Expm1", "Log", "Log1p", "Neg", "Abs", "Square", "Sqrt", "Rsqrt", "Reciprocal", "Inv", "Sign",
    "Floor", "Ceil", "Round", "Rint", "Sin", "Cos", "Atan", "Tan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
    "IsNan", "ZerosLike", "OnesLike",
}  # fmt: skip
BINARY = {
    "Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "MulNoNan", "Maximum", "Minimum",
    "SquaredDifference", "Pow", "FloorDiv", "FloorMod", "AddN", "ClipByValue", "SelectV2", "BiasAdd",
}  # fmt: skip
SPATIAL = {
    "MaxPool", "AvgPool", "MaxPool3D", "AvgPool3D", "MaxPoolV2", "ResizeBilinear", "ResizeNearestNeighbor",
    "ResizeBicubic", "ResizeArea",
}  # fmt: skip
REDUCTIONS = {"Mean", "Max", "Min", "Sum", "Prod"}
NORMALISED = {"Softmax", "LogSoftmax"}
# Element-wise ops a padding mask is built with (besides UNARY/BINARY): they broadcast right-aligned too.
LOGICAL = {
    "LogicalAnd", "LogicalOr", "LogicalNot", "Equal", "NotEqual", "Less", "LessEqual", "Greater",
    "GreaterEqual",
}  # fmt: skip
SELECT = {"Select", "SelectV2"}


def _where(op: tf.Operation) -> str:
    return f"{op.type} at {op.name}"


def _attr(op: tf.Operation, name: str, default: object = None) -> object:
    try:
        return op.get_attr(name)
    except ValueError:
        return default


def _const_int(walker: Walker, t: tf.Tensor) -> np.ndarray | None:
    """The integer value of a const-derived tensor (axes, paddings, perms) or None."""
    value = tf.get_static_value(t)
    if value is not None:
        return np.asarray(value)
    if t.op.type == "Const":
        return const_value(t.op)
    if t.dtype.is_integer and walker.is_const(t) and not walker.const_ancestors_weights(t):
        try:  # a small integer subgraph of constants (Tile multiples built with Pack/Reshape/Cast)
            with tf.compat.v1.Session(graph=t.graph) as session:
                return np.asarray(session.run(t))
        except Exception:  # anything it cannot run is simply not a known constant
            return None
    return None


# --- const subgraphs --------------------------------------------------------------------------------------


def _non_one(shape: list[int | None]) -> list[int]:
    return [i for i, d in enumerate(shape) if d != 1]


def const_view(walker: Walker, t: tf.Tensor) -> list[Source] | None:
    """Trace a const-derived tensor to the weights it reads; None through an op it cannot map."""
    op = t.op
    shape = t.shape
    if shape.rank is None:
        return None
    if op.type == "Const" or (walker.sig is not None and op.name in walker.sig.weights):
        return [Source(walker.key_of(op), tuple(range(shape.rank)))]
    if op.type in UNARY or op.type in ("ReadVariableOp",):
        return walker.view(op.inputs[0])
    if op.type in BINARY and op.type != "BiasAdd":
        sources: list[Source] = []
        for inp in op.inputs:
            srcs = walker.view(inp)
            if srcs is None:
                return None
            if any(src.merged is not None for src in srcs):
                return None
            sources.extend(_broadcast(srcs, inp.shape, shape))
        return sources
    if op.type in ("Reshape", "Squeeze", "ExpandDims"):
        srcs = walker.view(op.inputs[0])
        in_shape = op.inputs[0].shape
        if srcs is None or in_shape.rank is None or not in_shape.is_fully_defined():
            return None
        if not shape.is_fully_defined():
            return None
        ins, outs = _non_one(in_shape.as_list()), _non_one(shape.as_list())
        groups = _merge_groups([int(in_shape[i]) for i in ins], [int(shape[i]) for i in outs])
        if groups is None or any(s.merged is not None for s in srcs):
            return None
        merged_any = any(len(g) > 1 for g in groups)
        if merged_any and (op.type != "Reshape" or len(srcs) != 1):
            return None
        mapped = []
        for src in srcs:
            axes: list[int | None] = [None] * shape.rank
            factors = [1] * shape.rank
            for group, i_out in zip(groups, outs, strict=True):
                axes[i_out] = src.axes[ins[group[0]]]
                factors[i_out] = int(np.prod([in_shape[ins[g]] for g in group[1:]], dtype=np.int64))
                for g in group[1:]:  # inner axes of a merge: never sliced
                    if src.axes[ins[g]] is not None:
                        walker.untracked.setdefault((src.key, src.axes[ins[g]]), _where(op))
            mapped.append(Source(src.key, tuple(axes), tuple(factors) if merged_any else None))
        if op.type == "Reshape" and mapped:
            target = op.inputs[1]
            if target.op.type != "Const":
                return None
            for j in outs:
                src = next((s for s in mapped if s.axes[j] is not None), None)
                if src is None:
                    return None
                k = src.factor(j)
                layout = walker.key_layout((src.key, src.axes[j]), int(shape[j]) // k, "carrier")
                walker.patches.append(ShapePatch(walker.sig.name, target.op.name, j, k, layout))
        return mapped
    if op.type in ("Split", "Unpack"):
        value, axis_t = (op.inputs[1], op.inputs[0]) if op.type == "Split" else (op.inputs[0], None)
        srcs = walker.view(value)
        rank = value.shape.rank
        axis = int(_attr(op, "axis", 0)) if axis_t is None else _const_int(walker, axis_t)
        if srcs is None or rank is None or axis is None or any(s.merged is not None for s in srcs):
            return None
        axis = int(axis) % rank
        for src in srcs:  # the cut axis is never sliced by channel (GRU's bias: input and recurrent rows)
            if src.axes[axis] is not None:
                walker.untracked.setdefault((src.key, src.axes[axis]), _where(op))
        if op.type == "Split":
            return [
                Source(s.key, tuple(None if i == axis else a for i, a in enumerate(s.axes))) for s in srcs
            ]
        return [Source(s.key, tuple(a for i, a in enumerate(s.axes) if i != axis)) for s in srcs]
    if op.type == "Transpose":
        srcs = walker.view(op.inputs[0])
        perm = _const_int(walker, op.inputs[1])
        if srcs is None or perm is None or any(src.merged is not None for src in srcs):
            return None
        return [Source(s.key, tuple(s.axes[int(p)] for p in perm)) for s in srcs]
    return None


def _merge_groups(in_dims: list[int], out_dims: list[int]) -> list[list[int]] | None:
    """For each output dim, the consecutive input dims whose product it is (a reshape that only merges
    neighbouring axes); None for any other reshape."""
    groups: list[list[int]] = []
    i = 0
    for od in out_dims:
        group: list[int] = []
        prod = 1
        while i < len(in_dims) and prod < od:
            group.append(i)
            prod *= in_dims[i]
            i += 1
        if prod != od or not group:
            return None
        groups.append(group)
    return groups if i == len(in_dims) else None


def _broadcast(srcs: list[Source], in_shape: tf.TensorShape, out_shape: tf.TensorShape) -> list[Source]:
    """Axis maps of an operand broadcast (right-aligned) to the output shape."""
    if in_shape.rank is None or out_shape.rank is None:
        return srcs
    out = []
    offset = out_shape.rank - in_shape.rank
    for src in srcs:
        axes: list[int | None] = [None] * out_shape.rank
        for i in range(in_shape.rank):
            if in_shape[i] != 1:
                axes[i + offset] = src.axes[i]
        out.append(Source(src.key, tuple(axes)))
    return out


def _single_source(walker: Walker, t: tf.Tensor, merged: bool = False) -> Source | None:
    """The one weight a kernel-like operand reads; axes it inserts (Conv1D's ExpandDims) map to None.
    ``merged``: the caller maps merged axes (``Source.merged``, a reshaped EinsumDense kernel)."""
    srcs = walker.view(t) if walker.is_const(t) else None
    if not srcs or len(srcs) != 1 or (srcs[0].merged is not None and not merged):
        return None
    return srcs[0]


# --- rules ----------------------------------------------------------------------------------------------


def unknown(walker: Walker, op: tf.Operation, reason: str | None = None) -> None:
    """No rule: freeze every channel the op touches, and every weight it reads."""
    why = reason or f"unknown op {op.type} at {op.name}"
    for inp in op.inputs:
        if walker.is_const(inp):
            walker.untrack_all(inp, _where(op))
        else:
            walker.spaces.freeze_layout(walker.layout(inp), why)
            walker.spaces.freeze_layout(walker.lists.get(inp.name), why)
            walker.freeze_inner(inp, why)
    for out in op.outputs:
        walker.set_layout(out, None, why)


def carrier(walker: Walker, op: tf.Operation) -> None:
    """Output channels are the input's (activations, pooling, casts); other inputs must be const params."""
    x = op.inputs[0]
    for extra in op.inputs[1:]:
        if not walker.is_const(extra):
            return unknown(walker, op)
    if last_dim(op.outputs[0]) != last_dim(x):
        return unknown(walker, op)
    _pass_inner(walker, x, op.outputs[0])
    if x.name in walker.lists:  # an Identity of a TensorList handle: the same elements
        walker.lists[op.outputs[0].name] = walker.lists[x.name]
    for out in op.outputs[1:]:
        walker.set_layout(out, None, f"unknown op output {op.name}")
    return None


def _pass_inner(walker: Walker, x: tf.Tensor, out: tf.Tensor) -> None:
    """``out`` has ``x``'s layouts on every axis (same shape): the last one and the inner ones (heads)."""
    inner = walker.inner.get(x.name)
    if inner and out.shape.rank != x.shape.rank:
        walker.freeze_inner(x, f"rank changes at {out.op.name}")
        inner = None
    if inner and walker.layout(x) is None:
        walker.layouts[out.name] = None
    else:
        walker.set_layout(out, walker.layout(x))
    walker.set_inner(out, inner or {})


def _uniform_along(t: tf.Tensor, axis: int, width: int | None) -> bool:
    """Whether ``t`` holds the same values at every index of ``axis`` (counted from the end) and its length
    there follows the other operands' at run time, so removing heads (or channels) there leaves it right: a
    padding mask built from the model's inputs and broadcast over the heads. Length 1 (or an axis the tensor
    lacks) broadcasts; ``Fill``/``OnesLike``/``BroadcastTo`` to a shape read at run time repeat one value;
    element-wise ops are uniform where all their operands are (right-aligned, as they broadcast). Anything
    else (a signature input with that axis, a float tensor carrying heads) is not. ``width``: the axis'
    length in the op being walked (a shape constant that spells it would not follow a compaction)."""
    memo: dict[str, bool] = {}

    def follows(target: tf.Tensor) -> bool:
        """A shape computed from run-time shapes of computed tensors (a signature input keeps its length)."""
        if width is None or not _from_runtime_shape(target, int(width)):
            return False
        seen: set[str] = set()
        stack = [target.op]
        while stack:
            op = stack.pop()
            if op.name in seen:
                continue
            seen.add(op.name)
            if op.type == "Shape":
                if op.inputs[0].op.type == "Placeholder":
                    return False
                continue
            stack.extend(i.op for i in op.inputs)
        return True

    def uniform(t: tf.Tensor) -> bool:
        if t.name in memo:
            return memo[t.name]
        memo[t.name] = False  # a cycle (none in a frozen graph) is not uniform
        shape, op = t.shape, t.op
        if shape.rank is None:
            result = False
        elif -axis > shape.rank or shape[axis] == 1 or op.type in ("ZerosLike", "OnesLike"):
            result = True  # broadcast there, or one value repeated to its input's run-time shape
        elif op.type == "Fill":
            result = op.inputs[1].shape.rank == 0 and follows(op.inputs[0])
        elif op.type == "BroadcastTo":
            result = uniform(op.inputs[0]) and follows(op.inputs[1])
        elif op.type in UNARY or op.type in BINARY or op.type in LOGICAL or op.type == "SelectV2":
            result = op.type != "BiasAdd" and all(uniform(i) for i in op.inputs)
        else:
            result = False
        memo[t.name] = result
        return result

    return uniform(t)


def select(walker: Walker, op: tf.Operation) -> None:
    """``where(condition, a, b)``: the values of ``a`` and ``b`` reach the output, the condition only picks
    between them. A condition with no channels of its own on the axes where the data carry channels or heads
    (a padding mask from the inputs, the same for every head: ``_uniform_along``) lets them pass as through
    any element-wise op; one that varies there (computed from the heads' scores, or a per-head input) would
    have to lose the removed heads too, so those channels are left whole with that reason. ``Select`` with a
    vector condition picks whole rows (axis 0), never a channel axis."""
    cond, data = op.inputs[0], list(op.inputs[1:])
    out = op.outputs[0]
    if op.type == "Select" and cond.shape.rank == 1 and (out.shape.rank or 0) > 1:
        return elementwise(walker, op, data)
    if out.shape.rank is None or cond.shape.rank is None:
        return unknown(walker, op)
    if walker.is_const(cond):
        return elementwise(walker, op)  # a constant condition is sliced with the channels, as a carrier
    axes = {-1} | {p for t in data for p in walker.inner.get(t.name, {})}
    why = f"the condition of {op.type} at {op.name} differs along a channel axis (it carries channels)"
    for p in sorted(axes):
        if -p > out.shape.rank or _uniform_along(cond, p, out.shape[p]):
            continue
        for t in data:
            if not walker.is_const(t) and -p <= (t.shape.rank or 0):
                walker.spaces.freeze_layout(walker.layout_at(t, p), why)
    return elementwise(walker, op, data)


def elementwise(walker: Walker, op: tf.Operation, operands: Sequence[tf.Tensor] | None = None) -> None:
    """Broadcasting element-wise ops: operands with the output's channels are coupled one to one.
    ``operands``: the inputs that carry values into the output (``select`` leaves its condition out)."""
    inputs = list(op.inputs) if operands is None else list(operands)
    if op.type == "BiasAdd" and _attr(op, "data_format", b"NHWC") not in (b"NHWC", "NHWC"):
        return unknown(walker, op)
    if any(inp.name in walker.inner for inp in inputs):
        return _elementwise_nd(walker, op, inputs)
    out = op.outputs[0]
    width = last_dim(out)
    if width is None:
        return unknown(walker, op)
    layouts: list[Layout] = []
    pending: list[tuple[str, int]] = []
    for inp in inputs:
        w = last_dim(inp)
        if walker.is_const(inp):
            srcs = walker.view(inp)
            if srcs is None:
                return unknown(walker, op, f"unknown op {op.type} at {op.name} (untraceable constant)")
            aligned = _broadcast(srcs, inp.shape, out.shape) if inp.shape.rank is not None else srcs
            tracked = set()
            for src in aligned:
                ax = src.axes[-1] if src.axes and w == width and width > 1 else None
                if ax is not None:
                    pending.append((src.key, ax))
                    tracked.add((src.key, ax))
            walker.mark_untracked(srcs, tracked, _where(op))
            continue
        if w == width and width > 1:
            layout = walker.layout(inp)
            if layout is None:
                return unknown(walker, op)
            layouts.append(layout)
    if width <= 1:
        walker.set_layout(out, None)
        return None
    if layouts:
        result = layouts[0]
        for other in layouts[1:]:
            result = walker.unify(result, other, _where(op))
    elif pending:
        result = walker.key_layout(pending[0], width, "carrier")
    else:
        walker.set_layout(out, None)
        return None
    for key in pending:
        result = walker.bind(key, result, "carrier", _where(op))
    walker.set_layout(out, result)
    return None


def _elementwise_nd(walker: Walker, op: tf.Operation, inputs: Sequence[tf.Tensor]) -> None:
    """Element-wise ops on tensors with inner layouts (attention heads ``[.., heads, head_dim]`` plus a bias
    ``[heads, head_dim]``, a score scale): every axis is coupled on its own, right-aligned as broadcasting
    does. An axis where an operand's channels are of unknown origin freezes the others, unless that operand
    is the same at every index of the axis (a padding mask as ``(1 - mask) * -1e9``: ``_uniform_along``)."""
    out = op.outputs[0]
    rank = out.shape.rank
    if rank is None or any(inp.shape.rank is None for inp in inputs):
        return unknown(walker, op)
    where = _where(op)
    positions = {-1} | {p for inp in inputs for p in walker.inner.get(inp.name, {})}
    tracked: set[tuple[str, int]] = set()
    inner: dict[int, Layout] = {}
    last: Layout | None = None
    for p in sorted(positions):
        if -p > rank:
            continue
        width = out.shape[p]
        layouts: list[Layout] = []
        pending: list[tuple[str, int]] = []
        unknown_seen = False
        for inp in inputs:
            if -p > inp.shape.rank:
                continue
            w = inp.shape[p]
            if (
                not walker.is_const(inp)
                and walker.layout_at(inp, p) is None
                and _uniform_along(inp, p, width)
            ):
                continue  # the same for every head (a mask built from the inputs): broadcast along this axis
            if w is None and width is not None:
                unknown_seen = True
                continue
            if w != width or width in (None, 1):
                continue  # broadcast along this axis
            if walker.is_const(inp):
                srcs = walker.view(inp)
                if srcs is None:
                    return unknown(walker, op, f"unknown op {op.type} at {op.name} (untraceable constant)")
                for src in _broadcast(srcs, inp.shape, out.shape):
                    if src.axes[p] is not None:
                        pending.append((src.key, src.axes[p]))
            else:
                layout = walker.layout_at(inp, p)
                if layout is None:
                    unknown_seen = True
                else:
                    layouts.append(layout)
        if unknown_seen or not layouts:
            for layout in layouts:
                walker.spaces.freeze_layout(layout, f"mixed with channels of unknown origin at {op.name}")
            continue
        result = layouts[0]
        for other in layouts[1:]:
            result = walker.unify(result, other, where)
        for key in pending:
            result = walker.bind(key, result, "carrier", where)
            tracked.add(key)
        if p == -1:
            last = result
        else:
            inner[p] = result
    for inp in inputs:
        if walker.is_const(inp):
            srcs = walker.view(inp)
            if srcs is not None:
                walker.mark_untracked(srcs, tracked, where)
    if last is None and inner:
        walker.layouts[out.name] = None  # e.g. head_dim: never pruned on its own
    else:
        walker.set_layout(out, last)
    walker.set_inner(out, inner)
    return None


def _conv_exact(op: tf.Operation, kernel: tf.Tensor, spatial: int) -> bool:
    """A constant input channel adds a constant to every output only if no zero padding meets the window."""
    padding = _attr(op, "padding", b"VALID")
    padding = padding.decode() if isinstance(padding, bytes) else str(padding)
    window = kernel.shape.as_list()[:spatial]
    return padding == "VALID" or all(d == 1 for d in window)


def _produce(
    walker: Walker, op: tf.Operation, x: tf.Tensor, src: Source, in_ax: int, out_ax: int, exact: bool
) -> None:
    in_key, out_key = (src.key, src.axes[in_ax]), (src.key, src.axes[out_ax])
    k_in, k_out = src.factor(in_ax), src.factor(out_ax)
    kernel_shape = op.inputs[1].shape if len(op.inputs) > 1 else None
    lx = walker.layout(x)
    if lx is not None:
        if k_in > 1:  # the kernel's input axis is [heads, head_dim] merged: its rows are whole heads
            lin = lx.divided(k_in)
            if lin is None:
                return unknown(
                    walker, op, f"input channels of {op.name} do not line up with its kernel's merged axes"
                )
            walker.bind(in_key, lin, "consumer", _where(op))
            walker.consumers.append(ConsumerUse(walker.sig.name, op.name, x.name, in_key, out_key, False, lx))
        else:
            walker.bind(in_key, lx, "consumer", _where(op))
            use_exact = exact and k_out == 1  # a constant folds into a bias of the tensor's width only
            walker.consumers.append(ConsumerUse(walker.sig.name, op.name, x.name, in_key, out_key, use_exact))
    elif kernel_shape is not None and last_dim(x) not in (1, None):
        return unknown(walker, op)
    width = last_dim(op.outputs[0])
    if width is None or width % k_out:
        return unknown(walker, op)
    if k_out > 1:  # output [.., heads * head_dim]: head h is the k_out indices from h * k_out
        layout = walker.key_layout(out_key, width // k_out, "producer").multiplied(k_out)
    else:
        layout = walker.key_layout(out_key, width, "producer")
    walker.set_layout(op.outputs[0], layout)
    return None


def conv(walker: Walker, op: tf.Operation) -> None:
    x, k = op.inputs[0], op.inputs[1]
    fmt = _attr(op, "data_format", b"NHWC")
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    src = _single_source(walker, k)
    if src is None or walker.is_const(x) or not fmt.endswith("C") or k.shape.rank is None:
        return unknown(walker, op)
    r = k.shape.rank
    if src.axes[r - 2] is None or src.axes[r - 1] is None:
        return unknown(walker, op)
    if last_dim(x) != k.shape[r - 2]:  # grouped convolution (TF's CPU kernel runs a plain Conv2D so too)
        refusal = _grouped(walker, op, x, src, k, op.outputs[0]) if r == 4 else "not a 2-D convolution"
        if refusal is not None:
            unknown(walker, op, f"grouped convolution at {op.name}: {refusal}; its channels are left whole")
        return None
    walker.mark_untracked([src], {(src.key, src.axes[r - 2]), (src.key, src.axes[r - 1])}, _where(op))
    return _produce(walker, op, x, src, r - 2, r - 1, _conv_exact(op, k, r - 2))


def _grouped(
    walker: Walker, op: tf.Operation, x: tf.Tensor, src: Source, k: tf.Tensor, out: tf.Tensor
) -> str | None:
    """A grouped convolution (kernel ``[kh, kw, cin/g, cout]``): its channels are whole groups. Group ``j`` is
    input channels ``j*cin_g ..`` (coarsened into one channel of ``cin_g`` positions, as ``Walker.coarsen_blocks``
    does for attention heads) with output channels ``j*cout_g ..``; the kernel's output axis is a producer of
    the same group space and its input axis (``cin_g``) is never sliced, so removing a group keeps the
    convolution grouped (TensorFlow infers ``g`` from the shapes). The reason it cannot, or None."""
    cin, cin_g, cout = last_dim(x), k.shape[2], k.shape[3]
    if cin is None or cin_g is None or cout is None or cin % cin_g:
        return "its channel counts are not known statically"
    groups = cin // cin_g
    if cout % groups:
        return f"{cout} output channels do not split into {groups} groups"
    walker.mark_untracked([src], {(src.key, src.axes[3])}, _where(op))  # the input axis: never sliced
    cout_g = cout // groups
    lx = walker.layout(x)
    if lx is None:
        return f"{groups} groups of input channels of unknown origin"
    lin = lx.divided(cin_g)
    if lin is None:
        coarse = walker.coarsen_blocks(lx, cin_g)
        lin = None if coarse is None else coarse.divided(cin_g)
    if lin is None:
        return f"its input channels do not line up with {groups} whole groups of {cin_g}"
    layout = lin if cout_g == 1 else lin.multiplied(cout_g)
    layout = walker.bind((src.key, src.axes[3]), layout, "producer", _where(op))
    walker.set_layout(out, layout)
    return None


_CALL_BODY = {"Identity", "NoOp", "Conv2D", "BiasAdd"}


def function_call(walker: Walker, op: tf.Operation) -> None:
    """``(Stateful)PartitionedCall`` that freezing did not inline: Keras 3 runs a grouped ``Conv2D`` as an
    XLA-compiled function of its own (TF's CPU kernel once did not run grouped convolutions). A body of
    exactly one grouped ``Conv2D`` (maybe a ``BiasAdd``) reading a weight argument is walked as that
    convolution; any other call freezes what it touches."""
    try:
        refusal = _grouped_call(walker, op)
    except Exception as exc:  # a body this rule did not foresee: whole, never guessed
        refusal = f"not understood ({type(exc).__name__}: {exc})"
    if refusal == "":
        return unknown(walker, op)
    if refusal is not None:
        unknown(walker, op, f"grouped convolution call ({op.type} at {op.name}): {refusal}; left whole"[:300])
    return None


def _library_graph(
    walker: Walker, name: str, call: tf.Operation, convs: int | None = None
) -> tf.Graph | None:
    """The library function ``name`` (a loop body or condition, a call's body) as a graph whose arguments
    have the shapes of ``call``'s inputs; None when the signature's library does not hold it, or (with
    ``convs``) when its body does not hold exactly that many ``Conv2D`` ops: checked on the FunctionDef, so a
    large call that is no grouped convolution is never imported as a graph."""
    from tensorflow.python.framework.function_def_to_graph import function_def_to_graph

    assert walker.sig is not None
    fn = next((f for f in walker.sig.graph_def.library.function if f.signature.name == name), None)
    if fn is None or (convs is not None and sum(n.op == "Conv2D" for n in fn.node_def) != convs):
        return None
    return function_def_to_graph(fn, input_shapes=[t.shape for t in call.inputs])


def _grouped_call(walker: Walker, op: tf.Operation) -> str | None:
    """Walk a grouped-convolution call; its refusal, "" when the body is not a convolution at all, or None."""
    if len(op.outputs) != 1:
        return ""
    body = _library_graph(walker, op.get_attr("f").name, op, convs=1)
    if body is None:
        return ""
    ops = [o for o in body.get_operations() if o.type != "Placeholder"]
    if any(o.type not in _CALL_BODY for o in ops) or len(body.outputs) != 1:
        return f"its body holds {sorted({o.type for o in ops} - _CALL_BODY)} besides one Conv2D"
    (cv,) = [o for o in ops if o.type == "Conv2D"]  # exactly one: _library_graph counted them
    fmt = _attr(cv, "data_format", b"NHWC")
    if fmt not in (b"NHWC", "NHWC"):
        return f"data format {fmt.decode() if isinstance(fmt, bytes) else fmt}"
    args = {t.op.name: i for i, t in enumerate(body.inputs)}
    ret = _through_identity(body.outputs[0])
    bias: tf.Tensor | None = None
    if ret.op.type == "BiasAdd" and _attr(ret.op, "data_format", b"NHWC") in (b"NHWC", "NHWC"):
        bias, ret = _through_identity(ret.op.inputs[1]), _through_identity(ret.op.inputs[0])
    x_arg, k_arg = _through_identity(cv.inputs[0]), _through_identity(cv.inputs[1])
    if ret is not cv.outputs[0] or x_arg.op.name not in args or k_arg.op.name not in args:
        return "its body is not one Conv2D of its arguments"
    if bias is not None and bias.op.name not in args:
        return "its bias is not an argument"
    x, k = op.inputs[args[x_arg.op.name]], op.inputs[args[k_arg.op.name]]
    src = _single_source(walker, k)
    if src is None or walker.is_const(x) or k.shape.rank != 4 or None in (src.axes[2], src.axes[3]):
        return "its kernel is not one weight"
    if last_dim(x) == k.shape[2]:
        return ""  # an ordinary convolution in a call: nothing says why it is one, so unknown
    bsrc = None
    if bias is not None:
        bsrc = _single_source(walker, op.inputs[args[bias.op.name]])
        if bsrc is None or len(bsrc.axes) != 1 or bsrc.axes[0] is None:
            return "its bias is not one weight vector"
    refusal = _grouped(walker, op, x, src, k, op.outputs[0])
    if refusal is not None:
        return refusal
    if bsrc is not None:
        layout = walker.layout(op.outputs[0])
        if layout is not None:
            walker.bind((bsrc.key, bsrc.axes[0]), layout, "carrier", _where(op))
    return None


def conv_transpose(walker: Walker, op: tf.Operation) -> None:
    """``Conv2DBackpropInput(input_sizes, filter [kh, kw, out, in], x)``: the filter's axis 2 produces, its
    axis 3 consumes; the output size vector names the channel count, so it is rewritten on compaction."""
    sizes, k, x = op.inputs
    src = _single_source(walker, k)
    fmt = _attr(op, "data_format", b"NHWC")
    if src is None or walker.is_const(x) or fmt not in (b"NHWC", "NHWC") or k.shape.rank != 4:
        return unknown(walker, op)
    if src.axes[2] is None or src.axes[3] is None or last_dim(x) != k.shape[3]:
        return unknown(walker, op)
    where = _shape_last(walker, sizes)
    if where is None:
        return unknown(walker, op, f"unknown op {op.type} at {op.name} (dynamic output size)")
    walker.mark_untracked([src], {(src.key, src.axes[2]), (src.key, src.axes[3])}, _where(op))
    lx = walker.layout(x)
    out_key, in_key = (src.key, src.axes[2]), (src.key, src.axes[3])
    if lx is not None:
        walker.bind(in_key, lx, "consumer", _where(op))
        # A constant input channel spreads into a position-dependent pattern: never folded.
        walker.consumers.append(ConsumerUse(walker.sig.name, op.name, x.name, in_key, out_key, False))
    width = last_dim(op.outputs[0])
    if width is None:
        return unknown(walker, op)
    layout = walker.key_layout(out_key, width, "producer")
    node, index, value = where
    if value != -1:
        walker.patches.append(ShapePatch(walker.sig.name, node, index, 1, layout))
    walker.set_layout(op.outputs[0], layout)
    return None


def matmul(walker: Walker, op: tf.Operation) -> None:
    a, b = op.inputs[0], op.inputs[1]
    ta = bool(_attr(op, "transpose_a", False) or _attr(op, "adj_x", False))
    tb = bool(_attr(op, "transpose_b", False) or _attr(op, "adj_y", False))
    if not walker.is_const(a) and not walker.is_const(b):
        return _matmul_activations(walker, op, ta, tb)
    src = _single_source(walker, b, merged=True)
    if src is None or walker.is_const(a) or ta or b.shape.rank != 2:
        return unknown(walker, op)
    walker.freeze_inner(a, f"unknown op {op.type} at {op.name} (on an inner axis: heads)")
    in_ax, out_ax = (1, 0) if tb else (0, 1)
    if None in src.axes:
        return unknown(walker, op)
    walker.mark_untracked([src], {(src.key, src.axes[0]), (src.key, src.axes[1])}, _where(op))
    return _produce(walker, op, a, src, in_ax, out_ax, True)


def _matmul_activations(walker: Walker, op: tf.Operation, ta: bool, tb: bool) -> None:
    """A batched matmul of two activations (attention written with ``tf.matmul``: ``q @ k^T`` and
    ``p @ v`` on ``[B, H, T, D]``): the einsum ``...mk,...kn->...mn`` with equal ranks."""
    a, b = op.inputs
    rank = a.shape.rank
    if op.type == "MatMul" or rank is None or rank != b.shape.rank or rank < 2 or rank > 12:
        return unknown(walker, op)
    batch = "abcdefghij"[: rank - 2]
    lhs = batch + ("km" if ta else "mk")
    rhs = batch + ("nk" if tb else "kn")
    return _einsum_activations(walker, op, [lhs, rhs], batch + "mn")


def einsum(walker: Walker, op: tf.Operation) -> None:
    """``...x,xy->...y``-shaped equations with a 2-D weight; anything else is unknown."""
    eq = _attr(op, "equation", b"")
    eq = eq.decode() if isinstance(eq, bytes) else str(eq)
    if len(op.inputs) != 2 or "->" not in eq:
        return unknown(walker, op)
    lhs, out = eq.replace(" ", "").split("->")
    parts = lhs.split(",")
    x, w = op.inputs
    if not walker.is_const(x) and not walker.is_const(w):
        return _einsum_activations(walker, op, parts, out)
    if walker.is_const(x) and not walker.is_const(w):
        x, w, parts = w, x, parts[::-1]
    src = _single_source(walker, w, merged=True)
    xs, ws = parts
    if src is not None and len(ws) == 3 and src.merged is None and None not in src.axes and xs and out:
        return _einsum_heads(walker, op, x, src, xs, ws, out)
    if src is None or len(ws) != 2 or not xs or not out:
        return unknown(walker, op)
    walker.freeze_inner(x, f"unknown op {op.type} at {op.name} (on an inner axis: heads)")
    c_in, c_out = xs[-1], out[-1]
    if c_in not in ws or c_out not in ws or c_in == c_out or c_in in out or c_out in xs:
        return unknown(walker, op)
    if xs[:-1] != out[:-1]:
        return unknown(walker, op)
    in_ax, out_ax = ws.index(c_in), ws.index(c_out)
    if None in src.axes:
        return unknown(walker, op)
    walker.mark_untracked([src], {(src.key, src.axes[0]), (src.key, src.axes[1])}, _where(op))
    return _produce(walker, op, x, src, in_ax, out_ax, True)


def _einsum_heads(
    walker: Walker, op: tf.Operation, x: tf.Tensor, src: Source, xs: str, ws: str, out: str
) -> None:
    """EinsumDense with a 3-D kernel, the two halves of multi-head attention (Keras 3 with a dynamic sequence
    length, tf_keras): ``abc,cde->abde`` projects the channels into ``[heads d, head_dim e]`` (the kernel's
    ``d`` axis produces heads, an inner layout at axis -2); ``abcd,cde->abe`` reads ``[heads c, head_dim d]``
    back into channels (``c`` consumes the heads, ``e`` produces). ``head_dim`` is never pruned on its own."""
    where = _where(op)
    if len(set(ws)) != 3 or len(set(xs)) != len(xs) or x.shape.rank != len(xs):
        return unknown(walker, op)
    contracted = [ch for ch in ws if ch in xs and ch not in out]
    produced = [ch for ch in ws if ch in out and ch not in xs]
    key, axes = src.key, src.axes
    result = op.outputs[0]
    if len(contracted) == 1 and len(produced) == 2:
        c = contracted[0]
        if xs[-1] != c or out[-2:] != "".join(produced) or xs[:-1] != out[:-2]:
            return unknown(walker, op)
        in_key, heads_key = (key, axes[ws.index(c)]), (key, axes[ws.index(produced[0])])
        walker.mark_untracked([src], {in_key, heads_key}, where)
        walker.freeze_inner(x, f"unknown op {op.type} at {op.name} (on an inner axis: heads)")
        lx = walker.layout(x)
        if lx is not None:
            walker.bind(in_key, lx, "consumer", where)
            walker.consumers.append(ConsumerUse(walker.sig.name, op.name, x.name, in_key, heads_key, False))
        elif last_dim(x) not in (1, None):
            return unknown(walker, op)
        heads = walker.key_layout(heads_key, int(op.inputs[1].shape[ws.index(produced[0])]), "producer")
        walker.layouts[result.name] = None
        walker.set_inner(result, {-2: heads})
        return None
    if len(contracted) == 2 and len(produced) == 1:
        if (
            xs[-2:] != "".join(c for c in xs if c in contracted)
            or out[-1] != produced[0]
            or xs[:-2] != out[:-1]
        ):
            return unknown(walker, op)
        in_key, out_key = (key, axes[ws.index(xs[-2])]), (key, axes[ws.index(produced[0])])
        heads, last = walker.layout_at(x, -2), walker.layout(x)
        if last is not None and not all(walker.spaces.reasons(seg.space) for seg in last.segments):
            return unknown(walker, op, f"unknown op {op.type} at {op.name} (head_dim channels)")
        tracked = {out_key}
        if heads is not None:
            tracked.add(in_key)
            walker.bind(in_key, heads, "consumer", where)
            head_dim = int(x.shape[-1])
            walker.consumers.append(
                ConsumerUse(
                    walker.sig.name, op.name, x.name, in_key, out_key, False, heads.multiplied(head_dim), 2
                )
            )
        walker.mark_untracked([src], tracked, where)
        width = last_dim(result)
        if width is None:
            return unknown(walker, op)
        walker.set_layout(result, walker.key_layout(out_key, width, "producer"))
        return None
    return unknown(walker, op)


def _einsum_activations(walker: Walker, op: tf.Operation, parts: list[str], out: str) -> None:
    """An Einsum between two activations (attention: ``BTNH,BSNH->BNTS`` scores, ``BNTS,BSNH->BTNH``
    mixing): an axis letter shared by both operands and kept in the output couples their channels (the heads
    ``N``); a letter with channels that is summed over, or whose channels only one operand knows, freezes them.
    Output axes get the coupled layouts (an inner one when not last)."""
    where = _where(op)
    if any(not p or not p.isalpha() for p in [*parts, out]) or len(set(out)) != len(out):
        return unknown(walker, op)
    seen: dict[str, list[Layout | None]] = {}
    for t, letters in zip(op.inputs, parts, strict=True):
        if t.shape.rank != len(letters) or len(set(letters)) != len(letters):
            return unknown(walker, op)
        for i, ch in enumerate(letters):
            seen.setdefault(ch, []).append(walker.layout_at(t, i - len(letters)))
    coupled: dict[str, Layout] = {}
    for ch, layouts in seen.items():
        known = [lay for lay in layouts if lay is not None]
        if not known:
            continue
        if ch not in out or len(known) != len(layouts):
            why = f"summed over or mixed with channels of unknown origin by Einsum at {op.name}"
            for lay in known:
                walker.spaces.freeze_layout(lay, why)
            continue
        result = known[0]
        for other in known[1:]:
            result = walker.unify(result, other, where)
        coupled[ch] = result
    result_t = op.outputs[0]
    inner = {i - len(out): coupled[ch] for i, ch in enumerate(out[:-1]) if ch in coupled}
    if out[-1] in coupled:
        walker.set_layout(result_t, coupled[out[-1]])
    elif inner:
        walker.layouts[result_t.name] = None
    else:
        walker.set_layout(result_t, None, f"unknown op Einsum at {op.name} (between activations)")
    walker.set_inner(result_t, inner)
    return None


def depthwise(walker: Walker, op: tf.Operation) -> None:
    x, k = op.inputs[0], op.inputs[1]
    src = _single_source(walker, k)
    fmt = _attr(op, "data_format", b"NHWC")
    if (
        src is None
        or walker.is_const(x)
        or fmt not in (b"NHWC", "NHWC")
        or k.shape.rank != 4
        or src.axes[2] is None
    ):
        return unknown(walker, op)
    lx = walker.layout(x)
    mult = int(k.shape[3])
    walker.mark_untracked([src], {(src.key, src.axes[2])}, _where(op))
    if lx is None:
        return walker.set_layout(op.outputs[0], None, f"depthwise input of unknown channels at {op.name}")
    walker.bind((src.key, src.axes[2]), lx, "producer", _where(op))
    walker.tied.add((src.key, src.axes[2]))
    layout = lx if mult == 1 else lx.multiplied(mult)
    walker.set_layout(op.outputs[0], layout)
    return None


def fused_batch_norm(walker: Walker, op: tf.Operation) -> None:
    fmt = _attr(op, "data_format", b"NHWC")
    if _attr(op, "is_training", False) or fmt not in (b"NHWC", "NHWC", b"NDHWC", "NDHWC"):
        return unknown(walker, op)
    x = op.inputs[0]
    lx = walker.layout(x)
    if lx is None:
        return unknown(walker, op)
    for param in op.inputs[1:5]:
        src = _single_source(walker, param)
        if src is None or param.shape.rank != 1 or src.axes[0] is None:
            return unknown(walker, op)
        lx = walker.bind((src.key, src.axes[0]), lx, "carrier", _where(op))
    walker.set_layout(op.outputs[0], lx)
    for out in op.outputs[1:]:
        walker.set_layout(out, None)
    return None


def spatial(walker: Walker, op: tf.Operation) -> None:
    fmt = _attr(op, "data_format", b"NHWC")
    if fmt not in (b"NHWC", "NHWC", b"NDHWC", "NDHWC"):
        return unknown(walker, op)
    return carrier(walker, op)


def reduction(walker: Walker, op: tf.Operation) -> None:
    x = op.inputs[0]
    axes = _const_int(walker, op.inputs[1])
    rank = x.shape.rank
    if axes is None or rank is None:
        return unknown(walker, op)
    axes = {int(a) % rank for a in np.atleast_1d(axes)}
    if rank - 1 in axes:
        if walker.layout(x) is not None:
            walker.spaces.freeze_layout(
                walker.layout(x), f"reduced or normalised across channels ({op.type} at {op.name})"
            )
        return walker.set_layout(op.outputs[0], None, f"reduction over channels at {op.name}")
    walker.set_layout(op.outputs[0], walker.layout(x))
    return None


def normalised(walker: Walker, op: tf.Operation) -> None:
    """Softmax over the last axis: its channels are frozen; the other axes (heads) pass unchanged."""
    x = op.inputs[0]
    why = f"normalised across channels ({op.type} at {op.name})"
    walker.spaces.freeze_layout(walker.layout(x), why)
    walker.set_layout(op.outputs[0], walker.layout(x), why)
    walker.set_inner(op.outputs[0], walker.inner.get(x.name, {}))


def pad(walker: Walker, op: tf.Operation) -> None:
    paddings = _const_int(walker, op.inputs[1])
    if paddings is None or paddings.ndim != 2 or any(int(v) != 0 for v in paddings[-1]):
        return unknown(walker, op)
    if len(op.inputs) > 2 and not walker.is_const(op.inputs[2]):
        return unknown(walker, op)
    walker.set_layout(op.outputs[0], walker.layout(op.inputs[0]))
    return None


def squeeze_expand(walker: Walker, op: tf.Operation) -> None:
    x, out = op.inputs[0], op.outputs[0]
    if x.shape.rank is None or out.shape.rank is None or last_dim(x) != last_dim(out):
        return unknown(walker, op)
    inner = walker.inner.get(x.name)
    if op.type == "ExpandDims":
        axis = _const_int(walker, op.inputs[1])
        if axis is None or int(axis) % out.shape.rank == out.shape.rank - 1:
            return unknown(walker, op)
        if inner:  # input axes before the new one move one further from the end
            at = int(axis) % out.shape.rank - out.shape.rank  # the new axis, counted from the end
            walker.set_inner(out, {(p - 1 if p - 1 < at else p): lay for p, lay in inner.items()})
    elif inner:
        walker.freeze_inner(x, f"unknown op {op.type} at {op.name} (on an inner axis: heads)")
    if inner and walker.layout(x) is None:
        walker.layouts[out.name] = None
    else:
        walker.set_layout(out, walker.layout(x))
    return None


def transpose(walker: Walker, op: tf.Operation) -> None:
    """Axes permuted: the channel axis must stay last unless the tensor has inner layouts (attention heads:
    ``[B, T, H, D] -> [B, H, T, D]``), whose axes are moved with it."""
    x, out = op.inputs[0], op.outputs[0]
    perm = _const_int(walker, op.inputs[1])
    inner = walker.inner.get(x.name)
    if perm is None:
        return unknown(walker, op)
    rank = len(perm)
    if not inner:
        if int(perm[-1]) != rank - 1:
            return unknown(walker, op)
        walker.set_layout(out, walker.layout(x))
        return None
    moved = {i - rank: walker.layout_at(x, int(src) - rank) for i, src in enumerate(perm)}
    last = moved.pop(-1)
    if last is None:
        walker.layouts[out.name] = None
    else:
        walker.set_layout(out, last)
    walker.set_inner(out, {pos: lay for pos, lay in moved.items() if lay is not None})
    return None


def tile(walker: Walker, op: tf.Operation) -> None:
    """Tiling along axes without channels (grouped-query attention repeats a key/value head along a new axis
    of size 1): the layouts stay where they are."""
    x = op.inputs[0]
    multiples = _const_int(walker, op.inputs[1])
    inner = walker.inner.get(x.name, {})
    if multiples is None or int(multiples[-1]) != 1:
        return unknown(walker, op)
    if any(-p > multiples.size or int(multiples[p]) != 1 for p in inner):
        return unknown(walker, op)
    _pass_inner(walker, x, op.outputs[0])
    return None


def _shape_at(target: tf.Tensor, index: int) -> tuple[str, int | None, int] | None:
    """Where element ``index`` of a reshape target lives: (Const node, index or None, value)."""
    op = target.op
    if op.type == "Const":
        value = const_value(op)
        if value.ndim != 1 or not 0 <= index < value.size:
            return None
        return op.name, index, int(value[index])
    if op.type == "Pack" and 0 <= index < len(op.inputs):
        item = op.inputs[index]
        if item.op.type == "Const":
            value = const_value(item.op)
            if value.ndim == 0:
                return item.op.name, None, int(value)
    return None


def _split_heads(walker: Walker, op: tf.Operation, lx: Layout) -> bool:
    """``[.., h * d] -> [.., h, d]`` (attention heads): the last axis' channels must be whole blocks of ``d``;
    the heads become an inner layout (axis -2), ``d`` is never pruned on its own. False: not such a reshape."""
    x, out = op.inputs[0], op.outputs[0]
    ins, outs = x.shape.as_list(), out.shape.as_list()
    if len(outs) != len(ins) + 1 or None in (ins[-1], outs[-1], outs[-2]):
        return False
    if outs[-2] * outs[-1] != ins[-1]:
        return False
    if any(a is not None and b is not None and a != b for a, b in zip(ins[:-1], outs[:-2], strict=True)):
        return False
    where = _shape_at(op.inputs[1], len(outs) - 2)
    if where is None:
        return False
    heads = lx.divided(outs[-1])
    if heads is None:  # a plain [d, h*d'] projection: its units become heads of d' units
        coarse = walker.coarsen_blocks(lx, outs[-1])
        heads = None if coarse is None else coarse.divided(outs[-1])
    if heads is None:
        return False
    node, index, value = where
    if value != -1:
        walker.patches.append(ShapePatch(walker.sig.name, node, index, 1, heads))
    walker.layouts[out.name] = None
    walker.set_inner(out, {-2: heads})
    return True


def _repeat_heads(walker: Walker, op: tf.Operation) -> bool:
    """``[.., g, r, d] -> [.., g * r, d]`` with the heads at axis -3 and nothing at -2 (grouped-query
    attention: each key/value head repeated ``r`` times): the heads become blocks of ``r``. The target
    must be a constant (patched) or computed from the input's run-time shape. False: not such a reshape."""
    x, out = op.inputs[0], op.outputs[0]
    inner = walker.inner[x.name]
    ins, outs = x.shape.as_list(), out.shape.as_list()
    if set(inner) != {-3} or len(outs) != len(ins) - 1 or None in (ins[-3], ins[-2], ins[-1], outs[-2]):
        return False
    if outs[-1] != ins[-1] or outs[-2] != ins[-3] * ins[-2] or walker.layout(x) is not None:
        return False
    heads = inner[-3]
    target = op.inputs[1]
    if target.op.type == "Const":
        where = _shape_at(target, len(outs) - 2)
        if where is None:
            return False
        node, index, value = where
        if value != -1:
            walker.patches.append(ShapePatch(walker.sig.name, node, index, int(ins[-2]), heads))
    elif not _from_runtime_shape(target, int(outs[-2])):
        return False
    walker.layouts[out.name] = None
    walker.set_inner(out, {-2: heads.multiplied(int(ins[-2]))})
    return True


def _from_runtime_shape(target: tf.Tensor, count: int) -> bool:
    """A reshape target computed from ``Shape`` ops whose constants never spell the channel count ``count``:
    it follows a compaction by itself."""
    seen: set[str] = set()
    stack = [target.op]
    shapes = 0
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if op.type == "Shape":
            shapes += 1
            continue
        if op.type == "Const":
            if count in np.atleast_1d(const_value(op)).tolist():
                return False
            continue
        if op.type == "Placeholder":
            return False
        stack.extend(i.op for i in op.inputs)
    return shapes > 0


def _merge_heads(walker: Walker, op: tf.Operation) -> None:
    """``[.., h, d] -> [.., h * d]``: the heads (axis -2) become blocks of ``d`` on the channel axis; ``d``
    must carry no prunable channels."""
    x, out = op.inputs[0], op.outputs[0]
    inner = walker.inner[x.name]
    if _repeat_heads(walker, op):
        return None
    ins, outs = x.shape.as_list(), out.shape.as_list()
    heads, last = inner.get(-2), walker.layout(x)
    last_frozen = last is None or all(walker.spaces.reasons(seg.space) for seg in last.segments)
    ok = (
        heads is not None
        and last_frozen
        and len(outs) == len(ins) - 1
        and None not in (ins[-1], ins[-2], outs[-1])
        and outs[-1] == ins[-2] * ins[-1]
        and set(inner) == {-2}
    )
    where = _shape_at(op.inputs[1], len(outs) - 1) if ok else None
    if where is None or heads is None:
        return unknown(walker, op, f"unknown op {op.type} at {op.name} (reshape of head-split channels)")
    node, index, value = where
    if value != -1:
        walker.patches.append(ShapePatch(walker.sig.name, node, index, int(ins[-1]), heads))
    walker.set_layout(out, heads.multiplied(int(ins[-1])))
    return None


def _shape_last(walker: Walker, target: tf.Tensor) -> tuple[str, int | None, int] | None:
    """Where the last element of a reshape target lives: (Const node, index or None, value)."""
    op = target.op
    if op.type == "Const":
        value = const_value(op)
        if value.ndim != 1 or value.size == 0:
            return None
        return op.name, value.size - 1, int(value[-1])
    if op.type == "Pack" and op.inputs:
        last = op.inputs[-1]
        if last.op.type == "Const":
            value = const_value(last.op)
            if value.ndim == 0:
                return last.op.name, None, int(value)
    if op.type == "ConcatV2" and len(op.inputs) > 2:  # Tensordot's output shape: concat(free dims, [units])
        last = op.inputs[-2]
        if last.op.type == "Const":
            value = const_value(last.op)
            if value.ndim == 1 and value.size:
                return last.op.name, value.size - 1, int(value[-1])
    return None


def _runtime_channel_count(walker: Walker, target: tf.Tensor, layout: Layout) -> bool:
    """Tensordot's ``reshape(x, [prod(free dims), prod(shape(x)[axes])])`` where the gathered axis is the
    channel axis of a tensor with ``layout``: the count is read at run time, so it follows any compaction."""
    op = target.op
    if op.type != "Pack" or not op.inputs:
        return False
    prod = op.inputs[-1].op
    if prod.type != "Prod" or prod.inputs[0].op.type != "GatherV2":
        return False
    gather = prod.inputs[0].op
    shape = gather.inputs[0].op
    if shape.type != "Shape" or walker.layout(shape.inputs[0]) is not layout:
        return False
    idx = _const_int(walker, gather.inputs[1])
    rank = shape.inputs[0].shape.rank
    return idx is not None and rank is not None and [int(i) % rank for i in np.atleast_1d(idx)] == [rank - 1]


def reshape(walker: Walker, op: tf.Operation) -> None:
    x, out = op.inputs[0], op.outputs[0]
    if x.name in walker.inner:
        return _merge_heads(walker, op)
    lx = walker.layout(x)
    if lx is None:
        if last_dim(out) in (None, 1) or (last_dim(x) == 1 and x.shape.rank is not None):
            walker.set_layout(out, None)
            return None
        return unknown(walker, op)
    in_shape, out_shape = x.shape, out.shape
    if (
        out_shape.rank is not None
        and out_shape[-1] is None
        and _runtime_channel_count(walker, op.inputs[1], lx)
    ):
        walker.layouts[out.name] = lx  # static shape inference lost the count; the layout is the input's
        return None
    if in_shape.rank is None or out_shape.rank is None or out_shape[-1] is None:
        return unknown(walker, op)
    where = _shape_last(walker, op.inputs[1])
    if where is None:
        return unknown(walker, op, f"unknown op {op.type} at {op.name} (dynamic target shape)")
    node, index, value = where
    if out_shape[-1] == in_shape[-1]:
        if value != -1:
            walker.patches.append(ShapePatch(walker.sig.name, node, index, 1, lx))
        walker.set_layout(out, lx)
        return None
    dims = in_shape.as_list()
    for start in range(len(dims) - 1, 0, -1):
        tail = dims[start:]
        if any(d is None for d in tail):
            break
        if int(np.prod(tail)) == out_shape[-1]:
            repeats = int(np.prod(tail[:-1]))
            if value != -1:
                walker.patches.append(ShapePatch(walker.sig.name, node, index, repeats, lx))
            walker.set_layout(out, lx.tiled(repeats))
            return None
    if _split_heads(walker, op, lx):
        return None
    return unknown(walker, op, f"unknown op {op.type} at {op.name} (reshape across the channel axis)")


def concat(walker: Walker, op: tf.Operation) -> None:
    values, axis_t = op.inputs[:-1], op.inputs[-1]
    out = op.outputs[0]
    axis = _const_int(walker, axis_t)
    if axis is None or out.shape.rank is None:
        return unknown(walker, op)
    rank = out.shape.rank
    if int(axis) % rank != rank - 1:
        layouts = []
        for v in values:
            if walker.is_const(v):
                return unknown(walker, op)
            if walker.layout(v) is not None:
                layouts.append(walker.layout(v))
        result = layouts[0] if layouts else None
        for other in layouts[1:]:
            result = walker.unify(result, other, _where(op))
        walker.set_layout(out, result)
        return None
    segments = []
    offset = 0
    for v in values:
        width = last_dim(v)
        if width is None:
            return unknown(walker, op)
        if walker.is_const(v):
            src = _single_source(walker, v)
            if src is None or src.axes[-1] is None:
                return unknown(walker, op)
            walker.mark_untracked([src], {(src.key, src.axes[-1])}, _where(op))
            layout = walker.key_layout((src.key, src.axes[-1]), width, "carrier")
        else:
            layout = walker.layout(v)
            if layout is None:
                layout = walker.spaces.identity(
                    width, f"concatenated channels of unknown origin at {op.name}"
                )
        segments.extend(layout.shifted(offset))
        offset += width
    walker.set_layout(out, Layout(offset, tuple(segments)))
    return None


def identity_n(walker: Walker, op: tf.Operation) -> None:
    for inp, out in zip(op.inputs, op.outputs, strict=True):
        walker.set_layout(out, None if walker.is_const(inp) else walker.layout(inp))
        if inp.name in walker.lists:
            walker.lists[out.name] = walker.lists[inp.name]


# --- recurrent layers -------------------------------------------------------------------------------------


def fill(walker: Walker, op: tf.Operation) -> None:
    """``Fill(shape, value)`` (Keras' zero initial states ``zeros([batch, units])``): one value everywhere, so
    its channels are whatever it is coupled with; a channel count spelled in the shape is rewritten."""
    dims, value = op.inputs
    out = op.outputs[0]
    width = last_dim(out)
    if value.shape.rank != 0:
        return unknown(walker, op)
    if not out.dtype.is_floating or width is None or width <= 1:
        walker.set_layout(out, None)
        return None
    where = _shape_last(walker, dims)
    layout = walker.spaces.identity(int(width))
    if where is not None and where[2] == width:
        walker.patches.append(ShapePatch(walker.sig.name, where[0], where[1], 1, layout))
    elif not _from_runtime_shape(dims, int(width)):
        return unknown(walker, op, f"unknown op {op.type} at {op.name} (channel count not rewritable)")
    walker.set_layout(out, layout)
    return None


def _channel_split(walker: Walker, op: tf.Operation, x: tf.Tensor, sizes: list[int]) -> list[Layout] | None:
    """Layouts of consecutive parts of ``x``'s channel axis of ``sizes`` (gate pre-activations cut per gate:
    ``Walker.gate_part``); None when they are not whole gates of one prunable space."""
    parts: list[Layout] = []
    start = 0
    for size in sizes:
        layout = walker.layout(x)  # re-read: the first cut re-expresses the space
        part = None if layout is None else walker.gate_part(layout, start, start + size)
        if part is None:
            return None
        parts.append(part)
        start += size
    return parts


def split(walker: Walker, op: tf.Operation) -> None:
    """``Split``/``SplitV``: along another axis each part keeps the channels; along the channel axis into equal
    parts (Keras 3's LSTM cell: ``split(z, 4, axis=-1)``) each part is one gate of every unit."""
    if op.type == "Split":
        axis_t, x = op.inputs
        sizes_t = None
    else:
        x, sizes_t, axis_t = op.inputs
    axis, rank = _const_int(walker, axis_t), x.shape.rank
    if axis is None or rank is None:
        return unknown(walker, op)
    if int(axis) % rank != rank - 1:
        for out in op.outputs:
            if last_dim(out) != last_dim(x):
                return unknown(walker, op)
            walker.set_layout(out, walker.layout(x))
        return None
    sizes = [last_dim(out) for out in op.outputs]
    if None in sizes or len(set(sizes)) != 1 or walker.layout(x) is None:
        return unknown(walker, op, f"unknown op {op.type} at {op.name} (uneven or unknown split of channels)")
    if sizes_t is not None and sizes_t.op.type != "Const":
        return unknown(walker, op)
    parts = _channel_split(walker, op, x, [int(s) for s in sizes])  # type: ignore[arg-type]
    if parts is None:
        return unknown(
            walker, op, f"unknown op {op.type} at {op.name} (a split of channels that are not gates)"
        )
    for i, (out, part) in enumerate(zip(op.outputs, parts, strict=True)):
        if sizes_t is not None:
            walker.patches.append(ShapePatch(walker.sig.name, sizes_t.op.name, i, 1, part))
        walker.set_layout(out, part)
    return None


def strided_slice(walker: Walker, op: tf.Operation) -> None:
    """``x[..]`` with constant bounds: slicing other axes keeps the channels (the last time step of an RNN's
    outputs); a slice of the channel axis must be one whole gate (Keras 3's GRU cell: ``z[:, u:2u]``), whose
    bounds are rewritten with the unit count."""
    x, begin_t, end_t, strides_t = op.inputs
    out = op.outputs[0]
    mask = {
        k: int(_attr(op, k, 0) or 0) for k in ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask")
    }
    shrink = int(_attr(op, "shrink_axis_mask", 0) or 0)
    begin, end, strides = (_const_int(walker, t) for t in (begin_t, end_t, strides_t))
    rank, width = x.shape.rank, last_dim(x)
    if rank is None or begin is None or end is None or strides is None or mask["ellipsis_mask"]:
        return unknown(walker, op)
    if mask["new_axis_mask"] or begin.ndim != 1:
        return unknown(walker, op)
    n = begin.size
    if n < rank:  # the channel axis is not named: taken whole
        walker.set_layout(out, walker.layout(x))
        return None
    last = n - 1
    b_all, e_all = bool(mask["begin_mask"] >> last & 1), bool(mask["end_mask"] >> last & 1)
    b = 0 if b_all else int(begin[last])
    e = (width or 0) if e_all else int(end[last])
    if shrink >> last & 1 or int(strides[last]) != 1 or width is None or b < 0 or e < 0:
        return unknown(walker, op)
    e = min(e, width)
    if b == 0 and e == width:
        walker.set_layout(out, walker.layout(x))
        return None
    layout = walker.layout(x)
    part = None if layout is None else walker.gate_part(layout, b, e)
    where_b = None if b_all else _shape_at(begin_t, last)
    where_e = None if e_all else _shape_at(end_t, last)
    if part is None or (not b_all and where_b is None) or (not e_all and where_e is None):
        return unknown(
            walker, op, f"unknown op {op.type} at {op.name} (a slice of channels that is not a gate)"
        )
    size = e - b
    for where in (where_b, where_e):
        if where is not None and where[2] != 0:
            walker.patches.append(ShapePatch(walker.sig.name, where[0], where[1], where[2] // size, part))
    walker.set_layout(out, part)
    return None


def reverse(walker: Walker, op: tf.Operation) -> None:
    """``ReverseV2`` along the time axis (``go_backwards``, the backward half of ``Bidirectional``)."""
    x, out = op.inputs[0], op.outputs[0]
    axes, rank = _const_int(walker, op.inputs[1]), x.shape.rank
    if axes is None or rank is None or (rank - 1) in {int(a) % rank for a in np.atleast_1d(axes)}:
        return unknown(walker, op)
    walker.set_layout(out, walker.layout(x))
    return None


def _element_shape(walker: Walker, t: tf.Tensor, layout: Layout | None, where: str) -> None:
    """A TensorList's ``element_shape`` operand: a last entry spelling the channel count is rewritten; one
    that cannot be (computed, or another count) leaves the channels whole."""
    if layout is None:
        return
    value = _const_int(walker, t)
    if value is not None and value.ndim == 0:
        return  # -1: any shape
    spot = _shape_last(walker, t)
    if spot is None:
        walker.spaces.freeze_layout(layout, f"element shape of {where} not understood")
    elif spot[2] == layout.length:
        walker.patches.append(ShapePatch(walker.sig.name, spot[0], spot[1], 1, layout))
    elif spot[2] != -1:
        walker.spaces.freeze_layout(layout, f"element shape of {where} does not match its channels")


def tensor_list_from_tensor(walker: Walker, op: tf.Operation) -> None:
    """A sequence unstacked into a TensorList (an RNN's inputs, time-major): its elements keep the channels."""
    tensor, shape = op.inputs
    layout = None if walker.is_const(tensor) else walker.layout(tensor)
    if walker.is_const(tensor):
        walker.untrack_all(tensor, _where(op))
    _element_shape(walker, shape, layout, _where(op))
    walker.lists[op.outputs[0].name] = layout
    return None


def tensor_list_reserve(walker: Walker, op: tf.Operation) -> None:
    """An empty TensorList (an RNN's outputs): its elements get their channels where they are written."""
    walker.lists[op.outputs[0].name] = None


def tensor_list_get_item(walker: Walker, op: tf.Operation) -> None:
    handle, _, shape = op.inputs
    layout = walker.lists.get(handle.name)
    _element_shape(walker, shape, layout, _where(op))
    walker.set_layout(op.outputs[0], layout, None if layout is not None else f"unknown op {_where(op)}")


def tensor_list_set_item(walker: Walker, op: tf.Operation) -> None:
    handle, _, item = op.inputs
    if walker.is_const(item):
        return unknown(walker, op)
    layout, before = walker.layout(item), walker.lists.get(handle.name)
    if layout is not None and before is not None:
        layout = walker.unify(before, layout, _where(op))
    walker.lists[op.outputs[0].name] = layout if layout is not None else before
    return None


def tensor_list_stack(walker: Walker, op: tf.Operation) -> None:
    handle, shape = op.inputs
    layout = walker.lists.get(handle.name)
    _element_shape(walker, shape, layout, _where(op))
    walker.set_layout(op.outputs[0], layout, None if layout is not None else f"unknown op {_where(op)}")


def recurrent_loop(walker: Walker, op: tf.Operation) -> None:
    """A ``While`` loop (Keras LSTM/GRU/SimpleRNN run their time steps in one): the body is walked with the
    same rules, the loop's states coupled with what the body returns for them, so the units (each unit's gate
    columns, its recurrent kernel rows) are one group. Whatever ``_walk_loop`` cannot prove leaves them whole
    with the reason."""
    try:
        refusal = _walk_loop(walker, op)
    except Exception as exc:  # a loop this rule did not foresee: whole, never guessed
        refusal = f"not understood ({type(exc).__name__}: {exc})"
    if refusal is None:
        return None
    why = f"recurrent loop (While at {op.name}): {refusal}; its units are left whole"[:300]
    unknown(walker, op, why)
    for i, out in enumerate(op.outputs):  # the sequences it wrote: whole, with this reason (not "unknown op")
        reserve = op.inputs[i].op
        spot = _shape_last(walker, reserve.inputs[0]) if reserve.type == "TensorListReserve" else None
        if spot is not None and spot[2] > 1:
            walker.lists[out.name] = walker.spaces.identity(spot[2], why)
    return None


def _through_identity(t: tf.Tensor) -> tf.Tensor:
    while t.op.type == "Identity" and t.op.inputs:
        t = t.op.inputs[0]
    return t


def _walk_loop(walker: Walker, op: tf.Operation) -> str | None:
    """The walk of one recurrent loop; the reason it cannot be done, or None. The loop variables must be
    counters, TensorLists (the input sequence, the outputs), weights passed through unchanged and states
    starting at zero (``Fill(.., 0)``): a unit whose weights and bias are zero then stays exactly zero in
    every step, so dropping its recurrent kernel rows changes nothing. Compaction checks that on the probes:
    the final states are consumer uses that must be zero there (``sigmoid(bias)`` gates would keep a unit
    whose kernels alone are zero moving, and its recurrent kernel rows feed the other units)."""
    sig = walker.sig
    assert sig is not None
    if "::" in sig.name:
        return "a loop inside a loop body"
    body_name = op.get_attr("body").name
    body_graph = _library_graph(walker, body_name, op)
    cond_graph = _library_graph(walker, op.get_attr("cond").name, op)
    if body_graph is None or cond_graph is None:
        return "its body is not in the graph's function library"
    args, rets = list(body_graph.inputs), list(body_graph.outputs)
    if len(args) != len(op.inputs) or len(rets) != len(op.inputs):
        return "its body's arguments do not match the loop variables"
    if any(t.op.type == "TensorListFromTensor" and t.op.inputs[0].dtype == tf.bool for t in op.inputs):
        return "a mask (mask_zero, a Masking layer) is applied inside the loop"
    weights: dict[str, str] = {}
    states: list[int] = []
    lists: dict[int, str] = {}  # loop variable -> "input" (an unstacked sequence) or "output"
    for i, t in enumerate(op.inputs):
        if t.dtype == tf.variant:
            kind = t.op.type
            if kind == "TensorListFromTensor":
                lists[i] = "input"
                walker.lists[args[i].name] = walker.lists.get(t.name)
            elif kind == "TensorListReserve":
                lists[i] = "output"
                walker.lists[args[i].name] = None
            else:
                return f"loop variable {i} is a {kind}"
        elif t.dtype.is_floating and walker.is_const(t):
            srcs = walker.view(t)
            if not srcs or len(srcs) != 1 or srcs[0].merged is not None:
                return f"loop variable {i} is a constant that is not one weight"
            if srcs[0].axes != tuple(range(t.shape.rank or 0)) or srcs[0].key.startswith("const:"):
                return f"loop variable {i} is a constant that is not one weight"
            weights[args[i].op.name] = srcs[0].key
        elif t.dtype.is_floating:
            init = _through_identity(t)
            zero = init.op.type == "Fill" and walker.is_const(init.op.inputs[1])
            if not zero or np.any(_const_float(init.op.inputs[1]) != 0):
                return f"initial state {i} comes from {init.op.type}, not zeros (initial_state given?)"
            if walker.layout(t) is None:
                return f"state {i} has no channels of its own"
            states.append(i)
            walker.set_layout(args[i], walker.layout(t))
        elif t.shape.rank != 0:
            return f"loop variable {i} ({t.dtype.name}) is not a counter"
        else:
            walker.set_layout(args[i], None)
        if not (t.dtype.is_integer and t.shape.rank == 0) and cond_graph.inputs[i].consumers():
            return "its condition reads more than the counters"
    for i, t in enumerate(op.inputs):
        passthrough = (t.dtype.is_floating and walker.is_const(t)) or lists.get(i) == "input"
        if passthrough and _through_identity(rets[i]) is not args[i]:
            return f"loop variable {i} ({t.op.name}) changes inside the loop (a stateful layer?)"
    body = FrozenSignature(f"{sig.name}::{body_name}", sig.graph_def, {}, {}, {}, weights, body_graph)
    n_patches, n_uses = len(walker.patches), len(walker.consumers)
    walker.walk_body(body, args, rets)
    where = _where(op)
    for i in states:
        after = walker.layout(rets[i])
        if after is None:
            return f"state {i} loses its channels in the body"
        walker.unify(walker.layout(args[i]), after, where)
    # Re-home what the body walk recorded: patches into the body function, uses onto outer tensors.
    walker.patches[n_patches:] = [
        replace(p, signature=sig.name, function=body_name) if p.signature == body.name else p
        for p in walker.patches[n_patches:]
    ]
    state_args = {args[i].op.name for i in states}
    uses = []
    for use in walker.consumers[n_uses:]:
        if use.signature != body.name:
            uses.append(use)
            continue
        t = _through_identity(body_graph.get_tensor_by_name(use.input_tensor))
        if t.op.name in state_args:
            continue  # the recurrent kernel's rows: removed units are zero there (checked on the final states)
        if t.op.type == "TensorListGetItem":
            handle = next((j for j, a in enumerate(args) if a is t.op.inputs[0]), None)
            if handle is not None and lists.get(handle) == "input":
                outer = op.inputs[handle].op.inputs[0]
                uses.append(
                    replace(use, signature=sig.name, op=op.name, input_tensor=outer.name, exact=False)
                )
                continue
        walker.spaces.freeze_layout(walker.bindings.get(use.in_key), f"read inside the loop body at {use.op}")
    walker.consumers[n_uses:] = uses
    for key, layout in walker.bindings.items():
        if key[0].startswith(f"const:{body.name}:"):
            walker.spaces.freeze_layout(layout, f"a constant inside the loop body ({where}) carries them")
    for i, out in enumerate(op.outputs):
        if i in states:
            layout = walker.layout(args[i])
            walker.set_layout(out, layout)
            walker.consumers.append(
                ConsumerUse(sig.name, op.name, out.name, (op.name, i), (op.name, i), False, layout)
            )
        elif i in lists:
            element = (
                walker.lists.get(args[i].name)
                if lists[i] == "input"
                else walker.lists.get(_through_identity(rets[i]).name)
            )
            if lists[i] == "output":
                _element_shape(walker, op.inputs[i].op.inputs[0], element, where)
            walker.lists[out.name] = element
        else:
            if out.consumers() and walker.is_const(op.inputs[i]):
                walker.untrack_all(op.inputs[i], f"{where} (output {i})")
            walker.set_layout(out, None)
    return None


def _const_float(t: tf.Tensor) -> np.ndarray:
    t = _through_identity(t)
    return const_value(t.op) if t.op.type == "Const" else np.asarray(np.nan)


def shape_only(walker: Walker, op: tf.Operation) -> None:
    """Reads a tensor's shape, not its values: the channels do not flow on."""
    for out in op.outputs:
        walker.set_layout(out, None)


RULES: dict[str, Rule] = {
    **dict.fromkeys(UNARY, carrier),
    **dict.fromkeys(BINARY, elementwise),
    **dict.fromkeys(SPATIAL, spatial),
    **dict.fromkeys(REDUCTIONS, reduction),
    **dict.fromkeys(NORMALISED, normalised),
    **dict.fromkeys(SELECT, select),
    "Conv2D": conv,
    "Conv3D": conv,
    "Conv2DBackpropInput": conv_transpose,
    "StatefulPartitionedCall": function_call,
    "PartitionedCall": function_call,
    "MatMul": matmul,
    "BatchMatMul": matmul,
    "BatchMatMulV2": matmul,
    "BatchMatMulV3": matmul,
    "Einsum": einsum,
    "DepthwiseConv2dNative": depthwise,
    "FusedBatchNorm": fused_batch_norm,
    "FusedBatchNormV2": fused_batch_norm,
    "FusedBatchNormV3": fused_batch_norm,
    "Pad": pad,
    "PadV2": pad,
    "MirrorPad": pad,
    "Reshape": reshape,
    "Squeeze": squeeze_expand,
    "ExpandDims": squeeze_expand,
    "Transpose": transpose,
    "Tile": tile,
    "ConcatV2": concat,
    "IdentityN": identity_n,
    "While": recurrent_loop,
    "StatelessWhile": recurrent_loop,
    "Fill": fill,
    "Split": split,
    "SplitV": split,
    "StridedSlice": strided_slice,
    "ReverseV2": reverse,
    "TensorListFromTensor": tensor_list_from_tensor,
    "TensorListReserve": tensor_list_reserve,
    "TensorListGetItem": tensor_list_get_item,
    "TensorListSetItem": tensor_list_set_item,
    "TensorListStack": tensor_list_stack,
    "Shape": shape_only,
    "Size": shape_only,
    "Rank": shape_only,
    "NoOp": shape_only,
}

# Rules that map inner layouts (attention heads) as well as the channel axis; the walker freezes the inner
# layouts of the inputs of any other op.
AXIS_AWARE = frozenset(
    {*UNARY, *BINARY, *NORMALISED, *("Reshape", "Einsum", "ExpandDims", "Squeeze", "Tile"), "Shape", "Size"}
    | {"Rank", "NoOp", "Transpose", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"}
    | SELECT
)

DEFAULT_RULES = RuleTable(RULES, unknown, const_view, AXIS_AWARE)
