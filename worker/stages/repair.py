"""Channel repair (spec ``reconstruct``): after the one-shot channel prune, before fine-tuning.

Removing channels breaks the ops that read them. On the job's calibration inputs this stage walks the
signature's frozen graph in topological order and, one op at a time (sequentially, so each op sees the
repairs made before it):

- **consumers** -- every Conv2D (Conv1D lowers to it), MatMul, BatchMatMul or Einsum whose kernel lost input
  rows to the pruner's masks (found by ``worker.pruning.calibration.capture.find_uses``): the kept weights
  are refit by ridge least squares so that the op's output on the pruned model's inputs reproduces the
  *dense* model's op output (``worker.pruning.calibration.repair.solve``; He et al. 2017, ThiNet). When the
  op's output goes straight into an add of a bias variable (a layer's bias), the bias is refit with it (an
  intercept). Removed rows stay exactly zero, and the pruner's masks are applied again at the end;
- **BatchNorm statistics** -- every inference-mode BatchNorm downstream of such a consumer
  (``FusedBatchNorm*``, or Keras 3's lowered ``x * gamma * rsqrt(var + eps) + (beta - mean * ...)``) gets its
  moving mean and variance recomputed from the pruned model's pre-BN activations (NNCF's batch-norm
  adaptation), or, for channels whose old statistics do not describe the dense activations on the calibration
  data, matched to the dense model (``repair.batchnorm_statistics``). Channels whose activation is constant on
  the calibration data (removed ones) keep theirs. A BatchNorm folded into constants has no statistics
  variable to update: a note says it was left alone.

Ops of another kind (depthwise, transposed or 3-D convs, NCHW convs, a kernel read by more than one op, an
op whose output this stage cannot reproduce from its input within ``CHECK_RTOL``) are left as pruned and
named in ``notes``. The reconstruction error ``||Y - Y_dense||^2 / ||Y_dense||^2`` on the calibration rows,
before and after each refit, goes to ``notes`` and to the metrics' ``reconstruction`` section
(``Job.reconstruction``).

Tensors come from the skeleton of the signature (``Job.frozen_signature``) in one ``CaptureSession``; the
weight placeholders are fed the dense values (``dense_snapshot``, taken before pruning) or the current ones.
Memory: the op's raw input and output of one batch, plus at most ``ROWS_PER_BATCH`` sampled rows of X (a
conv's im2col patches are built for the sampled output positions only) and the normal equations of one op,
``(d_in + 1)^2 + d_in * d_out`` float64.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from worker.pruning.calibration.capture import CaptureSession, WeightUse, find_uses
from worker.pruning.calibration.repair import (
    ConvGeometry,
    MomentAccumulator,
    NormalEquations,
    batchnorm_statistics,
    im2col,
    output_rows,
    sample_positions,
    solve,
)
from worker.pruning.interface import PrunerLike
from worker.stages.job import Job
from worker.structure.frozen import FrozenSignature
from worker.structure.graph_walk import _topological

__all__ = ["dense_snapshot", "repair_channels"]

ROWS_PER_BATCH = 2048  # output positions (rows of X) sampled per calibration batch and op
CHECK_RTOL = 1e-3  # max |X W - Y| / max |Y| on the first batch: the op is the product this stage models
FUSED_BN = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
_READS = {"Identity", "ReadVariableOp", "Snapshot", "Cast", "Reshape", "Squeeze", "ExpandDims"}
_ADDS = {"BiasAdd", "Add", "AddV2"}


def dense_snapshot(job: Job) -> dict[str, np.ndarray]:
    """Every variable's value now (before pruning): the model whose op outputs the repair reproduces."""
    return {nv.name: nv.var.numpy() for nv in job.handle.variables()}


