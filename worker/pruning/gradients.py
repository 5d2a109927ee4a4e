"""Gradient statistics for the gradient-based criteria (``gradient``, ``taylor``), over train batches.

Why statistics of absolute values per batch rather than one gradient of the whole set: at a trained minimum
the mean gradient is close to zero for almost every weight (the batches' pushes cancel), so ``|mean g|`` ranks
noise. ``mean |g_b|`` keeps how strongly each batch's loss reacts to the weight, and ``mean |w * g_b|`` the
per-batch first-order loss change when the weight is removed (Molchanov et al. 2017; SNIP).

The per-batch gradient is one compiled ``tf.function`` (one trace for the full batches, one more for a
last partial batch); accumulation happens in float64 NumPy. Re-calling it during gradual pruning costs
``max_batches`` forward+backward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf

from worker.pruning.criteria import GradientStats
from worker.pruning.losses import loss_fn

__all__ = ["accumulate_gradients"]

Forward = Callable[[dict[str, tf.Tensor], bool], tf.Tensor]


def accumulate_gradients(
    forward: Forward,
    variables: Mapping[str, tf.Variable],
    x: Mapping[str, np.ndarray],
    y: np.ndarray,
    *,
    loss: str,
    from_logits: bool,
    batch_size: int = 256,
    max_batches: int | None = None,
    training: bool = False,
    seed: int | None = 0,
) -> dict[str, GradientStats]:
    """``GradientStats`` per variable of the mean batch loss ``loss(y_b, forward(x_b, training))``.

    ``connected`` is False for a variable whose gradient is exactly zero on every sample used (no path from
    it to the loss, or none active on these samples): its scores would rank nothing but ties.

    Samples are visited in a permutation drawn from ``seed`` (None: dataset order) -- train sets are often
    sorted by class, and the first few batches must not all be one class. At most ``max_batches`` batches of
    ``batch_size`` are used (None: all samples). Each batch is weighted by its number of samples.
    """
    n = len(y)
    lengths = {name: len(arr) for name, arr in x.items()}
    if any(length != n for length in lengths.values()):
        raise ValueError(f"inputs and labels differ in length: {lengths} vs {n} labels")
    if n == 0 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError("need samples, batch_size >= 1 and max_batches >= 1 (or None)")
    if not variables:
        raise ValueError("no variables to take gradients for")

    names = list(variables)
    tracked = [variables[name] for name in names]
    compute_loss = loss_fn(loss, from_logits)
    unconnected: set[int] = set()  # filled while tracing; the same for every trace

    @tf.function
    def batch_stats(xb: dict[str, tf.Tensor], yb: tf.Tensor) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            tape.watch(tracked)  # restored variables may be flagged non-trainable
            value = compute_loss(yb, forward(xb, training))
        grads = tape.gradient(value, tracked, unconnected_gradients=tf.UnconnectedGradients.NONE)
        abs_grads, abs_taylor = [], []
        for i, (var, grad) in enumerate(zip(tracked, grads, strict=True)):
            if grad is None:
                unconnected.add(i)
                grad = tf.zeros_like(var)
            g = tf.convert_to_tensor(grad)
            abs_grads.append(tf.abs(g))
            abs_taylor.append(tf.abs(tf.cast(var, g.dtype) * g))
        return abs_grads, abs_taylor

    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    if max_batches is not None:
        order = order[: max_batches * batch_size]
    grad_sums = [np.zeros(v.shape, np.float64) for v in tracked]
    taylor_sums = [np.zeros(v.shape, np.float64) for v in tracked]
    batches = 0
    for start in range(0, order.size, batch_size):
        idx = np.sort(order[start : start + batch_size])  # sorted: cheaper gathers, same batch
        abs_grads, abs_taylor = batch_stats(
            {k: tf.constant(v[idx]) for k, v in x.items()}, tf.constant(np.asarray(y)[idx])
        )
        for acc, value in zip(grad_sums, abs_grads, strict=True):
            acc += len(idx) * value.numpy()
        for acc, value in zip(taylor_sums, abs_taylor, strict=True):
            acc += len(idx) * value.numpy()
        batches += 1
    samples = int(order.size)
    # A restored SavedModel function returns zeros, not None, for variables its loss does not reach (e.g.
    # another output's head), so "never a non-zero gradient" is what "not connected" means in practice.
    return {
        name: GradientStats(
            abs_grad=grad_sums[i] / samples,
            abs_taylor=taylor_sums[i] / samples,
            batches=batches,
            samples=samples,
            connected=i not in unconnected and bool(grad_sums[i].any()),
        )
        for i, name in enumerate(names)
    }
