"""Physical removal: rewrite every signature's frozen graph with the removed channels gone.

Per channel group, ``keep`` says which channels stay. A channel is only removed when the masked model makes it
input-independent (all its producers' slices are exactly zero) and every kernel reading it can absorb its value:
zero, or a constant folded into that kernel's bias (``sigmoid(0) = 0.5``, a BatchNorm shift). Constants are
read off the masked model itself on probe inputs; a constant that meets zero padding (a SAME conv wider than 1x1)
cannot be folded exactly, so that channel stays and the notes say so.

The rebuilt model keeps the weights as ``tf.Variable``s: each weight node of the skeleton graph is a
``Placeholder`` fed by ``var.read_value()`` inside a ``tf.function`` that imports the graph
(``tf.graph_util.import_graph_def(input_map=..., return_elements=...)``) under the original input names, and
the module is saved with every signature of the input. The compact model is then reloaded and compared with the
masked one; a mismatch raises rather than ships.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from worker.errors import PipelineError
from worker.models.handle import ModelHandle
from worker.structure.channel_groups import GroupAnalysis
from worker.structure.frozen import FrozenSignature, run_skeleton
from worker.structure.graph_walk import ConsumerUse, Key
from worker.structure.layout import Layout

RTOL = 1e-5


@dataclass
class CompactResult:
    out_dir: Path
    channels: dict[str, tuple[int, int]]  # group id -> (before, after)
    params_before: int
    params_after: int
    notes: list[str] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(
        default_factory=dict
    )  # "<signature>/<output>" -> vs the masked model
    shapes: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # variable -> before, after
    folded: int = 0  # removed channels whose constant value went into a bias

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": {k: {"before": b, "after": a} for k, (b, a) in self.channels.items()},
            "params": {"before": self.params_before, "after": self.params_after},
            "max_abs_diff": dict(self.max_abs_diff),
            "folded_channels": self.folded,
            "notes": list(self.notes),
        }


def probe_inputs(
    sig: FrozenSignature, batch: int = 2, free: int = 16, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic random inputs for a signature (unknown dims: ``batch`` first, ``free`` elsewhere, large
    enough that padding effects show)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, spec in sig.input_specs.items():
        if spec.shape.rank is None:
            raise PipelineError("structure_failed", f"input {key!r} of {sig.name!r} has an unknown rank")
        shape = [(batch if i == 0 else free) if d is None else d for i, d in enumerate(spec.shape.as_list())]
        if spec.dtype.is_floating:
            out[key] = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
        else:
            out[key] = rng.integers(0, 2, size=shape).astype(spec.dtype.as_numpy_dtype)
    return out


def _removed_in(analysis: GroupAnalysis, layout: Layout, removed: Mapping[str, np.ndarray]) -> np.ndarray:
    """Indices along a layout's axis that belong to removed channels."""
    parts = []
    for seg in layout.segments:
        gid = analysis.group_of_space.get(analysis.spaces.find(seg.space))
        if gid is None or gid not in removed:
            continue
        mask = removed[gid]
        if mask.any():
            parts.append(seg.positions[mask].ravel())
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def compact(
    handle: ModelHandle,
    analysis: GroupAnalysis,
    keep: Mapping[str, np.ndarray],
    out_dir: Path,
    inputs: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> CompactResult:
    """Write a SavedModel at ``out_dir`` without the channels ``keep`` drops (group id -> bool, True = keep),
    computing what ``handle`` (the masked model) computes. ``inputs`` (for ``analysis.signature``) are the probe
    batch for constant folding and the final check; other signatures get random probes."""
    notes: list[str] = []
    if handle.training_mode_available:
        notes.append(
            "the compact model serves the signatures only: the input's Keras training-mode __call__ is not "
            "rebuilt (fine-tuning it again runs in inference mode)"
        )
    values = {nv.name: nv.var.numpy() for nv in handle.variables()}
    named = {nv.name: nv.var for nv in handle.variables()}
    removed = _decide_removed(analysis, keep, values, notes)

    probes = {
        name: (dict(inputs) if inputs is not None and name == analysis.signature else probe_inputs(sig))
        for name, sig in analysis.frozen.items()
    }
    for alias, canonical in analysis.aliases.items():
        probes[alias] = probes[canonical]
    consts = _consumer_constants(analysis, removed, values, probes)
    folds = _fold_plan(analysis, removed, consts, values, notes)

    # Slice every bound weight axis (original index space) and collect the new shapes.
    before = {k: list(np.shape(v)) for k, v in values.items()}
    graph_consts: dict[tuple[str, str], np.ndarray] = {}
    for (wkey, axis), layout in analysis.bindings.items():
        idx = _removed_in(analysis, layout, removed)
        if idx.size == 0:
            continue
        if wkey.startswith("const:"):
            _, sig_name, node = wkey.split(":", 2)
            arr = graph_consts.get((sig_name, node))
            if arr is None:
                arr = tf.make_ndarray(_node(analysis.frozen[sig_name].graph_def, node).attr["value"].tensor)
            graph_consts[(sig_name, node)] = np.delete(arr, idx, axis=axis)
        else:
            values[wkey] = np.delete(values[wkey], idx, axis=axis)
    new_len: dict[int, int] = {}

    def length(layout: Layout) -> int:
        if id(layout) not in new_len:
            new_len[id(layout)] = layout.length - _removed_in(analysis, layout, removed).size
        return new_len[id(layout)]

    graph_defs = {}
    for name, sig in analysis.frozen.items():
        gdef = _live_graph(sig)
        nodes = {n.name: n for n in gdef.node}
        bodies = {f.signature.name: {n.name: n for n in f.node_def} for f in gdef.library.function}
        for (sname, node), arr in graph_consts.items():
            if sname == name:
                nodes[node].attr["value"].tensor.CopyFrom(tf.make_tensor_proto(arr))
        patched: dict[tuple[str, int | None], int] = {}
        for patch in analysis.patches:
            if patch.signature != name:
                continue
            value = patch.multiplier * length(patch.layout)
            slot = (f"{patch.function or ''}/{patch.node}", patch.index)
            if patched.get(slot, value) != value:
                raise PipelineError(
                    "structure_failed", f"shape constant {patch.node} is shared by two groups"
                )
            patched[slot] = value
            target = nodes[patch.node] if patch.function is None else bodies[patch.function][patch.node]
            arr = tf.make_ndarray(target.attr["value"].tensor).copy()
            if patch.index is None:
                arr = np.asarray(value, dtype=arr.dtype)
            else:
                arr[patch.index] = value
            target.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(arr))
        for node_name, var_name in sig.weights.items():
            nodes[node_name].attr["shape"].shape.CopyFrom(tf.TensorShape(values[var_name].shape).as_proto())
        fold_feeds: dict[str, str] = {}
        for fold in folds:
            if fold.signature == name and fold.variable is not None:
                fold_feeds[_insert_add(gdef, nodes, fold.op, fold.dtype)] = fold.variable
        for n in gdef.node:
            if n.op == "Squeeze" and not n.attr["squeeze_dims"].list.i:
                _pin_squeeze(n, sig)
            if "_output_shapes" in n.attr:
                del n.attr["_output_shapes"]
            # A custom gradient (Keras' silu/swish wraps its forward ops in IdentityN) names a Python
            # function that the rebuilt graph cannot reach; the forward ops are differentiable as they are.
            if "_gradient_op_type" in n.attr:
                del n.attr["_gradient_op_type"]
            if n.op in ("While", "StatelessWhile"):  # the loop's shapes follow its (new) inputs
                n.attr["output_shapes"].list.ClearField("shape")
        _drop_body_shapes(gdef)
        graph_defs[name] = (gdef, fold_feeds)

    extra: dict[str, np.ndarray] = {}
    for fold in folds:
        if fold.variable is not None and fold.variable not in extra:
            out_idx = _removed_in(analysis, analysis.bindings[fold.out_key], removed)
            extra[fold.variable] = np.delete(fold.delta, out_idx).astype(fold.dtype.as_numpy_dtype)

    module = _build_module(analysis, graph_defs, values, named, extra)
    out_dir.mkdir(parents=True, exist_ok=True)
    signatures = {name: getattr(module, _attr_name(name)).get_concrete_function() for name in analysis.frozen}
    for alias, canonical in analysis.aliases.items():
        signatures[alias] = signatures[canonical]
    tf.saved_model.save(module, str(out_dir), signatures=signatures)

    used = {v for sig in analysis.frozen.values() for v in sig.weights.values()}
    params_before = sum(int(np.prod(before[v])) for v in used)
    params_after = sum(int(values[v].size) for v in used) + sum(int(a.size) for a in extra.values())
    channels = {
        g.id: (g.channels, g.channels - int(removed.get(g.id, np.zeros(0, bool)).sum()))
        for g in analysis.groups
    }
    result = CompactResult(
        out_dir=out_dir,
        channels=channels,
        params_before=params_before,
        params_after=params_after,
        notes=notes,
        shapes={
            v: (before[v], list(values[v].shape)) for v in sorted(used) if before[v] != list(values[v].shape)
        },
        folded=sum(f.channels for f in folds),
    )
    if verify:
        result.max_abs_diff = _verify(handle, out_dir, probes, analysis.aliases)
    return result