@dataclass
class _Context:
    """What every step reads: the session, the calibration batches, the dense and live weights."""

    job: Job
    session: CaptureSession
    dense: Mapping[str, np.ndarray]
    variables: Mapping[str, tf.Variable]
    batches: Callable[[], Iterable[dict[str, np.ndarray]]]  # the calibration inputs, one pass per call
    lines: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ops: list[dict[str, Any]] = field(default_factory=list)  # the metrics' reconstruction.ops
    batchnorms: list[dict[str, Any]] = field(default_factory=list)
    refit: int = 0
    norms: int = 0

    def current(self) -> dict[str, np.ndarray]:
        return {name: var.numpy() for name, var in self.variables.items()}


@dataclass
class _Refit:
    """One consumer op whose kernel lost input rows."""

    use: WeightUse
    order: int
    kept_in: np.ndarray  # rows of the op's matrix view
    kept_out: np.ndarray
    geometry: ConvGeometry | None
    bias: str | None

    def apply(self, ctx: _Context, index: int) -> None:
        use = self.use
        rng = np.random.default_rng(ctx.job.spec.seed + index)
        now = ctx.current()
        var = ctx.variables[use.variable]
        shape = tuple(int(d) for d in var.shape)
        current = use.matrix(now[use.variable]).astype(np.float64)
        d_in, d_out = current.shape
        eq = NormalEquations(d_in, d_out)
        where = f"{use.variable} ({use.op_type} at {use.op})"
        assert use.data_input is not None and use.output is not None
        for number, part in enumerate(ctx.batches()):
            (target,) = ctx.session.run(ctx.dense, part, [use.output])
            x, y = ctx.session.run(now, part, [use.data_input, use.output])
            positions = sample_positions(rng, int(np.prod(y.shape[:-1])), ROWS_PER_BATCH)
            rows = self._rows(x, positions)
            if number == 0:  # the op must be the product this stage models, else it is left alone
                want = output_rows(y, positions)
                worst = float(np.abs(rows @ current - want).max()) if want.size else 0.0
                scale = float(np.abs(want).max()) if want.size else 0.0
                if worst > CHECK_RTOL * scale + 1e-6:
                    ctx.skipped.append(
                        f"{where}: X W does not reproduce the op's output (off by {worst:.3g})"
                    )
                    return
            eq.add(rows, output_rows(target, positions))
        fit = solve(eq, current, self.kept_in, self.kept_out, intercept=self.bias is not None)
        var.assign(use.unmatrix(fit.weights, shape).astype(var.dtype.as_numpy_dtype))
        if self.bias is not None:
            bias = ctx.variables[self.bias]
            bias.assign((now[self.bias] + fit.shift).astype(bias.dtype.as_numpy_dtype))
        ctx.refit += 1
        ctx.ops.append(
            {
                "variable": use.variable,
                "op": use.op,
                "type": use.op_type,
                "inputs": d_in,
                "inputs_kept": int(self.kept_in.sum()),
                "bias": self.bias,
                "rows": eq.count,
                "error_before": fit.error_before,
                "error_after": fit.error_after,
            }
        )
        ctx.lines.append(
            f"refit {where}, {int(self.kept_in.sum())}/{d_in} input rows kept"
            f"{', with its bias ' + self.bias if self.bias else ''}, on {eq.count} rows: output error "
            f"relative to the dense model {fit.error_before:.4g} -> {fit.error_after:.4g}"
        )

    def _rows(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The sampled rows of X: im2col patches of a conv, else the op's data rows."""
        if self.geometry is not None:
            return im2col(x, self.geometry, positions)
        if self.use.kind == "einsum":
            x = np.transpose(x, self.use.attrs["perm"])
        return output_rows(np.reshape(x, (-1, len(self.kept_in))), positions)


@dataclass
class _Norm:
    """One inference-mode BatchNorm whose input depends on a repaired (or pruned) consumer."""

    op: str  # where the statistics are used: the FusedBatchNorm op or the lowered ``x * scale``
    op_type: str
    order: int
    x: str
    mean: str
    variance: str
    epsilon: float

    def apply(self, ctx: _Context, index: int) -> None:
        now = ctx.current()
        mean_var, variance_var = ctx.variables[self.mean], ctx.variables[self.variance]
        channels = int(mean_var.shape[0])
        dense, pruned = MomentAccumulator(channels), MomentAccumulator(channels)
        for part in ctx.batches():
            (x,) = ctx.session.run(ctx.dense, part, [self.x])
            dense.add(x)
            (x,) = ctx.session.run(now, part, [self.x])
            pruned.add(x)
        mean, variance, estimated, matched = batchnorm_statistics(
            now[self.mean], now[self.variance], self.epsilon, dense, pruned
        )
        mean_var.assign(mean.astype(mean_var.dtype.as_numpy_dtype))
        variance_var.assign(variance.astype(variance_var.dtype.as_numpy_dtype))
        ctx.norms += 1
        ctx.batchnorms.append(
            {
                "mean": self.mean,
                "variance": self.variance,
                "op": self.op,
                "type": self.op_type,
                "rows": pruned.count,
                "channels": channels,
                "re_estimated": int(estimated.sum()),
                "matched": int(matched.sum()),
            }
        )
        changed = estimated | matched
        moved = float(np.abs(mean - now[self.mean])[changed].mean()) if changed.any() else 0.0
        ratio = (
            float(np.mean(variance[changed] / np.maximum(now[self.variance][changed], 1e-12)))
            if changed.any()
            else 1.0
        )
        how = f"{int(estimated.sum())}/{channels} channels re-estimated from the pruned activations"
        if matched.any():
            how += (
                f", {int(matched.sum())} matched to the dense model's normalised activations (their statistics "
                "did not describe the calibration data)"
            )
        ctx.lines.append(
            f"BatchNorm statistics {self.mean} / {self.variance} ({self.op_type} at {self.op}) on "
            f"{pruned.count} rows: {how}; mean moved by {moved:.3g} on average, variance x{ratio:.3g}"
        )


def repair_channels(job: Job, pruner: PrunerLike, dense: Mapping[str, np.ndarray]) -> None:
    """Refit the consumers of removed channels and re-estimate the BatchNorm statistics after them (module
    docstring); ``dense``: ``dense_snapshot`` taken before pruning. Time: ``timings_s.reconstruct``."""
    tick = time.perf_counter()
    try:
        _repair(job, pruner, dense)
    finally:
        job.timings["reconstruct"] = job.timings.get("reconstruct", 0.0) + time.perf_counter() - tick


def _repair(job: Job, pruner: PrunerLike, dense: Mapping[str, np.ndarray]) -> None:
    if pruner.analysis is None:
        job.note(
            "reconstruct: skipped, the channel groups of the signature's graph are unavailable (channels were "
            "pruned per variable, no consumer lost input rows)"
        )
        return
    batches = job.calibration_batches()
    sizes = [len(next(iter(part.values()))) for part in batches()]
    samples, batch = sum(sizes), max(sizes, default=0)
    if samples == 0:
        job.note("reconstruct: skipped, no calibration inputs")
        return
    sig = job.frozen_signature()
    variables = {nv.name: nv.var for nv in job.handle.variables()}
    masks = {**pruner.bias_masks, **pruner.masks}
    skipped: list[str] = []
    refits, broken = _refit_steps(sig, masks, variables, skipped)
    norms, folded = _norm_steps(sig, variables, _downstream(sig, broken))
    steps: list[_Refit | _Norm] = sorted([*refits, *norms], key=lambda s: s.order)
    ctx = _Context(job, CaptureSession(sig), dense, variables, batches, skipped=skipped)
    try:
        for index, step in enumerate(steps):
            step.apply(ctx, index)
    finally:
        ctx.session.close()
        pruner.apply_masks()  # removed rows, columns and carriers exactly zero again
    job.note(
        f"reconstruct: on {samples} calibration samples (batches of {batch}, at most {ROWS_PER_BATCH} rows "
        f"per batch and op), {ctx.refit} consumer op(s) refit by least squares to the dense model's outputs, "
        f"{ctx.norms} BatchNorm statistics re-estimated"
    )
    job.reconstruction = {
        "samples": samples,
        "batch_size": batch,
        "rows_per_batch": ROWS_PER_BATCH,
        "ops": ctx.ops,
        "batchnorms": ctx.batchnorms,
        "left_as_pruned": list(ctx.skipped),
    }
    for line in ctx.lines:
        job.note(f"reconstruct: {line}")
    for line in ctx.skipped:
        job.note(f"reconstruct: left as pruned: {line}")
    if folded:
        job.note(
            f"reconstruct: BatchNorm op(s) {folded[:5]} read no statistics variables (folded into constants): "
            "their statistics were left as they are"
        )


# -- finding the steps --------------------------------------------------------------------------------------


def _refit_steps(
    sig: FrozenSignature,
    masks: Mapping[str, np.ndarray],
    variables: Mapping[str, tf.Variable],
    skipped: list[str],
) -> tuple[list[_Refit], list[str]]:
    """The refittable consumers of removed channels, and the ops of every consumer that lost input rows."""
    uses = find_uses(sig, [name for name in masks if name in variables])
    count: dict[str, int] = {}
    for use in uses:
        count[use.variable] = count.get(use.variable, 0) + 1
    steps: list[_Refit] = []
    broken: list[str] = []
    for use in uses:
        mask = np.asarray(masks[use.variable], bool)
        where = f"{use.variable} ({use.op_type} at {use.op})"
        if not use.supported:
            if mask.ndim >= 2 and not mask.all():  # a kernel (biases and BatchNorm vectors are no consumers)
                skipped.append(f"{where}: {use.reason}")
            continue
        matrix = use.matrix(mask)
        kept_in, kept_out = matrix.any(axis=1), matrix.any(axis=0)
        if kept_in.all():
            continue  # no input row removed: the op reads what it read before
        broken.append(use.op)
        if count[use.variable] > 1:
            skipped.append(
                f"{where}: the kernel is read by {count[use.variable]} ops; one fit cannot serve all"
            )
            continue
        geometry, problem = _geometry(use)
        if problem is not None:
            skipped.append(f"{where}: {problem}")
            continue
        if use.kind == "matmul" and use.attrs.get("transpose_a"):
            skipped.append(f"{where}: the op transposes its data operand")
            continue
        d_out = matrix.shape[1]
        steps.append(
            _Refit(use, use.order, kept_in, kept_out, geometry, _bias_of(sig, use, d_out, variables))
        )
    return steps, broken


def _geometry(use: WeightUse) -> tuple[ConvGeometry | None, str | None]:
    """A Conv2D's window for ``im2col``; None for matrix ops; a problem for what is not refit."""
    if use.kind in ("matmul", "einsum"):
        return None, None
    if use.kind != "conv2d":
        return None, f"{use.op_type} ops are not refit (Conv2D, MatMul, BatchMatMul and Einsum are)"
    a = use.attrs
    if a["data_format"] != "NHWC":
        return None, f"a {a['data_format']} convolution"
    strides, dilations = a["strides"], a["dilations"]
    pads: Any = a["padding"]
    if pads == "EXPLICIT":
        flat = list(a["explicit_paddings"])
        pads = ((flat[2], flat[3]), (flat[4], flat[5]))
    elif pads not in ("SAME", "VALID"):
        return None, f"padding {pads!r}"
    kh, kw = a["ksize"]
    return ConvGeometry(
        (int(kh), int(kw)), (strides[1], strides[2]), (dilations[1], dilations[2]), pads
    ), None


def _weight(sig: FrozenSignature, t: tf.Tensor) -> str | None:
    """The variable a const-derived tensor reads through pass-through ops (reads, casts, reshapes)."""
    op = t.op
    while op.type in _READS and op.inputs:
        op = op.inputs[0].op
    return sig.weights.get(op.name) if op.type == "Placeholder" else None


def _bias_of(
    sig: FrozenSignature, use: WeightUse, d_out: int, variables: Mapping[str, tf.Variable]
) -> str | None:
    """The layer's bias variable when the op's output goes only into an add of it (then refit with it)."""
    op = sig.op(use.op)
    users = op.outputs[0].consumers()
    if len(users) != 1 or users[0].type not in _ADDS or len(users[0].inputs) != 2:
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is op.outputs[0] else add.inputs[0]
    name = _weight(sig, other)
    if name is None or tuple(int(d) for d in variables[name].shape) != (d_out,):
        return None
    if other.shape.rank is None or [d for d in other.shape.as_list() if d != 1] != [d_out]:
        return None
    return name


def _downstream(sig: FrozenSignature, ops: list[str]) -> set[str]:
    """Names of the ops reachable from ``ops`` (their outputs' consumers, transitively), ``ops`` included."""
    seen: set[str] = set()
    stack = [sig.op(name) for name in ops]
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        for out in op.outputs:
            stack.extend(out.consumers())
    return seen


def _norm_steps(
    sig: FrozenSignature, variables: Mapping[str, tf.Variable], downstream: set[str]
) -> tuple[list[_Norm], list[str]]:
    """Inference-mode BatchNorms whose input depends on a pruned consumer, and those without variables."""
    order = {op.name: i for i, op in enumerate(_topological(sig.graph))}
    steps: list[_Norm] = []
    folded: list[str] = []
    for op in sig.graph.get_operations():
        found: tuple[tf.Operation, tf.Tensor, str, str, float] | None = None
        if op.type in FUSED_BN:
            if op.get_attr("is_training") or op.inputs[0].op.name not in downstream:
                continue
            mean, variance = _weight(sig, op.inputs[3]), _weight(sig, op.inputs[4])
            if mean is None or variance is None:
                folded.append(op.name)
                continue
            found = (op, op.inputs[0], mean, variance, float(op.get_attr("epsilon")))
        elif op.type == "Rsqrt":
            found = _lowered_norm(sig, op)
            if found is None or found[1].op.name not in downstream:
                continue
        if found is None:
            continue
        site, x, mean, variance, epsilon = found
        channels = x.shape[-1] if x.shape.rank else None
        if channels is None or any(tuple(variables[v].shape) != (channels,) for v in (mean, variance)):
            continue
        steps.append(_Norm(site.name, site.type, order[site.name], x.name, mean, variance, epsilon))
    return steps, folded


def _lowered_norm(
    sig: FrozenSignature, rsqrt: tf.Operation
) -> tuple[tf.Operation, tf.Tensor, str, str, float] | None:
    """Keras 3's BatchNorm: ``s = rsqrt(variance + eps) [* gamma]``, ``y = x * s + (beta - mean * s)``:
    ``(the op x * s, x, mean variable, variance variable, eps)``."""
    add = rsqrt.inputs[0].op
    if add.type not in ("Add", "AddV2") or len(add.inputs) != 2:
        return None
    names = [_weight(sig, t) for t in add.inputs]
    if names.count(None) != 1:
        return None
    variance = next(name for name in names if name is not None)
    epsilon = tf.get_static_value(add.inputs[names.index(None)])
    if epsilon is None or np.size(epsilon) != 1:
        return None
    scale = rsqrt.outputs[0]
    users = scale.consumers()
    if len(users) == 1 and users[0].type == "Mul":  # times gamma
        other = [t for t in users[0].inputs if t is not scale]
        if len(other) == 1 and _weight(sig, other[0]) is not None:
            scale = users[0].outputs[0]
    mean: str | None = None
    found: tuple[tf.Operation, tf.Tensor] | None = None
    for user in scale.consumers():
        other = [t for t in user.inputs if t is not scale]
        if user.type != "Mul" or len(other) != 1:
            continue
        name = _weight(sig, other[0])  # the moving mean (maybe reshaped to [1, 1, 1, C]), or the activation
        if name is not None:
            mean = name
        elif (other[0].shape.rank or 0) >= 2:
            found = (user, other[0])
    if mean is None or found is None:
        return None
    return found[0], found[1], mean, variance, float(np.asarray(epsilon).reshape(()))
