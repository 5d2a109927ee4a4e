"""Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models"): score each
weight by ``|W_ij| * ||X_j||_2``, its magnitude times the norm of the input feature it multiplies over the
calibration samples, and compare weights within each output unit.

Why: a small weight on a feature that is always large matters more than a large weight on a feature that is
almost always zero; magnitude alone cannot see the difference, and the activations say it from a few hundred
unlabelled samples, with no weight update and no gradient.

``X`` is what the weight's op really receives (``capture.CaptureSession.x_matrix``): Dense/MatMul rows, the
im2col patches of a convolution (one feature per ``(kh, kw, cin)``), the contracted axes of an einsum, the
per-channel patches of a depthwise kernel. ``InputNorms`` holds the per-feature norms shaped to broadcast
against the variable, and ``row_axes``: the axes one output unit's weights span (its "row" in the paper):
the input axes for matmul-like ops, the spatial axes for a depthwise kernel (output ``(c, m)`` reads only
channel ``c``).

Per-output comparison (the paper's, which its ablation found better than per-layer): ``per_output_ranks``
turns the scores into quantiles within each output row, so one per-variable threshold removes the same
fraction from every row. The pruner applies it in layer scope (``Criterion.layer_scores``); in global scope
the raw scores are pooled (after the spec's normalization), since the quantiles of every variable are alike.
N:M groups already run along the input axis of one output unit, so they compare within a row either way.

NumPy only: the capture (TensorFlow) lives in ``capture.py``; ``collect_input_norms`` drives it through the
session object it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["InputNorms", "collect_input_norms", "input_norms", "per_output_ranks", "wanda_scores"]


@dataclass(frozen=True)
class InputNorms:
    """``||X_j||_2`` per input feature of one variable over the calibration samples.

    ``norms``: shaped like the variable with size 1 on its output axes (broadcasts against it). ``row_axes``:
    the axes one output unit's weights span. ``rows``: how many rows of ``X`` were summed (samples x
    positions). ``ops``: how many ops read the variable (their squared norms are summed)."""

    norms: np.ndarray
    row_axes: tuple[int, ...]
    rows: int
    ops: int = 1


def wanda_scores(weight: np.ndarray, stats: InputNorms) -> np.ndarray:
    """``|W| * ||X||`` (float32, the variable's shape)."""
    return (np.abs(np.asarray(weight, dtype=np.float32)) * stats.norms.astype(np.float32)).astype(np.float32)


def per_output_ranks(score: np.ndarray, row_axes: tuple[int, ...]) -> np.ndarray:
    """Scores replaced by their quantile ``(rank + 1) / row size`` within each output row (the entries sharing
    every axis outside ``row_axes``); ``-inf`` (already pruned, NaN) stays ``-inf`` so it is removed first.

    A single threshold over these removes ``round(t * row size)`` entries from every row (up to ties at the
    boundary), which is Wanda's per-output comparison expressed as scores the pruner's granularity ranks."""
    score = np.asarray(score)
    rank = len(score.shape)
    rows = tuple(a % rank for a in row_axes) if rank else ()
    outer = tuple(a for a in range(rank) if a not in rows)
    moved = np.transpose(score, outer + rows)
    flat = moved.reshape(int(np.prod([score.shape[a] for a in outer], dtype=np.int64)), -1)
    order = np.argsort(flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None, :], axis=1)
    quantile = (ranks + 1).astype(np.float32) / max(1, flat.shape[1])
    quantile[np.isneginf(flat)] = -np.inf
    back = quantile.reshape(moved.shape)
    return np.transpose(back, np.argsort(outer + rows))


def input_norms(sq_sum: np.ndarray, rows: int, shape: tuple[int, ...], use: Any, ops: int = 1) -> InputNorms:
    """``InputNorms`` of a variable of ``shape`` from the per-feature sums of squares ``sq_sum`` (``d_in``, in
    the op's feature order) of ``use`` (a ``capture.WeightUse``: ``in_axes``, ``kind``)."""
    norms = np.sqrt(np.maximum(np.asarray(sq_sum, dtype=np.float64), 0.0)).astype(np.float32)
    in_axes = tuple(use.in_axes)
    # Features come in the order of in_axes; put them on those axes of the variable.
    feature = norms.reshape([shape[a] for a in in_axes])
    expanded = np.transpose(
        feature.reshape(feature.shape + (1,) * (len(shape) - len(in_axes))),
        np.argsort(in_axes + tuple(a for a in range(len(shape)) if a not in in_axes)),
    )
    row_axes = in_axes[:-1] if use.kind == "depthwise" else in_axes  # (kh, kw): one channel's window
    return InputNorms(np.ascontiguousarray(expanded), row_axes, int(rows), ops)


def collect_input_norms(
    session: Any,
    uses: Mapping[str, list[Any]],
    shapes: Mapping[str, tuple[int, ...]],
    values: Mapping[str, np.ndarray],
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, InputNorms]:
    """One pass over the calibration ``batches`` through ``session`` (a ``capture.CaptureSession``) with the
    weights ``values``: per variable of ``uses`` (name -> its supported ``WeightUse`` list), the summed squared
    norms of every op reading it (ops reading it with a different feature layout are left out by the caller).
    """
    fetch: list[Any] = []
    slots: list[tuple[str, int]] = []
    for name, var_uses in uses.items():
        for use in var_uses:
            fetch += [session.sq_norms(use), session.rows(use)]
            slots.append((name, len(fetch) - 2))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for index, batch in enumerate(batches()):
        out = session.run(values, batch, fetch)
        for name, at in slots:
            sq = out[at].astype(np.float64)
            sums[name] = sq if name not in sums else sums[name] + sq
            counts[name] = counts.get(name, 0) + int(out[at + 1])
        if on_batch is not None:
            on_batch(index)
    return {
        name: input_norms(sums[name], counts[name], tuple(shapes[name]), uses[name][0], len(uses[name]))
        for name in sums
    }
