"""Sparsity-inducing penalties added to the fine-tuning loss (criteria ``l1`` and ``l2``).

Why a penalty before pruning: fine-tuning under L1 drives the weights the task does not need towards zero, so
the magnitude ranking afterwards removes weights the network has already learned to do without. For
structured pruning the same argument needs whole groups to shrink together: group lasso (Yuan & Lin 2006;
Wen et al. 2016, "structured sparsity learning") penalises the L2 norm of each group, which is not
differentiable at a zero group and therefore pulls whole groups to exactly zero.

Kinds (``PENALTIES``):
- ``l1``: ``strength * sum |w|``
- ``l2``: ``strength * sum w**2`` (ridge; for granularities without groups: unstructured, N:M)
- ``group_lasso``: ``strength * sum over groups g of ||w_g||_2``, groups from a ``TileLayout`` (channels or
  blocks, exactly the groups the pruner removes). A zero group contributes 0 with a zero gradient (no NaN).

The penalty is a plain sum over weights (not a mean), so ``strength`` is the pull on each weight (L1) or group
(group lasso) whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import tensorflow as tf

from worker.pruning.criteria import Regularizer
from worker.pruning.granularity import TileLayout

__all__ = ["PENALTIES", "PenaltyKind", "group_norms", "penalty", "penalty_fn"]

PenaltyKind = Literal["l1", "l2", "group_lasso"]
PENALTIES: tuple[PenaltyKind, ...] = ("l1", "l2", "group_lasso")


def group_norms(var: tf.Variable | tf.Tensor, layout: TileLayout) -> tf.Tensor:
    """The L2 norm of every group of ``layout`` (grid-shaped), with a zero gradient at all-zero groups."""
    w = tf.reshape(tf.cast(var, tf.float32), layout.view)
    w = tf.pad(w, [list(p) for p in layout.padding()])  # zeros change no norm
    interleaved = [d for g, t in zip(layout.grid, layout.tile, strict=True) for d in (g, t)]
    squares = tf.reduce_sum(tf.square(tf.reshape(w, interleaved)), axis=list(range(1, len(interleaved), 2)))
    positive = squares > 0
    # Double where: sqrt's gradient at 0 is inf, and inf * 0 would still poison the gradient with NaN.
    return tf.where(positive, tf.sqrt(tf.where(positive, squares, tf.ones_like(squares))), 0.0)


def penalty(
    kind: PenaltyKind,
    variables: Sequence[tf.Variable | tf.Tensor],
    strength: float,
    layouts: Sequence[TileLayout | None] | None = None,
) -> tf.Tensor:
    """The ``kind`` penalty over ``variables`` as a float32 scalar (see the module docstring).

    ``group_lasso`` needs one ``TileLayout`` per variable in ``layouts``.
    """
    if kind not in PENALTIES:
        raise ValueError(f"unknown penalty {kind!r}; known: {', '.join(PENALTIES)}")
    if strength < 0:
        raise ValueError(f"penalty strength must be >= 0, got {strength!r}")
    if kind == "group_lasso" and (layouts is None or len(layouts) != len(variables) or None in layouts):
        raise ValueError("group_lasso needs one group layout per variable")
    terms: list[tf.Tensor] = []
    for i, var in enumerate(variables):
        w = tf.cast(var, tf.float32)
        if kind == "l1":
            terms.append(tf.reduce_sum(tf.abs(w)))
        elif kind == "l2":
            terms.append(tf.reduce_sum(tf.square(w)))
        else:
            assert layouts is not None and layouts[i] is not None
            terms.append(tf.reduce_sum(group_norms(w, layouts[i])))
    return tf.constant(strength, tf.float32) * tf.add_n(terms) if terms else tf.constant(0.0)


def penalty_fn(
    regularizer: Regularizer,
    variables: Sequence[tf.Variable],
    layouts: Sequence[TileLayout | None],
    strength: float,
) -> Callable[[], tf.Tensor]:
    """A zero-argument penalty for ``fine_tune(penalty=...)``, read from the variables at every call.

    ``l1`` -> L1 on every variable; ``l2`` -> group lasso on variables with a layout (structured
    granularities), ridge on the others.
    """
    if len(layouts) != len(variables):
        raise ValueError("one layout (or None) per variable")
    if regularizer == "l1":
        return lambda: penalty("l1", variables, strength)
    if regularizer != "l2":
        raise ValueError(f"unknown regularizer {regularizer!r}; known: l1, l2")
    grouped = [(v, lay) for v, lay in zip(variables, layouts, strict=True) if lay is not None]
    plain = [v for v, lay in zip(variables, layouts, strict=True) if lay is None]

    def compute() -> tf.Tensor:
        total = tf.constant(0.0)
        if grouped:
            total += penalty("group_lasso", [v for v, _ in grouped], strength, [lay for _, lay in grouped])
        if plain:
            total += penalty("l2", plain, strength)
        return total

    return compute
