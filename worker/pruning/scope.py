"""Which variables are pruned, at what sparsity, and how scores become keep-masks (layer or global scope).

Counting rule (one place, so the API's "fraction that ends exactly zero" is predictable): a variable of
``size`` entries at target ``t`` loses exactly ``prune_count(t, size) = round(t * size)`` entries (Python's
``round``, i.e. halves go to even), the lowest-scoring ones.

Guard against deleting a whole layer: a target below 1 never prunes every entry of a variable. In layer scope
the count is capped at ``size - 1``; in global scope each pooled variable's best-scoring entry is kept out of
the global ranking (so at most ``total - n_variables`` pooled entries can go). Only an explicit target of 1.0
empties a variable (``round`` could otherwise reach ``size`` on tiny variables: ``round(0.9 * 1) == 1``).

Ties are broken deterministically: among equal scores, the lower flat (C-order) index is pruned first; in
global scope variables are concatenated in sorted name order, so ties also prefer the alphabetically first
variable. NaN scores rank lowest (a NaN weight is the first thing to remove). Already-pruned entries can be
given a score of ``-inf`` by the caller so that masks only ever grow (the pruner does this).
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["global_masks", "layer_masks", "prune_count", "resolve_targets", "select_variables"]


def select_variables(names: list[str], include: list[str], exclude: list[str]) -> list[str]:
    """Names (in the given order) matched by any ``include`` regex (all when empty) and by no ``exclude``."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    return [
        name
        for name in names
        if (not inc or any(p.search(name) for p in inc)) and not any(p.search(name) for p in exc)
    ]


def resolve_targets(names: list[str], target: float, overrides: dict[str, float]) -> dict[str, float]:
    """Per-variable target: the first override regex (dict order) that ``re.search``-es, else ``target``."""
    compiled = [(re.compile(p), value) for p, value in overrides.items()]
    resolved: dict[str, float] = {}
    for name in names:
        resolved[name] = next((value for p, value in compiled if p.search(name)), target)
    return resolved


def prune_count(target: float, size: int) -> int:
    """Entries a target removes: ``round(target * size)``, capped at ``size - 1`` while target < 1."""
    _check_target(target)
    if size <= 0:
        return 0
    if target >= 1.0:
        return size
    return min(round(target * size), size - 1)


def layer_masks(scores: dict[str, np.ndarray], targets: dict[str, float]) -> dict[str, np.ndarray]:
    """One threshold per variable: prune exactly ``prune_count`` lowest-scoring entries of each."""
    missing = [name for name in scores if name not in targets]
    if missing:
        raise ValueError(f"no target for variable(s): {', '.join(missing)}")
    masks: dict[str, np.ndarray] = {}
    for name, score in scores.items():
        flat = _sanitized(score)
        keep = np.ones(flat.size, dtype=bool)
        keep[_lowest(flat, prune_count(targets[name], flat.size))] = False
        masks[name] = keep.reshape(np.shape(score))
    return masks


def global_masks(
    scores: dict[str, np.ndarray], target: float, fixed_targets: dict[str, float] | None = None
) -> dict[str, np.ndarray]:
    """One threshold over all variables not in ``fixed_targets`` (those are pruned per layer at their own).

    Exactly ``round(target * pooled size)`` pooled entries are pruned (capped by the no-empty-layer guard, see
    the module docstring). Scores are compared as they are: criteria whose scales differ across layers need a
    normalisation (e.g. LAMP) applied to the scores before they get here.
    """
    fixed = dict(fixed_targets or {})
    unknown = [name for name in fixed if name not in scores]
    if unknown:
        raise ValueError(f"fixed targets for unknown variable(s): {', '.join(unknown)}")
    masks = layer_masks({n: scores[n] for n in fixed}, fixed)

    _check_target(target)
    pooled = sorted(n for n in scores if n not in fixed)
    flats = {n: _sanitized(scores[n]) for n in pooled}
    total = sum(f.size for f in flats.values())
    # Below 1.0, each non-empty pooled variable keeps its best entry out of the ranking: none is emptied.
    # "Best" = the last of its maxima, i.e. the entry the tie rule would prune last.
    protected = {
        n: f.size - 1 - int(np.argmax(f[::-1])) for n, f in flats.items() if f.size > 0 and target < 1.0
    }
    segments = [np.delete(flats[n], protected[n]) if n in protected else flats[n] for n in pooled]
    pool = np.concatenate(segments) if segments else np.empty(0)
    k = min(round(target * total), pool.size)
    pruned = np.sort(_lowest(pool, k))

    offset = 0
    for name, segment in zip(pooled, segments, strict=True):
        lo, hi = np.searchsorted(pruned, [offset, offset + segment.size])
        local = pruned[lo:hi] - offset
        if name in protected:  # map back from "protected entry deleted" coordinates
            local = local + (local >= protected[name])
        keep = np.ones(flats[name].size, dtype=bool)
        keep[local] = False
        masks[name] = keep.reshape(np.shape(scores[name]))
        offset += segment.size
    return {name: masks[name] for name in scores}


def _check_target(target: float) -> float:
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"sparsity target must be within [0, 1], got {target!r}")
    return target


def _sanitized(score: np.ndarray) -> np.ndarray:
    """Flattened float copy with NaN -> -inf, so NaN entries sort first and comparisons stay total."""
    flat = np.asarray(score).reshape(-1)
    if not np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
    return np.where(np.isnan(flat), -np.inf, flat)


def _lowest(flat: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` lowest values; equal values prefer the lower index (same as a stable argsort).

    Uses a partition (O(n)) instead of sorting everything: models can have hundreds of millions of weights.
    """
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    if k >= flat.size:
        return np.arange(flat.size, dtype=np.intp)
    threshold = np.partition(flat, k - 1)[k - 1]
    below = np.flatnonzero(flat < threshold)
    ties = np.flatnonzero(flat == threshold)[: k - below.size]
    return np.concatenate([below, ties])
