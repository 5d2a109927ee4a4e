"""Per-layer score normalisations applied before a global ranking (the spec's ``normalization``).

Why: a global threshold on raw scores compares layers whose weight scales differ by orders of magnitude, so a
layer of small weights is emptied first even when it matters (e.g. a narrow first conv). Normalising within
each layer makes the scores comparable; the global ranking then decides how much each layer loses.

- ``lamp`` (Lee et al., 2021, "Layer-adaptive sparsity for the magnitude-based pruning"): with a layer's
  scores sorted ascending, ``lamp(u) = s_u**2 / sum_{v: s_v >= s_u} s_v**2``. For the magnitude criterion
  ``s = |w|``, so this is the paper's ``w_u**2 / sum of w_v**2 over the weights at least as large``. Equal scores
  get equal LAMP scores (the sum runs over values, not over sorted positions). Every layer's best entry scores
  exactly 1, so none is emptied by the ranking alone. Applied to group scores (channel L1 sums, block means)
  the same formula ranks groups ("LAMP over group scores").
- ``none``: element scores are compared raw (plain global magnitude, as tfmot's global pruning does). Group
  scores of *structured* granularities are still divided by their layer's mean group score (Torch-Pruning's
  ``mean`` normaliser): channels of different layers hold different numbers of weights (27 in a 3x3x3 conv,
  288 in a 3x3x32), so raw L1 sums say more about fan-in than about importance.

Both are monotone within a layer: they change how layers compare, never the order inside one layer, so in
``scope: layer`` they make no difference. Entries scored ``-inf`` (pruned earlier) stay ``-inf`` and do not
count in any sum or mean; scores must otherwise be non-negative (every registered criterion's are).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["NORMALIZATIONS", "Normalization", "get_normalization", "lamp", "mean_normalize"]

# (scores of one layer's groups, elements per group or None when every group is one element) -> scores
Normalization = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def _live(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 copy (NaN -> -inf) and the mask of entries that are not ``-inf``; refuses negative scores."""
    values = np.asarray(scores, dtype=np.float64)
    values = np.where(np.isnan(values), -np.inf, values)
    live = values != -np.inf
    if (values[live] < 0).any():
        raise ValueError("normalisation needs non-negative scores (higher = more important)")
    return values, live


def lamp(scores: np.ndarray) -> np.ndarray:
    """LAMP scores of one layer (any shape, same shape out); see the module docstring."""
    values, live = _live(scores)
    out = np.full(values.shape, -np.inf)
    squares = values[live] ** 2
    if squares.size == 0:
        return out
    order = np.argsort(squares)  # any order: ties share one denominator below
    ranked = squares[order]
    suffix = np.cumsum(ranked[::-1])[::-1]  # suffix[i] = sum of ranked[i:]
    # Ties share the sum over values >= s: index each run of equal values by its first position (linear,
    # where a searchsorted of the array into itself cost as much as the sort on 25 M weights).
    starts = np.empty(ranked.size, dtype=bool)
    starts[0] = True
    np.not_equal(ranked[1:], ranked[:-1], out=starts[1:])
    first = np.maximum.accumulate(np.where(starts, np.arange(ranked.size), 0))
    denominator = suffix[first]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(denominator > 0, ranked / denominator, 0.0)
    ratio = np.where(np.isnan(ratio), 1.0, ratio)  # inf / inf: an infinite score is its layer's best
    result = np.empty_like(ratio)
    result[order] = ratio
    out[live] = result
    return out


def mean_normalize(scores: np.ndarray) -> np.ndarray:
    """Scores divided by the mean of the layer's live scores (unchanged when that mean is 0)."""
    values, live = _live(scores)
    mean = float(values[live].mean()) if live.any() else 0.0
    return values / mean if mean > 0 and np.isfinite(mean) else values


def _none(scores: np.ndarray, sizes: np.ndarray | None) -> np.ndarray:
    if sizes is None or bool((np.asarray(sizes) == 1).all()):
        return np.asarray(scores)
    return mean_normalize(scores)


def _lamp(scores: np.ndarray, sizes: np.ndarray | None) -> np.ndarray:
    return lamp(scores)


NORMALIZATIONS: dict[str, Normalization] = {"none": _none, "lamp": _lamp}


def get_normalization(name: str) -> Normalization:
    """The normalisation for the spec's ``normalization`` value; unknown names list the known ones."""
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        known = ", ".join(sorted(NORMALIZATIONS))
        raise ValueError(f"unknown normalization {name!r}; known: {known}") from None