def _verify(
    handle: ModelHandle, out_dir: Path, probes: Mapping[str, Mapping[str, Any]], aliases: Mapping[str, str]
) -> dict[str, float]:
    """Every output of every signature within ``RTOL`` (relative to the output's scale, at least 1) of the
    masked model; an alias wraps the very same call as its canonical signature and shares its numbers."""
    loaded = tf.saved_model.load(str(out_dir))
    diffs: dict[str, float] = {}
    for name in probes:
        if name in aliases:
            continue
        got, want = _outputs(handle, loaded, probes[name], name)
        for key in sorted(want):
            a, b = np.asarray(got[key], np.float64), np.asarray(want[key], np.float64)
            d = float(np.max(np.abs(a - b))) if b.size else 0.0
            scale = float(np.max(np.abs(b))) if b.size else 0.0
            diffs[f"{name}/{key}"] = d
            if not d <= RTOL * max(1.0, scale):  # also catches NaN
                raise PipelineError(
                    "structure_failed",
                    f"the compact model differs from the masked model on {name}/{key} by {d:.3g}; not writing it",
                )
    for alias, canonical in aliases.items():
        for full, d in list(diffs.items()):
            if full.startswith(f"{canonical}/"):
                diffs[f"{alias}/{full[len(canonical) + 1 :]}"] = d
    return diffs


