"""Where each kernel is applied in a signature's graph: the op that uses it and that op's output spatial size.

``worker.evaluation.flops`` counts multiply-accumulates per sample as weights x positions, and a restored
SavedModel keeps variables but no Keras layers, so the positions (a convolution's output pixels) are not in
the variables. They are in the graph: the signature's concrete function calls the model's traced function
(``StatefulPartitionedCall``), whose ops carry static shapes inferred from the signature's input shapes. This
module walks those graphs -- no op is run -- and follows each kernel operand back to the captured variable it
reads (``ReadVariableOp`` of a resource placeholder, bound to the caller's operand at each function call).

Recognised uses (TF op -> ``flops`` kind, positions per sample):
- ``Conv2D`` with a rank-4 kernel -> conv2d, output ``[H, W]``; with a rank-3 kernel (Keras Conv1D expands it)
  -> conv1d, output length; ``DepthwiseConv2dNative`` -> depthwise_conv2d; ``Conv3D`` -> conv3d;
  ``Conv2DBackpropInput`` (Conv2DTranspose) -> conv2d_transpose, positions = its INPUT pixels.
- ``MatMul`` -> dense, one position per sample; when its input is a ``Reshape`` folding leading axes into the
  batch (``tensordot`` of a Dense over a sequence) the folded axes are the positions. ``BatchMatMulV2/V3``
  -> dense over every axis between batch and features; the kernel may be reshaped on the way (EinsumDense,
  MultiHeadAttention: ``(d_model, heads, head_dim)`` -> ``(d_model, heads * head_dim)``).
A kernel used several times (a shared layer) sums its positions. Anything else (an ``Einsum`` op, e.g.
attention's query-key and score-value products, which have no weights; loops; unknown spatial sizes such as a
fully convolutional input of size None) is left out and MACs fall back to "per position" in ``flops``.
Reading callee graphs uses TensorFlow's private ``FuncGraph._functions``; any failure gives an empty result
and the reason, never a wrong number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from worker.models.handle import ModelHandle

__all__ = ["KernelUse", "flops_inputs", "kernel_uses"]

# Ops between a variable and the op applying it that keep every weight: Keras 3 ``EinsumDense`` (the
# MultiHeadAttention projections, kernels ``(d_model, heads, head_dim)``) reshapes its kernel to 2-D and
# multiplies with ``BatchMatMulV2``, so a Reshape of a kernel still uses each weight once per position.
_PASS_THROUGH = frozenset({"ReadVariableOp", "Identity", "Cast", "ExpandDims", "Reshape"})
_CALLS = frozenset({"StatefulPartitionedCall", "PartitionedCall"})
_MAX_DEPTH = 16
_MAX_HOPS = 16


@dataclass(frozen=True)
class KernelUse:
    """One op applying a kernel: ``kind`` as ``flops`` names it, ``spatial`` its positions' shape (or None)."""

    op: str
    kind: str
    spatial: tuple[int, ...] | None


def _static(shape: tf.TensorShape, axes: slice) -> tuple[int, ...] | None:
    if shape.rank is None:
        return None
    dims = shape.as_list()[axes]
    return None if any(d is None for d in dims) else tuple(int(d) for d in dims)


def _source(tensor: tf.Tensor, resources: Mapping[str, str]) -> str | None:
    """The variable name behind ``tensor`` (through reads, identities, casts), or None."""
    for _ in range(_MAX_HOPS):
        if tensor.name in resources:
            return resources[tensor.name]
        op = tensor.op
        if op.type not in _PASS_THROUGH or not op.inputs:
            return None
        tensor = op.inputs[0]
    return None


def _spatial_axes(op: Any) -> slice:
    try:
        channels_first = op.get_attr("data_format").startswith(b"NC")
    except (ValueError, AttributeError):
        channels_first = False
    return slice(2, None) if channels_first else slice(1, -1)


def _matmul_positions(op: Any, operand: int) -> tuple[int, ...] | None:
    """Positions of a 2-D MatMul: 1, unless its data operand folds leading axes of a rank >= 3 tensor."""
    data = op.inputs[1 - operand]
    if data.op.type != "Reshape" or not data.op.inputs:
        return ()
    source = data.op.inputs[0].shape
    if source.rank is None or source.rank < 3 or data.shape.rank != 2:
        return ()
    features = data.shape.as_list()[-1]
    if features is None:  # Tensordot's reshape target is computed at run time: the kernel says the features
        kernel = op.inputs[operand].shape
        features = kernel.as_list()[1 if operand == 0 else 0] if kernel.rank == 2 else None
    if source.as_list()[-1] != features:
        return ()  # e.g. Flatten: features merged, batch kept -> one position
    return _static(source, slice(1, -1))


