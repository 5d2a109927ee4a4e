"""One signature's graph, frozen, with every weight traced back to the handle variable it reads.

Channel groups must come from what serving runs, not from layer names, so the signature's concrete function is
frozen (``convert_variables_to_constants_v2_as_graph``: nested calls inlined, resource reads turned into
``Const`` nodes named after the function's captured placeholders). The captured placeholders are matched to the
handle's variables by the identity of their resource handles, never by value or name. The weight ``Const``
nodes are then turned back into ``Placeholder`` nodes of the same dtype and shape (the *skeleton*): the graph
stays small, and both the equivalence probes and the rebuilt model feed the current variable values into it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2_as_graph

from worker.errors import PipelineError
from worker.models.handle import ModelHandle


@dataclass
class FrozenSignature:
    """The skeleton GraphDef of one signature and how its names map to the outside world."""

    name: str
    graph_def: graph_pb2.GraphDef
    inputs: dict[str, str]  # signature input key -> placeholder tensor name in graph_def
    input_specs: dict[str, tf.TensorSpec]
    outputs: dict[str, str]  # signature output key -> tensor name in graph_def
    weights: dict[str, str]  # weight node name (now a Placeholder) -> NamedVariable.name
    graph: tf.Graph = field(repr=False)  # graph_def imported (shape inference), for the analysis only

    def op(self, name: str) -> tf.Operation:
        return self.graph.get_operation_by_name(name)


def freeze_signature(handle: ModelHandle, name: str) -> FrozenSignature:
    """Freeze signature ``name`` of ``handle`` (PipelineError ``signature_not_found`` if it has none)."""
    fn = handle.function(name)
    by_handle = {id(nv.var.handle): nv.name for nv in handle.variables()}
    captured: dict[str, str] = {}
    for external, internal in fn.graph.captures:
        var_name = by_handle.get(id(external))
        if var_name is not None:
            captured[internal.op.name] = var_name
    try:
        _, graph_def = convert_variables_to_constants_v2_as_graph(fn, lower_control_flow=False)
    except Exception as exc:  # TF raises many kinds here (2 GB protos, unsupported resources)
        raise PipelineError(
            "structure_failed", f"cannot freeze signature {name!r} to read its channels: {exc}"
        ) from exc

    args, kwargs = fn.structured_input_signature
    if args:
        raise PipelineError("structure_failed", f"signature {name!r} takes positional inputs")
    keys = sorted(kwargs)
    flat_specs = tf.nest.flatten(kwargs)
    if len(flat_specs) != len(keys):
        raise PipelineError("structure_failed", f"signature {name!r} has nested inputs")
    inputs = {k: fn.inputs[i].name for i, k in enumerate(keys)}
    outputs_struct = fn.structured_outputs
    out_keys = sorted(outputs_struct) if isinstance(outputs_struct, Mapping) else ["output_0"]
    if len(out_keys) != len(fn.outputs):
        raise PipelineError("structure_failed", f"signature {name!r} has nested outputs")
    outputs = {k: t.name for k, t in zip(out_keys, fn.outputs, strict=True)}

    skeleton = graph_def  # edited in place: no second copy of the weights
    weights: dict[str, str] = {}
    for node in skeleton.node:
        if node.op == "Const" and node.name in captured:
            tensor = node.attr["value"].tensor
            dtype = tensor.dtype
            shape = tf.TensorShape(tensor.tensor_shape)
            node.op = "Placeholder"
            node.ClearField("attr")
            node.attr["dtype"].type = dtype
            node.attr["shape"].shape.CopyFrom(shape.as_proto())
            weights[node.name] = captured[node.name]
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(skeleton, name="")
    return FrozenSignature(
        name=name,
        graph_def=skeleton,
        inputs=inputs,
        input_specs={k: kwargs[k] for k in keys},
        outputs=outputs,
        weights=weights,
        graph=graph,
    )


def const_value(op: tf.Operation) -> np.ndarray:
    """The value of a ``Const`` op of the skeleton."""
    return tf.make_ndarray(op.get_attr("value"))


def run_skeleton(
    sig: FrozenSignature,
    values: Mapping[str, np.ndarray],
    inputs: Mapping[str, Any],
    fetches: Sequence[str],
) -> list[np.ndarray]:
    """Evaluate tensors ``fetches`` of the skeleton with weight nodes fed from ``values`` (variable name ->
    array) and signature ``inputs`` (key -> array). Used to read what the masked model computes inside."""
    if not fetches:
        return []
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(sig.graph_def, name="probe")
    feed: dict[str, Any] = {f"probe/{node}:0": values[var] for node, var in sig.weights.items()}
    for key, tensor in sig.inputs.items():
        dtype = sig.input_specs[key].dtype.as_numpy_dtype
        feed[f"probe/{tensor}"] = np.asarray(inputs[key], dtype=dtype)
    with tf.compat.v1.Session(graph=graph) as session:
        out = session.run([f"probe/{t}" for t in fetches], feed_dict=feed)
    return [np.asarray(v) for v in out]
