"""What each weight's op receives: the op input tensors of a frozen signature, fetched for calibration inputs.

Calibration methods (Wanda, SparseGPT, least-squares channel repair) need, for every pruned variable, the data
its op multiplies it with -- read from the signature's graph, never from layer names, so any SavedModel works.
The frozen skeleton (``worker.structure.frozen``) has every weight ``Const`` turned into a ``Placeholder``
mapped to its variable; ``find_uses`` follows each such placeholder through pass-through ops (``Identity``,
``Cast``, and the C-order ``Reshape``/``ExpandDims``/``Squeeze`` a Keras Conv1D or EinsumDense puts on its kernel)
to the op that consumes it, and says how that op reads the variable as a matrix:

- ``in_axes`` / ``out_axes``: the variable's axes that are the op's input features (contracted with the data)
  and its output units. ``matrix(weight)`` = ``weight.transpose(in_axes + out_axes).reshape(d_in, d_out)``,
  and the op computes ``X @ matrix`` with ``X`` = ``CaptureSession.x_matrix(use)`` (rows x ``d_in``):
  MatMul / BatchMatMul: the data input's rows; Conv2D: the im2col patches in ``(kh, kw, cin)`` order (what
  ``tf.image.extract_patches`` returns, matching the kernel's C-order flattening); Einsum: the data
  transposed to ``(other labels..., contracted labels)``.
- ``DepthwiseConv2dNative``: ``X`` is the patch matrix ``(rows, kh*kw*cin)`` too, but output ``(c, m)`` reads
  only the ``kh*kw`` features of channel ``c`` (``kind == "depthwise"``): per-feature norms are meaningful,
  a ``d_in x d_in`` Hessian is not.

Ops no rule explains (a weight reaching its op through arithmetic, Conv3D, an einsum whose weight label also
indexes the output, ...) give a ``WeightUse`` with ``reason`` set and no tensors: callers keep magnitude
scoring there and say so.

Evaluation: ``CaptureSession`` imports the skeleton ONCE into its own ``tf.Graph`` and opens one
``tf.compat.v1.Session`` (``run_skeleton`` re-imports the graph on every call), adds the derived tensors a pass
needs (``x_matrix``, ``gram`` = X^T X, ``sq_norms`` = column sums of X^2, ``rows``) on top, and fetches
several of them per run with the current weight values fed. The session only computes what the fetches need,
so reading the first op's input does not run the rest of the model.

Use (what ``worker/stages/calibration.py`` does)::

    sig = job.frozen_signature()                       # frozen once per job (reuses the channel analysis)
    uses = [u for u in find_uses(sig, names) if u.supported]
    values = {nv.name: variable_view(nv.var) for nv in job.handle.variables()}   # every weight of sig
    with CaptureSession(sig) as session:
        for batch in job.calibration_batches()():
            x, y, h = session.run(values, batch, [session.x_matrix(use), use.output, session.gram(use)])
    # x @ use.matrix(values[use.variable]) == y.reshape(len(x), -1) (Conv2D, MatMul, Einsum)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from worker.structure.frozen import FrozenSignature
from worker.structure.graph_walk import _topological, walk_up

__all__ = [
    "PASS_THROUGH",
    "CaptureSession",
    "Reuse",
    "UseKind",
    "WeightUse",
    "dependency_waves",
    "find_uses",
    "reuse_plan",
    "uses_by_variable",
]

UseKind = Literal["matmul", "conv2d", "depthwise", "einsum", "unsupported"]

# Ops a weight may pass through on its way to the consuming op without changing which element is which
# (element order is C order for the reshaping ones; Cast: mixed precision).
PASS_THROUGH = frozenset({"Identity", "Cast", "Reshape", "ExpandDims", "Squeeze", "Snapshot", "StopGradient"})
_MATMUL = frozenset({"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"})
_CONSUMERS = _MATMUL | {"Conv2D", "DepthwiseConv2dNative", "Einsum"}


@dataclass(frozen=True)
class WeightUse:
    """One op consuming one variable (``variable``) of a frozen signature.

    ``data_input`` / ``output``: tensor names in the skeleton (``op:0``) -- what the op multiplies the weight
    with, and what it computes. ``in_axes`` / ``out_axes``: the variable axes read as the op's input features
    and output units (see the module docstring). ``reason``: why a method cannot use this op (then ``kind``
    is ``"unsupported"``), else None. ``order``: the op's position in the graph's topological order.
    """

    variable: str
    op: str
    op_type: str
    kind: UseKind
    data_input: str | None
    output: str | None
    in_axes: tuple[int, ...] = ()
    out_axes: tuple[int, ...] = ()
    attrs: Mapping[str, Any] = field(default_factory=dict, compare=False)
    reason: str | None = None
    order: int = 0

    @property
    def supported(self) -> bool:
        return self.reason is None

    def dims(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(d_in, d_out)`` of the op's matrix view of a variable of ``shape``."""
        return (
            math.prod(int(shape[a]) for a in self.in_axes),
            math.prod(int(shape[a]) for a in self.out_axes),
        )

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        """The variable as the op's ``(d_in, d_out)`` matrix (a view when no transpose is needed)."""
        d_in, d_out = self.dims(weight.shape)
        return np.transpose(weight, self.in_axes + self.out_axes).reshape(d_in, d_out)

    def unmatrix(self, matrix: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Inverse of ``matrix``: a ``(d_in, d_out)`` matrix back in the variable's ``shape``."""
        order = self.in_axes + self.out_axes
        moved = np.reshape(matrix, [int(shape[a]) for a in order])
        return np.transpose(moved, np.argsort(order))

    def feature_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The input features as variable axes (so per-feature statistics broadcast against the variable):
        size ``shape[a]`` on every ``in_axes`` axis, 1 elsewhere."""
        return tuple(int(shape[a]) if a in self.in_axes else 1 for a in range(len(shape)))


def find_uses(sig: FrozenSignature, variables: Iterable[str] | None = None) -> list[WeightUse]:
    """Every op that consumes one of ``variables`` (all weights of ``sig`` when None), in topological order.

    A variable reaching an op no rule explains gives an unsupported ``WeightUse`` (with ``reason``) rather than
    nothing, so callers can name it; a variable the signature never reads gives no use at all.
    """
    wanted = None if variables is None else set(variables)
    order = {op.name: i for i, op in enumerate(_topological(sig.graph))}
    uses: list[WeightUse] = []
    for node, var in sig.weights.items():
        if wanted is not None and var not in wanted:
            continue
        placeholder = sig.graph.get_operation_by_name(node)
        shape = tuple(int(d) for d in placeholder.outputs[0].shape)
        for tensor, consumer in _consumers(placeholder.outputs[0]):
            uses.append(_use(var, shape, tensor, consumer, order.get(consumer.name, 0)))
    uses.sort(key=lambda u: (u.order, u.variable))
    return uses


def uses_by_variable(uses: Iterable[WeightUse]) -> dict[str, list[WeightUse]]:
    """``find_uses``'s list grouped by variable, each list in topological order."""
    out: dict[str, list[WeightUse]] = {}
    for use in uses:
        out.setdefault(use.variable, []).append(use)
    return out


def dependency_waves(sig: FrozenSignature, uses: Sequence[WeightUse]) -> list[list[WeightUse]]:
    """``uses`` in waves: a use's data input depends only on the outputs of uses in earlier waves.

    Sequential methods (SparseGPT) process one wave at a time and recompute the next wave's inputs from the
    already-pruned model; uses of one wave (the q/k/v projections of one attention, a residual block's
    shortcut and first conv) read inputs no other use of the wave changes, so they share one capture pass.
    """
    by_op: dict[str, list[WeightUse]] = {}
    for use in uses:
        by_op.setdefault(use.op, []).append(use)
    level: dict[str, int] = {}
    for op_name in sorted(by_op, key=lambda name: by_op[name][0].order):
        use = by_op[op_name][0]
        deps = [0]
        if use.data_input is not None:
            for ancestor in _ancestors(sig.graph, use.data_input):
                if ancestor in level:
                    deps.append(level[ancestor] + 1)
        level[op_name] = max(deps)
    waves: list[list[WeightUse]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for use in uses:
        waves[level[use.op]].append(use)
    return [w for w in waves if w]


@dataclass(frozen=True)
class Reuse:
    """What a sequential pass over ``waves`` may feed instead of recomputing (``reuse_plan``).

    A tensor is *final from pass r* when every pruned weight it depends on belongs to a wave before ``r`` (those
    are updated before pass ``r`` runs). ``feeds[j]``: tensors final before pass ``j`` that pass ``j`` reads
    (the nearest ones to its wave's inputs) -- fed from the cache, so the pass runs only the ops between them
    and its wave. ``keep[r]``: tensors final from pass ``r`` that pass ``r`` fetches for later passes to feed.
    ``last_use``: the last pass that feeds each cached tensor, after which it is dropped. Feeding is an
    optimisation only: a tensor missing from the cache is recomputed from whatever is fed above it, which is
    equally correct."""

    feeds: list[list[str]]
    keep: list[list[str]]
    last_use: dict[str, int]


def reuse_plan(sig: FrozenSignature, waves: Sequence[Sequence[WeightUse]]) -> Reuse:
    """The cache plan of a sequential pass: without it every wave recomputes the model from its inputs (a
    ResNet-50 has ~50 waves: ~25 forward passes of the calibration set); with it the passes together cost about
    one forward pass, holding the tensors that later passes still read for every calibration batch.

    Any floating tensor may be cached, not only the outputs of weight ops: caching only those made each pass
    recompute the element-wise ops after them, and a residual stream (``relu(bn(conv) + previous block)``) back
    to its stage's first block (ResNet-50: each bias/BatchNorm op ran ~2.6 times per batch, more time than the
    convolutions)."""
    wave_of_var = {use.variable: j for j, wave in enumerate(waves) for use in wave}
    weight_ready = {node: wave_of_var[var] + 1 for node, var in sig.weights.items() if var in wave_of_var}
    inputs = {sig.graph.get_tensor_by_name(name).op.name for name in sig.inputs.values()}
    ready: dict[str, int] = {}
    data: set[str] = set(inputs)  # ops that read a signature input: weight-only subgraphs are not cached

    def ready_of(root: tf.Operation) -> int:
        stack = [root]
        while stack:
            op = stack[-1]
            if op.name in ready:
                stack.pop()
                continue
            deps = [t.op for t in op.inputs] + list(op.control_inputs)
            missing = [d for d in deps if d.name not in ready]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            ready[op.name] = max([weight_ready.get(op.name, 0)] + [ready[d.name] for d in deps])
            if any(d.name in data for d in deps):
                data.add(op.name)
        return ready[root.name]

    count = len(waves)
    feeds: list[set[str]] = [set() for _ in range(count)]
    keep: list[set[str]] = [set() for _ in range(count)]
    last_use: dict[str, int] = {}
    for j in reversed(range(count)):
        items: list[tf.Tensor | tf.Operation] = [
            sig.graph.get_tensor_by_name(name)
            for name in sorted({u.data_input for u in waves[j] if u.data_input is not None} | keep[j])
        ]

        def cached(tensor: tf.Tensor, j: int = j) -> bool:
            final_from = ready_of(tensor.op)
            if final_from < j and tensor.op.name in data and _cacheable(tensor):
                feeds[j].add(tensor.name)
                keep[final_from].add(tensor.name)
                last_use[tensor.name] = max(last_use.get(tensor.name, -1), j)
                return True
            return False

        walk_up(items, cached)
    return Reuse([sorted(f) for f in feeds], [sorted(k) for k in keep], last_use)


def _cacheable(tensor: tf.Tensor) -> bool:
    """Worth caching per batch: computed floating data (shape vectors and copies of an input are not)."""
    return tensor.dtype.is_floating and tensor.op.type not in ("Placeholder", "Const", "Identity")


class CaptureSession:
    """One import of the skeleton and one Session for a whole capture pass (see the module docstring).

    ``run(values, inputs, fetches)``: ``values`` = variable name -> current array (every weight of the
    signature: the placeholders the fetches need must be fed), ``inputs`` = signature input key -> batch,
    ``fetches`` = tensor names of the skeleton (``use.data_input``, ``use.output``) or tensors this session
    built (``x_matrix``, ``gram``, ``sq_norms``, ``rows``). Close it (or use ``with``) to free the graph.
    """

    def __init__(self, sig: FrozenSignature) -> None:
        self.sig = sig
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.graph_util.import_graph_def(sig.graph_def, name="")
        # No Grappler: each new (feeds, fetches) pair -- one per SparseGPT wave -- optimised the graph anew,
        # ~0.2 s a time on ResNet-50 (10 of its 37 s of capture runs), for no faster kernels afterwards.
        config = tf.compat.v1.ConfigProto()
        config.graph_options.rewrite_options.disable_meta_optimizer = True
        self._session = tf.compat.v1.Session(graph=self.graph, config=config)
        self._x: dict[tuple[str, str], tf.Tensor] = {}
        self._derived: dict[tuple[str, str, str], tf.Tensor] = {}
        self._needs: dict[
            tuple[tuple[str, ...], frozenset[str]], tuple[list[tuple[str, str]], list[str]]
        ] = {}

    def __enter__(self) -> CaptureSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def tensor(self, name: str) -> tf.Tensor:
        return self.graph.get_tensor_by_name(name)

    def x_matrix(self, use: WeightUse) -> tf.Tensor:
        """``X`` (rows x ``d_in``, float32) of ``use``: what its op multiplies the weight matrix with."""
        if not use.supported or use.data_input is None:
            raise ValueError(f"{use.variable} at {use.op}: {use.reason}")
        key = (use.op, use.data_input)
        if key not in self._x:
            with self.graph.as_default():
                self._x[key] = _x_matrix(self.tensor(use.data_input), use)
        return self._x[key]

    def _derive(self, use: WeightUse, what: str) -> tf.Tensor:
        key = (use.op, use.data_input or "", what)
        if key not in self._derived and what == "rows" and use.kind in ("conv2d", "depthwise"):
            with self.graph.as_default(), tf.name_scope("calibration"):
                self._derived[key] = _conv_rows(self.tensor(use.data_input or ""), use)
        if key not in self._derived and what != "gram" and use.kind in ("conv2d", "depthwise"):
            # Norms and row counts of a convolution without its im2col patches (kh*kw times the input).
            with self.graph.as_default(), tf.name_scope("calibration"):
                sq, rows = _window_sq_norms(self.tensor(use.data_input or ""), use)
                self._derived[(use.op, use.data_input or "", "sq_norms")] = sq
                self._derived[(use.op, use.data_input or "", "rows")] = rows
        if key not in self._derived:
            x = self.x_matrix(use)
            with self.graph.as_default(), tf.name_scope("calibration"):
                if what == "gram":
                    self._derived[key] = tf.matmul(x, x, transpose_a=True)
                elif what == "sq_norms":
                    self._derived[key] = tf.reduce_sum(tf.square(x), axis=0)
                else:
                    self._derived[key] = tf.shape(x)[0]
        return self._derived[key]

    def gram(self, use: WeightUse, max_rows: int | None = None) -> tf.Tensor:
        """``X^T X`` (``d_in x d_in``, float32) of one batch: accumulate it in float64 across batches.

        ``max_rows`` (Conv2D only): from at most that many output positions of the batch, drawn without
        replacement (seeded, the same draw for every batch of one size) and gathered from the padded input
        instead of building the im2col matrix of every position; the sum is scaled by positions / drawn, an
        unbiased estimate of the full ``X^T X`` (exact when the batch has no more positions than that)."""
        if max_rows is None or use.kind != "conv2d":
            return self._derive(use, "gram")
        key = (use.op, use.data_input or "", f"gram<={max_rows}")
        if key not in self._derived:
            with self.graph.as_default(), tf.name_scope("calibration"):
                self._derived[key] = _sampled_gram(self.tensor(use.data_input or ""), use, max_rows)
        return self._derived[key]

    def sq_norms(self, use: WeightUse) -> tf.Tensor:
        """Per input feature, the sum of squares over the batch's rows (``d_in``): Wanda's ``||X_j||^2``."""
        return self._derive(use, "sq_norms")

    def rows(self, use: WeightUse) -> tf.Tensor:
        """How many rows ``X`` has for the batch (samples x positions)."""
        return self._derive(use, "rows")

    def run(
        self,
        values: Mapping[str, np.ndarray],
        inputs: Mapping[str, Any],
        fetches: Sequence[str | tf.Tensor],
        feeds: Mapping[str, np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Evaluate ``fetches`` for one batch of signature ``inputs`` with the weights fed from ``values``;
        ``feeds``: internal tensors (by name) given instead of computed (``reuse_plan``)."""
        if not fetches:
            return []
        feed: dict[Any, Any] = dict(feeds or {})
        wanted = [self.tensor(f) if isinstance(f, str) else f for f in fetches]
        weights, keys = self._needed(wanted, frozenset(feed))
        for node, var in weights:
            feed[f"{node}:0"] = values[var]
        for key in keys:
            tensor = self.sig.inputs[key]
            feed[tensor] = np.asarray(inputs[key], dtype=self.sig.input_specs[key].dtype.as_numpy_dtype)
        return [np.asarray(v) for v in self._session.run(wanted, feed_dict=feed)]

    def _needed(
        self, wanted: list[tf.Tensor], fed: frozenset[str]
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """The weight placeholders and signature inputs the fetches depend on below the fed tensors: feeding all
        of them (every run: ~100 MB of ResNet-50's weights and the images) cost more than a pass that starts
        at cached activations."""
        key = (tuple(t.name for t in wanted), fed)
        if key not in self._needs:
            seen = walk_up(wanted, lambda tensor: tensor.name in fed)
            weights = [(node, var) for node, var in self.sig.weights.items() if node in seen]
            keys = [k for k, name in self.sig.inputs.items() if self.tensor(name).op.name in seen]
            self._needs[key] = (weights, keys)
        return self._needs[key]


# -- finding the consuming ops --------------------------------------------------------------------------------


def _consumers(start: tf.Tensor) -> list[tuple[tf.Tensor, tf.Operation]]:
    """``(tensor reaching the op, op)`` for every non-pass-through op the weight reaches (depth first)."""
    found: list[tuple[tf.Tensor, tf.Operation]] = []
    stack = [start]
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        for op in tensor.consumers():
            if op.name in seen:
                continue
            seen.add(op.name)
            if op.type in PASS_THROUGH and op.inputs[0] is tensor:
                stack.append(op.outputs[0])
            elif op.type in ("Shape", "Size", "Rank"):
                continue  # reads the shape only
            else:
                found.append((tensor, op))
    return found


def _static(shape: tf.TensorShape) -> tuple[int, ...] | None:
    if shape.rank is None or any(d is None for d in shape.as_list()):
        return None
    return tuple(int(d) for d in shape.as_list())


def _split_axes(var_shape: tuple[int, ...], lead: int) -> int | None:
    """The ``k`` such that the first ``k`` variable axes hold ``lead`` elements (None when none does)."""
    size = 1
    for k, dim in enumerate(var_shape):
        if size == lead:
            return k
        size *= dim
    return len(var_shape) if size == lead else None


def _unsupported(var: str, op: tf.Operation, order: int, reason: str) -> WeightUse:
    return WeightUse(var, op.name, op.type, "unsupported", None, None, reason=reason, order=order)


def _use(var: str, var_shape: tuple[int, ...], weight: tf.Tensor, op: tf.Operation, order: int) -> WeightUse:
    """The ``WeightUse`` of ``op`` reading the variable (shape ``var_shape``) as ``weight``."""
    if op.type not in _CONSUMERS:
        return _unsupported(var, op, order, f"its op {op.type} ({op.name}) has no calibration rule")
    index = [i for i, t in enumerate(op.inputs) if t is weight]
    at_op = _static(weight.shape)
    if len(index) != 1 or at_op is None:
        return _unsupported(var, op, order, f"{op.type} {op.name} reads it in an unknown way")
    position = index[0]
    if op.type == "Einsum":
        return _einsum_use(var, var_shape, op, position, at_op, order)
    if position != 1:
        return _unsupported(var, op, order, f"{op.type} {op.name} takes it as its first operand")
    data = op.inputs[0]
    common: dict[str, Any] = {"data_input": data.name, "output": op.outputs[0].name, "order": order}
    if op.type in _MATMUL:
        if len(at_op) != 2:
            return _unsupported(var, op, order, f"{op.type} {op.name} multiplies it as a batch of matrices")
        transpose_x = _attr(op, "transpose_a") or _attr(op, "adj_x")
        transpose_w = _attr(op, "transpose_b") or _attr(op, "adj_y")
        if transpose_x and op.type != "MatMul":
            return _unsupported(var, op, order, f"{op.type} {op.name} transposes its data operand")
        lead = at_op[0]
        k = _split_axes(var_shape, lead)
        if k is None:
            return _unsupported(var, op, order, f"its shape at {op.name} does not split into inputs/outputs")
        first, rest = tuple(range(k)), tuple(range(k, len(var_shape)))
        in_axes, out_axes = (rest, first) if transpose_w else (first, rest)
        return WeightUse(
            var, op.name, op.type, "matmul", in_axes=in_axes, out_axes=out_axes,
            attrs={"transpose_a": bool(transpose_x)}, **common,
        )  # fmt: skip
    # Conv2D / DepthwiseConv2dNative: filter [kh, kw, cin, cout | mult]
    if len(at_op) != 4:
        return _unsupported(var, op, order, f"{op.type} {op.name} has a filter of rank {len(at_op)}")
    fmt = _attr(op, "data_format") or b"NHWC"
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    padding = _attr(op, "padding")
    padding = padding.decode() if isinstance(padding, bytes) else str(padding)
    attrs = {
        "ksize": at_op[:2],
        "strides": list(_attr(op, "strides") or [1, 1, 1, 1]),
        "dilations": list(_attr(op, "dilations") or [1, 1, 1, 1]),
        "padding": padding,
        "explicit_paddings": list(_attr(op, "explicit_paddings") or []),
        "data_format": fmt,
    }
    k = _split_axes(var_shape, at_op[0] * at_op[1] * at_op[2])
    if k is None:
        return _unsupported(var, op, order, f"its shape at {op.name} does not split into patch/output axes")
    kind: UseKind = "conv2d" if op.type == "Conv2D" else "depthwise"
    return WeightUse(
        var, op.name, op.type, kind, in_axes=tuple(range(k)), out_axes=tuple(range(k, len(var_shape))),
        attrs=attrs, **common,
    )  # fmt: skip


def _attr(op: tf.Operation, name: str) -> Any:
    try:
        return op.get_attr(name)
    except ValueError:
        return None


def _einsum_use(
    var: str, var_shape: tuple[int, ...], op: tf.Operation, position: int, at_op: tuple[int, ...], order: int
) -> WeightUse:
    """An Einsum reading the weight as ``operands[position]``: a matmul when every weight label is either
    contracted with the data (an input feature) or copied to the output (an output unit), and every data label
    that is not contracted reaches the output (a row)."""
    equation = _attr(op, "equation")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    if len(op.inputs) != 2 or "->" not in equation or at_op != var_shape:
        return _unsupported(var, op, order, f"einsum {equation!r} ({op.name}) is not a two-operand matmul")
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    w_labels, d_labels = terms[position], terms[1 - position]
    data = op.inputs[1 - position]
    if "." in w_labels or len(set(w_labels)) != len(w_labels):
        return _unsupported(
            var, op, order, f"einsum {equation!r}: the weight has an ellipsis or repeats a label"
        )
    rank = data.shape.rank
    if rank is None:
        return _unsupported(var, op, order, f"einsum {equation!r}: the data's rank is unknown")
    if "..." in d_labels:  # ellipsis dims: batch-like labels that reach the output
        extra = rank - (len(d_labels) - 3)
        d_labels = d_labels.replace("...", "".join(chr(0x100 + i) for i in range(extra)))
        out = out.replace("...", "".join(chr(0x100 + i) for i in range(extra)))
    if len(d_labels) != rank or len(set(d_labels)) != len(d_labels):
        return _unsupported(var, op, order, f"einsum {equation!r}: the data's labels do not match its rank")
    contracted = [c for c in w_labels if c in d_labels and c not in out]
    free = [c for c in w_labels if c in out and c not in d_labels]
    if len(contracted) + len(free) != len(w_labels) or not contracted:
        return _unsupported(
            var, op, order, f"einsum {equation!r}: a weight label is shared with the output or summed alone"
        )
    rows = [c for c in d_labels if c not in contracted]
    if any(c not in out for c in rows):
        return _unsupported(var, op, order, f"einsum {equation!r}: a data label is summed away")
    perm = [d_labels.index(c) for c in rows] + [d_labels.index(c) for c in contracted]
    return WeightUse(
        var, op.name, op.type, "einsum", data.name, op.outputs[0].name,
        in_axes=tuple(w_labels.index(c) for c in contracted),
        out_axes=tuple(w_labels.index(c) for c in free),
        attrs={"equation": equation, "perm": perm}, order=order,
    )  # fmt: skip


# -- the X matrix in the graph --------------------------------------------------------------------------------


def _x_matrix(data: tf.Tensor, use: WeightUse) -> tf.Tensor:
    """Rows x ``d_in`` float32 tensor of what the op multiplies its weight matrix with."""
    x = tf.cast(data, tf.float32)
    if use.kind == "matmul":
        if use.attrs.get("transpose_a"):
            x = tf.transpose(x)
        return tf.reshape(x, [-1, tf.shape(x)[-1]])
    if use.kind == "einsum":
        x = tf.transpose(x, use.attrs["perm"])
        return tf.reshape(x, [-1, math.prod(int(d) for d in _static_tail(x, len(use.in_axes)))])
    return _patches(x, use)


def _static_tail(x: tf.Tensor, n: int) -> list[int]:
    dims = x.shape.as_list()[-n:]
    if any(d is None for d in dims):
        raise ValueError(f"contracted dimensions of {x.name} are not static: {x.shape}")
    return [int(d) for d in dims]


def _conv_geometry(x: tf.Tensor, use: WeightUse) -> tuple[tf.Tensor, list[int], list[int], Any, Any]:
    """The input of a Conv2D / depthwise op as NHWC float32 with the op's padding applied (TF's ``SAME`` rule,
    or its explicit paddings), the ``(h, w)`` strides and dilations, and the output's height and width (ints
    when the input's are static, else scalar tensors)."""
    a = use.attrs
    strides, dilations = list(a["strides"]), list(a["dilations"])
    pads = list(a["explicit_paddings"])
    if a["data_format"] == "NCHW":
        x = tf.transpose(x, [0, 2, 3, 1])
        strides = [strides[0], strides[2], strides[3], strides[1]]
        dilations = [dilations[0], dilations[2], dilations[3], dilations[1]]
        if pads:
            pads = pads[0:2] + pads[4:8] + pads[2:4]
    kh, kw = a["ksize"]
    s, d = strides[1:3], dilations[1:3]
    # Static heights and widths (a CNN's usual case) keep the padding and output sizes Python ints: a dozen
    # fewer graph ops per convolution (building the capture ops was ~100 ms per conv of ResNet-50), and no pad
    # (a copy of the input per batch) where there is none, as for a 1x1 conv.
    static = x.shape[1] is not None and x.shape[2] is not None
    size: list[Any] = [int(x.shape[1]), int(x.shape[2])] if static else [tf.shape(x)[1], tf.shape(x)[2]]
    if a["padding"] == "EXPLICIT":
        x = tf.pad(x, np.reshape(pads, (4, 2)).tolist())
    elif a["padding"] == "SAME":
        amounts: list[list[Any]] = []
        for i, k in enumerate((kh, kw)):
            out = (size[i] + s[i] - 1) // s[i]
            total = (out - 1) * s[i] + (k - 1) * d[i] + 1 - size[i]
            total = max(total, 0) if static else tf.maximum(total, 0)
            amounts.append([total // 2, total - total // 2])
        if not static or any(amounts[0] + amounts[1]):
            x = tf.pad(x, [[0, 0], amounts[0], amounts[1], [0, 0]])
    padded: list[Any] = [int(x.shape[1]), int(x.shape[2])] if static else [tf.shape(x)[1], tf.shape(x)[2]]
    out_hw = [(padded[i] - (k - 1) * d[i] - 1) // s[i] + 1 for i, k in enumerate((kh, kw))]
    return x, s, d, out_hw[0], out_hw[1]


def _conv_rows(data: tf.Tensor, use: WeightUse) -> tf.Tensor:
    """Rows of a Conv2D / depthwise op's patch matrix for one batch: samples x output positions."""
    _, _, _, oh, ow = _conv_geometry(data, use)
    return tf.shape(data)[0] * oh * ow


def _patches(x: tf.Tensor, use: WeightUse) -> tf.Tensor:
    """im2col of a Conv2D / depthwise input: ``(N * out_h * out_w, kh * kw * cin)``, features in ``(kh, kw,
    cin)`` order, with the op's strides, dilations and padding."""
    x, s, d, _, _ = _conv_geometry(x, use)
    kh, kw = use.attrs["ksize"]
    patches = tf.image.extract_patches(
        x, sizes=[1, kh, kw, 1], strides=[1, s[0], s[1], 1], rates=[1, d[0], d[1], 1], padding="VALID"
    )
    return tf.reshape(patches, [-1, tf.shape(patches)[-1]])


def _sampled_gram(data: tf.Tensor, use: WeightUse, max_rows: int) -> tf.Tensor:
    """``X^T X`` of a Conv2D's patches from at most ``max_rows`` output positions (see ``CaptureSession.gram``):
    ``kh * kw`` gathers of ``max_rows x cin`` from the padded input, then one float32 matmul."""
    x, s, d, oh, ow = _conv_geometry(tf.cast(data, tf.float32), use)
    kh, kw = use.attrs["ksize"]
    total = tf.shape(x)[0] * oh * ow
    take = tf.minimum(total, max_rows)
    draw = tf.random.stateless_uniform(tf.reshape(total, [1]), seed=[20231, max_rows])
    picks = tf.sort(tf.argsort(draw)[:take])
    b, rest = picks // (oh * ow), picks % (oh * ow)
    i, j = rest // ow, rest % ow
    cols = [
        tf.gather_nd(x, tf.stack([b, i * s[0] + a * d[0], j * s[1] + c * d[1]], axis=-1))
        for a in range(kh)
        for c in range(kw)
    ]
    patches = tf.concat(cols, axis=-1)  # (take, kh * kw * cin): the (kh, kw, cin) order of the kernel
    scale = tf.cast(total, tf.float32) / tf.cast(take, tf.float32)
    return tf.matmul(patches, patches, transpose_a=True) * scale


def _window_sq_norms(data: tf.Tensor, use: WeightUse) -> tuple[tf.Tensor, tf.Tensor]:
    """Column sums of the squared patch matrix, ``(kh * kw * cin,)`` in patch order, and its row count,
    without building the patches: the sum for offset ``(i, j)`` is the sum of the squared padded input over the
    strided window of the output grid shifted by ``(i * dh, j * dw)``."""
    x, s, d, oh, ow = _conv_geometry(tf.cast(data, tf.float32), use)
    kh, kw = use.attrs["ksize"]
    square = tf.square(x)
    sums = []
    for i in range(kh):
        for j in range(kw):
            top, left = i * d[0], j * d[1]
            window = square[
                :, top : top + (oh - 1) * s[0] + 1 : s[0], left : left + (ow - 1) * s[1] + 1 : s[1], :
            ]
            sums.append(tf.reduce_sum(window, axis=[0, 1, 2]))
    rows = tf.shape(x)[0] * oh * ow
    return tf.reshape(tf.stack(sums), [-1]), rows


# -- graph order ------------------------------------------------------------------------------------------------


def _ancestors(graph: tf.Graph, tensor_name: str) -> set[str]:
    """Names of every op ``tensor_name`` depends on (data and control inputs)."""
    return walk_up([graph.get_tensor_by_name(tensor_name)])