def _outputs(
    reference: ModelHandle | Callable[..., Mapping[str, Any]],
    loaded: Any,
    inputs: Mapping[str, Any],
    signature: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    fn = loaded.signatures[signature]
    _, specs = fn.structured_input_signature
    tensors = {k: tf.constant(np.asarray(v, dtype=specs[k].dtype.as_numpy_dtype)) for k, v in inputs.items()}
    got = dict(fn(**tensors))
    want = reference.call(signature, tensors) if isinstance(reference, ModelHandle) else reference(**tensors)
    want = dict(want) if isinstance(want, Mapping) else {"output_0": want}
    return got, want


def _decide_removed(
    analysis: GroupAnalysis,
    keep: Mapping[str, np.ndarray],
    values: Mapping[str, np.ndarray],
    notes: list[str],
) -> dict[str, np.ndarray]:
    removed: dict[str, np.ndarray] = {}
    known = {g.id for g in analysis.groups}
    for gid in keep:
        if gid not in known:
            raise PipelineError("structure_failed", f"no channel group {gid!r} in the analysis")
    for group in analysis.groups:
        if group.id not in keep:
            continue
        k = np.asarray(keep[group.id], dtype=bool)
        if k.shape != (group.channels,):
            raise PipelineError(
                "structure_failed", f"keep vector of {group.id} has shape {k.shape}, want ({group.channels},)"
            )
        drop = ~k
        if not drop.any():
            continue
        if not group.prunable:
            notes.append(f"{group.id} left whole: {group.reason}")
            continue
        live = np.zeros_like(drop)
        for m in group.producers:
            if m.tied:  # a depthwise kernel only carries the channel; the constancy check sees what it does
                continue
            arr = np.moveaxis(values[m.variable], m.axis, 0)
            for c in np.flatnonzero(drop):
                if np.any(arr[m.indices(np.array([c]))] != 0):
                    live[c] = True
        if live.any():
            notes.append(
                f"{group.id}: {int(live.sum())} channel(s) to remove are not zero in the masked model; kept"
            )
            drop &= ~live
        if drop.all():
            first = int(np.flatnonzero(drop)[0])
            drop[first] = False
            notes.append(
                f"{group.id}: every channel was to go; channel {first} kept so the layer stays valid"
            )
        if drop.any():
            removed[group.id] = drop
    return removed


@dataclass
class _Constants:
    use: ConsumerUse
    channels: dict[tuple[str, int], np.ndarray]  # (group id, channel) -> values at the channel's positions


def _consumer_constants(
    analysis: GroupAnalysis,
    removed: dict[str, np.ndarray],
    values: Mapping[str, np.ndarray],
    probes: Mapping[str, Mapping[str, Any]],
) -> list[_Constants]:
    """What each kernel reading a removed channel sees there in the masked model (None = not constant)."""
    wanted: dict[str, list[ConsumerUse]] = {}
    for use in analysis.consumers:
        if _removed_in(analysis, _use_layout(analysis, use), removed).size:
            wanted.setdefault(use.signature, []).append(use)
    found: list[_Constants] = []
    for name, uses in wanted.items():
        sig = analysis.frozen[name]
        tensors = sorted({u.input_tensor for u in uses})
        arrays = dict(zip(tensors, run_skeleton(sig, values, probes[name], tensors), strict=True))
        for use in uses:
            arr = arrays[use.input_tensor]
            flat = arr.reshape(-1, int(np.prod(arr.shape[arr.ndim - use.merge_last :])))
            per: dict[tuple[str, int], np.ndarray] = {}
            for seg in _use_layout(analysis, use).segments:
                gid = analysis.group_of_space.get(analysis.spaces.find(seg.space))
                if gid not in removed:
                    continue
                for c in np.flatnonzero(removed[gid]):
                    cols = flat[:, seg.positions[c]]
                    spread = cols.max(axis=0) - cols.min(axis=0) if cols.size else np.zeros(0)
                    ok = np.all(spread <= 1e-6 * (1.0 + np.abs(cols[0]))) if cols.size else True
                    value = cols[0] if ok else None
                    key = (gid, int(c))
                    if key in per:  # the channel at several places of one tensor (concat([x, x[:, :k]]))
                        before = per[key]
                        value = None if before is None or value is None else np.concatenate([before, value])
                    per[key] = value  # type: ignore[assignment]
            found.append(_Constants(use, per))
    return found


def _use_layout(analysis: GroupAnalysis, use: ConsumerUse) -> Layout:
    """The layout of the consumer's input tensor (its kernel axis' unless the kernel merges axes: heads)."""
    return use.layout if use.layout is not None else analysis.bindings[use.in_key]


@dataclass
class _Fold:
    signature: str
    op: str
    out_key: Key
    delta: np.ndarray
    dtype: tf.DType
    channels: int
    variable: str | None = None  # a new bias variable added after the op
    bias: str | None = None  # an existing bias variable the delta went into


def _fold_plan(
    analysis: GroupAnalysis,
    removed: dict[str, np.ndarray],
    consts: list[_Constants],
    values: dict[str, np.ndarray],
    notes: list[str],
) -> list[_Fold]:
    """Keep channels whose value cannot be folded; fold the others' non-zero constants into biases."""
    blocked: set[tuple[str, int]] = set()
    for found in consts:
        for ch, v in found.channels.items():
            if v is None or (np.any(v != 0) and not found.use.exact):
                blocked.add(ch)
    for gid, c in sorted(blocked):
        removed[gid][c] = False
        notes.append(
            f"{gid}: channel {c} kept: its value in the masked model is not a constant that folds exactly "
            "into the next layer's bias"
        )
    for gid in [g for g, m in removed.items() if not m.any()]:
        del removed[gid]

    folds: list[_Fold] = []
    variables: dict[tuple[str, str], str] = {}
    for found in consts:
        use = found.use
        if not use.exact:  # its non-zero constants were kept above; zeros need no fold
            continue
        kernel = _kernel_value(analysis, use.in_key[0], values)
        in_ax, out_ax = use.in_key[1], use.out_key[1]
        delta = np.zeros(kernel.shape[out_ax], dtype=np.float64)
        count = 0
        places: dict[tuple[str, int], list[np.ndarray]] = {}  # a channel's positions, segment by segment
        for seg in analysis.bindings[use.in_key].segments:
            gid = analysis.group_of_space.get(analysis.spaces.find(seg.space))
            if gid not in removed:
                continue
            for c in np.flatnonzero(removed[gid]):
                places.setdefault((gid, int(c)), []).append(seg.positions[c])
        for ch, parts in places.items():
            v = found.channels.get(ch)
            if v is None or not np.any(v != 0):
                continue
            count += 1
            for p, val in zip(np.concatenate(parts), v, strict=True):
                w = np.take(kernel, int(p), axis=in_ax)  # drops in_ax
                o = out_ax - (1 if out_ax > in_ax else 0)
                w = np.moveaxis(w, o, -1).reshape(-1, w.shape[o])
                delta += float(val) * w.sum(axis=0, dtype=np.float64)
        if count == 0:
            continue
        sig = analysis.frozen[use.signature]
        op = sig.op(use.op)
        fold = _Fold(use.signature, use.op, use.out_key, delta, op.outputs[0].dtype, count)
        bias = _existing_bias(analysis, sig, op, use.out_key)
        if bias is not None:
            values[bias] = (values[bias].astype(np.float64) + delta).astype(values[bias].dtype)
            fold.bias = bias
        else:
            # One variable per distinct delta of a kernel: identical signatures share it, others get their own.
            digest = hashlib.sha1(delta.tobytes()).hexdigest()[:8]
            fold.variable = variables.setdefault(
                (use.in_key[0], digest), f"secateurs_fold/{use.in_key[0].replace(':', '_')}/{len(variables)}"
            )
        folds.append(fold)
    return folds


def _kernel_value(analysis: GroupAnalysis, key: str, values: Mapping[str, np.ndarray]) -> np.ndarray:
    """A consumer kernel's (unsliced) value: a variable, or a constant of a frozen graph (``tf.ones`` kernel)."""
    if not key.startswith("const:"):
        return values[key]
    _, sig_name, node = key.split(":", 2)
    return tf.make_ndarray(_node(analysis.frozen[sig_name].graph_def, node).attr["value"].tensor)


def _existing_bias(
    analysis: GroupAnalysis, sig: FrozenSignature, op: tf.Operation, out_key: Key
) -> str | None:
    """A bias variable added right after ``op`` and bound to its output channels (so slicing agrees)."""
    users = op.outputs[0].consumers()
    if len(users) != 1 or users[0].type not in ("BiasAdd", "Add", "AddV2"):
        return None
    other = [t for t in users[0].inputs if t is not op.outputs[0]]
    if len(other) != 1:
        return None
    t = other[0]
    while t.op.type in ("Identity", "Reshape", "Squeeze", "ExpandDims") and t.op.name not in sig.weights:
        if len(t.consumers()) != 1:
            return None
        t = t.op.inputs[0]
    var = sig.weights.get(t.op.name)
    if var is None or t.shape.rank != 1 or (var, 0) not in analysis.bindings:
        return None
    readers = 0
    for other in analysis.frozen.values():
        for node, name in other.weights.items():
            if name == var:
                readers += len(other.op(node).outputs[0].consumers())
    if readers != 1:  # the bias feeds one op in one signature only: changing it changes nothing else
        return None
    a, b = analysis.bindings[(var, 0)], analysis.bindings[out_key]
    roots = [analysis.spaces.find(s.space) for s in a.segments]
    if roots != [analysis.spaces.find(s.space) for s in b.segments]:
        return None
    return var


def _insert_add(gdef: graph_pb2.GraphDef, nodes: dict[str, Any], op: str, dtype: tf.DType) -> str:
    """Route ``op``'s output through ``AddV2(op, placeholder)``; returns the placeholder to feed the bias."""
    ph_name = f"{op}/secateurs_fold_bias"
    add_name = f"{op}/secateurs_fold"
    if add_name in nodes:
        return ph_name
    for n in gdef.node:
        for i, inp in enumerate(n.input):
            if inp in (op, f"{op}:0"):
                n.input[i] = add_name
    ph = gdef.node.add()
    ph.name, ph.op = ph_name, "Placeholder"
    ph.attr["dtype"].type = dtype.as_datatype_enum
    ph.attr["shape"].shape.CopyFrom(tf.TensorShape([None]).as_proto())
    add = gdef.node.add()
    add.name, add.op = add_name, "AddV2"
    add.input.extend([op, ph_name])
    add.attr["T"].type = dtype.as_datatype_enum
    nodes[ph_name], nodes[add_name] = ph, add
    return ph_name


def _pin_squeeze(node: Any, sig: FrozenSignature) -> None:
    """A ``Squeeze`` without axes drops every size-1 axis: Keras 3's bias path ``Reshape [1, 1, 1, C] ->
    Squeeze`` would also drop the channel axis of a group cut to one channel. Name the axes it squeezed in the
    input (when its shape was known there), so a compacted size of 1 stays an axis."""
    try:
        shape = sig.op(node.name).inputs[0].shape
    except (KeyError, ValueError, IndexError):
        return
    if shape.rank is None or not shape.is_fully_defined():
        return
    node.attr["squeeze_dims"].list.i.extend(i for i, d in enumerate(shape.as_list()) if d == 1)


def _live_graph(sig: FrozenSignature) -> graph_pb2.GraphDef:
    """A copy of the skeleton without the ops no output depends on (Keras runs an RNN's first step outside its
    loop only to learn its output shape: with the old unit count there, it would no longer import). Every
    placeholder stays, as the rebuilt function feeds them all."""
    by_name = {n.name: n for n in sig.graph_def.node}
    stack = [t.split(":")[0] for t in sig.outputs.values()]
    live: set[str] = {n.name for n in sig.graph_def.node if n.op == "Placeholder"}
    while stack:
        name = stack.pop()
        if name in live and by_name[name].op != "Placeholder":
            continue
        live.add(name)
        stack.extend(
            i.lstrip("^").split(":")[0]
            for i in by_name[name].input
            if i.lstrip("^").split(":")[0] not in live
        )
    gdef = graph_pb2.GraphDef()
    gdef.versions.CopyFrom(sig.graph_def.versions)
    gdef.library.CopyFrom(sig.graph_def.library)
    gdef.node.extend(n for n in sig.graph_def.node if n.name in live)
    return gdef


def _drop_body_shapes(gdef: graph_pb2.GraphDef) -> None:
    """Inferred shapes recorded inside library functions (loop bodies) name the old channel counts; and as a
    function's definition changed, it gets a new name (TensorFlow keeps one definition per name per process,
    and the input's loaded model already registered the old one)."""
    if not gdef.library.function:
        return
    for fn in gdef.library.function:
        for n in fn.node_def:
            if "_output_shapes" in n.attr:
                del n.attr["_output_shapes"]
        for attrs in fn.arg_attr.values():
            if "_output_shapes" in attrs.attr:
                del attrs.attr["_output_shapes"]
    digest = hashlib.sha1(gdef.library.SerializeToString(deterministic=True)).hexdigest()[:10]
    names = {fn.signature.name: f"{fn.signature.name}_secateurs_{digest}" for fn in gdef.library.function}
    for fn in gdef.library.function:
        fn.signature.name = names[fn.signature.name]
        _rename_calls(fn.node_def, names)
    for grad in gdef.library.gradient:
        grad.function_name = names.get(grad.function_name, grad.function_name)
        grad.gradient_func = names.get(grad.gradient_func, grad.gradient_func)
    _rename_calls(gdef.node, names)


def _rename_calls(nodes: Any, names: Mapping[str, str]) -> None:
    for n in nodes:
        if n.op in names:
            n.op = names[n.op]
        for value in n.attr.values():
            if value.HasField("func") and value.func.name in names:
                value.func.name = names[value.func.name]
            for fn in value.list.func:
                if fn.name in names:
                    fn.name = names[fn.name]


def _node(gdef: graph_pb2.GraphDef, name: str) -> Any:
    for n in gdef.node:
        if n.name == name:
            return n
    raise KeyError(name)


def _attr_name(signature: str) -> str:
    return "signature_" + re.sub(r"\W", "_", signature)


class CompactModule(tf.Module):
    """The rebuilt model: sliced weights as variables, one tf.function per signature."""


def _build_module(
    analysis: GroupAnalysis,
    graph_defs: dict[str, tuple[graph_pb2.GraphDef, dict[str, str]]],
    values: Mapping[str, np.ndarray],
    named: Mapping[str, tf.Variable],
    extra: Mapping[str, np.ndarray],
) -> CompactModule:
    module = CompactModule(name="secateurs_compact")
    used = sorted({v for sig in analysis.frozen.values() for v in sig.weights.values()})
    variables: dict[str, tf.Variable] = {}
    for name in used:
        # The handle's unique name: a reloaded compact model names its variables as the input's handle did.
        variables[name] = tf.Variable(values[name], trainable=named[name].trainable, name=name)
    for name, arr in extra.items():
        variables[name] = tf.Variable(arr, trainable=True, name=name)
    module.weights_by_name = variables  # tracked: saved under variables/
    for sig_name, sig in analysis.frozen.items():
        gdef, fold_feeds = graph_defs[sig_name]
        setattr(module, _attr_name(sig_name), _signature_function(sig, gdef, variables, fold_feeds))
    return module


def _signature_function(
    sig: FrozenSignature,
    gdef: graph_pb2.GraphDef,
    variables: Mapping[str, tf.Variable],
    fold_vars: Mapping[str, str],
) -> Any:
    keys = sorted(sig.inputs)
    out_keys = sorted(sig.outputs)
    returns = [sig.outputs[k] for k in out_keys]
    params = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in keys]
    signature = inspect.Signature(params)

    def body(*args: Any, **kwargs: Any) -> dict[str, tf.Tensor]:
        bound = signature.bind(*args, **kwargs)
        feed: dict[str, Any] = {sig.inputs[k]: bound.arguments[k] for k in keys}
        for node, var_name in sig.weights.items():
            feed[f"{node}:0"] = variables[var_name].read_value()
        for node, var_name in fold_vars.items():
            feed[f"{node}:0"] = variables[var_name].read_value()
        outs = tf.graph_util.import_graph_def(gdef, input_map=feed, return_elements=returns, name="compact")
        return {k: tf.identity(t, name=k) for k, t in zip(out_keys, outs, strict=True)}

    body.__signature__ = signature  # type: ignore[attr-defined]
    specs = [tf.TensorSpec(sig.input_specs[k].shape, sig.input_specs[k].dtype, name=k) for k in keys]
    return tf.function(body, input_signature=specs, autograph=False)


def max_abs_diff(
    reference: ModelHandle | Callable[..., Mapping[str, Any]],
    compact_dir: Path | Any,
    inputs: Mapping[str, Any],
    signature: str = "serving_default",
) -> dict[str, float]:
    """Max absolute difference of every output of ``signature`` between ``reference`` (a handle, or a
    callable taking the inputs as keywords) and the SavedModel at ``compact_dir`` (or that model loaded)."""
    loaded = tf.saved_model.load(str(compact_dir)) if isinstance(compact_dir, str | Path) else compact_dir
    got, want = _outputs(reference, loaded, inputs, signature)
    return {
        k: float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(want[k], np.float64))))
        if np.size(want[k])
        else 0.0
        for k in sorted(want)
    }