def _use(op: Any, resources: Mapping[str, str]) -> tuple[str, KernelUse] | None:
    kind_by_op = {
        "Conv2D": "conv2d",
        "DepthwiseConv2dNative": "depthwise_conv2d",
        "Conv3D": "conv3d",
        "Conv2DBackpropInput": "conv2d_transpose",
    }
    if op.type in kind_by_op:
        name = _source(op.inputs[1], resources)
        if name is None:
            return None
        kind = kind_by_op[op.type]
        if op.type == "Conv2DBackpropInput":
            spatial = _static(op.inputs[2].shape, _spatial_axes(op))
        else:
            spatial = _static(op.outputs[0].shape, _spatial_axes(op))
        if kind == "conv2d" and op.inputs[1].op.type == "ExpandDims":  # Keras Conv1D: [1, k, in, out]
            kind, spatial = "conv1d", None if spatial is None else (math.prod(spatial),)
        return name, KernelUse(op.type, kind, spatial)
    if op.type == "MatMul":
        for operand in (1, 0):
            name = _source(op.inputs[operand], resources)
            if name is not None:
                return name, KernelUse(op.type, "dense", _matmul_positions(op, operand))
        return None
    if (
        op.type == "Einsum" and len(op.inputs) == 2
    ):  # EinsumDense: positions = output entries per weight entry
        for operand in (1, 0):
            name = _source(op.inputs[operand], resources)
            if name is None:
                continue
            try:
                lhs, out = op.get_attr("equation").decode().replace(" ", "").split("->")
                letters = lhs.split(",")[operand]
            except (ValueError, IndexError):
                return None
            dims = _static(op.outputs[0].shape, slice(1, None))
            if dims is None or "." in lhs:
                return name, KernelUse(op.type, "dense", None)
            shared = math.prod(d for ch, d in zip(out[1:], dims, strict=False) if ch in letters)
            return name, KernelUse(op.type, "dense", (math.prod(dims) // max(shared, 1),))
        return None
    if op.type in ("BatchMatMulV2", "BatchMatMulV3"):
        name = _source(op.inputs[1], resources)
        if name is None:
            return None
        return name, KernelUse(op.type, "dense", _static(op.outputs[0].shape, slice(1, -1)))
    return None


def _callee(graph: Any, name: str) -> Any:
    """The FuncGraph of library function ``name`` as seen from ``graph`` or the graphs enclosing it."""
    while graph is not None:
        function = getattr(graph, "_functions", {}).get(name)
        if function is not None:
            return function.graph
        graph = getattr(graph, "outer_graph", None)
    return None


def _walk(graph: Any, resources: Mapping[str, str], found: dict[str, list[KernelUse]], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise RecursionError(f"function calls nested deeper than {_MAX_DEPTH}")
    for op in graph.get_operations():
        use = _use(op, resources)
        if use is not None:
            found.setdefault(use[0], []).append(use[1])
        if op.type not in _CALLS:
            continue
        inner = _callee(graph, op.get_attr("f").name)
        if inner is None:
            continue
        bound = {}
        for operand, placeholder in zip(op.inputs, inner.inputs, strict=False):
            name = _source(operand, resources)
            if name is not None:
                bound[placeholder.name] = name
        if bound:
            _walk(inner, bound, found, depth + 1)


def kernel_uses(handle: ModelHandle, signature: str) -> tuple[dict[str, list[KernelUse]], str | None]:
    """``({variable name: [uses]}, None)``, or ``({}, reason)`` when the graphs cannot be read."""
    try:
        fn = handle.function(signature)
        by_handle = {id(nv.var.handle): nv.name for nv in handle.variables()}
        resources = {
            internal.name: by_handle[id(external)]
            for external, internal in zip(fn.captured_inputs, fn.graph.internal_captures, strict=False)
            if id(external) in by_handle
        }
        found: dict[str, list[KernelUse]] = {}
        _walk(fn.graph, resources, found, 0)
    except Exception as exc:  # private TF structures: a TF upgrade must cost the spatial sizes, not the job
        return {}, f"{type(exc).__name__}: {exc}"
    return found, None


def flops_inputs(uses: Mapping[str, list[KernelUse]]) -> tuple[dict[str, str], dict[str, list[int]]]:
    """``(kinds, output_spatial)`` for ``flops.estimate_flops`` from ``kernel_uses``.

    A kernel applied once gives its kind and spatial shape as they are; several uses of one kind sum their
    positions (folded into the first axis); uses of different kinds, or any unknown size, give the kind only
    when it is unique and no spatial size, so ``flops`` reports MACs per position instead of guessing.
    """
    axes = {"dense": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3, "depthwise_conv2d": 2, "conv2d_transpose": 2}
    kinds: dict[str, str] = {}
    spatial: dict[str, list[int]] = {}
    for name, found in uses.items():
        found_kinds = {use.kind for use in found}
        if len(found_kinds) != 1:
            continue
        kind = found_kinds.pop()
        kinds[name] = kind
        if any(use.spatial is None for use in found):
            continue
        if len(found) == 1:
            spatial[name] = list(found[0].spatial or ())
            continue
        total = sum(math.prod(use.spatial or ()) for use in found)
        spatial[name] = [total] + [1] * max(0, axes[kind] - 1)
    return kinds, spatial
