"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"): per weight-consuming op, choose the mask and update the remaining weights so that the op's output
on the calibration inputs changes as little as possible.

For one op computing ``X @ M`` (``M`` the variable as the op's ``(d_in, d_out)`` matrix, ``capture.WeightUse
.matrix``), SparseGPT works on ``W = M.T`` (rows = output units, columns = input features) and the Hessian of
the layer-wise squared error, ``H = X^T X`` summed over the calibration rows (float64), dampened by 1% of its
mean diagonal. With ``U`` the upper Cholesky factor of ``H^-1``, columns are processed left to right in blocks
of 128: at the start of a block (unstructured) or of each group of M columns (N:M) the weights to remove are
those with the smallest ``w^2 / U_jj^2`` (the optimal-brain-surgeon saliency, chosen adaptively on the
already-updated weights); column ``j`` is then zeroed where masked and its error ``(w - q) / U_jj`` is spread
over the columns to its right through row ``j`` of ``U`` (lazy block updates keep it cache-friendly). This
is the reference implementation's algorithm; only the count of each block is set so that the variable's total
equals the pruner's ``round(t * size)`` exactly, because the pruner then takes SparseGPT's zeros as its mask.

N:M: the groups are M consecutive input columns inside each ``segment`` (the granularity's N:M axis: ``cin``
of a ``(kh, kw, cin, cout)`` kernel, i.e. within one ``(kh, kw)`` of the im2col order), with the same tail rule
as ``granularity.NM`` (a tail of ``r < M`` columns keeps at most ``M - k`` of them).

Sequential (``sparsegpt_sequential``): ops are taken in dependency waves (``capture.dependency_waves``); the
inputs of each wave are recomputed with the already-pruned and updated weights of the earlier waves, so the
errors of one layer are compensated by the next instead of compounding (the paper's procedure).

Memory: ``H`` is ``d_in x d_in`` float64, accumulated, then dampened in a copy and factored in float32 (the
reference's precision): 12 x d_in^2 bytes while the columns are processed, up to twice that while factoring (a
3x3x512 conv of ResNet-50 has ``d_in = 4608``: 255 MB); variables above ``max_dim`` input features keep
magnitude scoring and are named in the notes. NumPy only: the capture session (TensorFlow) is passed in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.linalg import blas, lapack
from threadpoolctl import ThreadpoolController

__all__ = [
    "DEFAULT_BLOCKSIZE",
    "DEFAULT_DAMPING",
    "GRAM_MIN_ROWS",
    "GRAM_ROWS_PER_FEATURE",
    "ObsResult",
    "SequentialResult",
    "gram_rows",
    "sparsegpt_prune",
    "sparsegpt_sequential",
    "unstructured_count",
]

DEFAULT_BLOCKSIZE = 128
DEFAULT_DAMPING = 0.01
# Conv2D Hessians are estimated from at most max(GRAM_MIN_ROWS, GRAM_ROWS_PER_FEATURE * d_in) output positions
# per calibration batch (``CaptureSession.gram(max_rows=...)``): the im2col matrix of every position was most
# of the calibration time on ResNet-50 (a 3x3x64 conv at 56x56, batch 32: 100,352 rows of 576 features, now
# 4,608). With 128 samples in 4 batches that is at least 32 rows per input feature; matrix ops (language
# models' tokens) keep every row.
GRAM_MIN_ROWS = 4096
GRAM_ROWS_PER_FEATURE = 8


def gram_rows(d_in: int) -> int:
    """Output positions per batch a Conv2D's ``X^T X`` is estimated from (see ``GRAM_MIN_ROWS``)."""
    return max(GRAM_MIN_ROWS, GRAM_ROWS_PER_FEATURE * d_in)


@dataclass(frozen=True)
class ObsResult:
    """What SparseGPT did to one variable: its new value and the keep-mask it chose (the variable's shape)."""

    weight: np.ndarray
    keep: np.ndarray
    error: float  # the OBS estimate of the summed squared output error (in units of H)
    damping: float  # the damping finally used (raised when H was not positive definite)


@dataclass
class SequentialResult:
    results: dict[str, ObsResult] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)  # variable -> why it keeps magnitude scoring
    rows: int = 0  # calibration rows of the first op (samples x positions)


def unstructured_count(size: int, target: float) -> int:
    """Weights removed at ``target`` by ``granularity.Unstructured`` (``scope.select_groups``): ``round(t *
    size)``, at most ``size - 1`` below a target of 1 (the best weight is kept)."""
    k = round(target * size)
    return min(k, size - 1) if target < 1.0 else k


def _nm_groups(cols: int, m: int, segment: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the N:M groups over ``cols`` columns: runs of ``m`` inside each ``segment``."""
    if cols % segment:
        raise ValueError(f"{cols} columns are not whole segments of {segment}")
    return [
        (base + start, base + min(start + m, segment))
        for base in range(0, cols, segment)
        for start in range(0, segment, m)
    ]


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _one_blas_thread() -> Any:
    """The column loop's rank-1 updates with one BLAS thread: OpenBLAS threads each small ``sger`` and the
    synchronisation cost 4x the update itself here (6x on cores shared with another process); the block
    products between the loops keep every thread."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _inverse_factor(h: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """Upper Cholesky factor of ``(H + damping * mean(diag) * I)^-1`` in float32 (as the reference runs it);
    the damping is raised x10 (up to 4 times) while the dampened H is not positive definite in float32. ``H``
    (float64) is modified (dead columns get 1)."""
    diagonal = np.diag_indices_from(h)
    base = h[diagonal].copy()
    base[base <= 0] = 1.0  # an input that is always zero: its weights get no update
    mean = float(np.mean(base)) or 1.0
    for attempt in range(5):
        damp = damping * (10**attempt)
        h[diagonal] = base + damp * mean
        # One Cholesky and one triangular inverse (n^3/3 each) instead of the reference's three factorisations
        # (cholesky, cholesky_inverse, cholesky(upper): 4n^3/3). With J the reversal permutation and
        # J H J = L L^T, U = J L^-1 J is upper triangular and U^T U = J (J H J)^-1 J = H^-1: the factor itself.
        # float32 LAPACK: 2.4x faster than float64 at d = 4608 (ResNet-50's 3x3x512 convs) on this machine.
        flipped = np.array(h[::-1, ::-1], dtype=np.float32)
        lower, info = lapack.spotrf(flipped, lower=True, overwrite_a=True, clean=True)
        if info != 0:
            continue
        inverse, info = lapack.strtri(lower, lower=True, overwrite_c=True)
        # ``clean=True`` zeroed the upper triangle and strtri writes only the lower one: no tril needed.
        if info == 0 and np.isfinite(inverse).all() and (np.diagonal(inverse) > 0).all():
            return np.ascontiguousarray(inverse[::-1, ::-1]), damp
    raise np.linalg.LinAlgError("the calibration Hessian is not positive definite even with 10,000% damping")


def sparsegpt_prune(
    w: np.ndarray,
    h: np.ndarray,
    *,
    target: float | None = None,
    nm: tuple[int, int] | None = None,
    segment: int | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    damping: float = DEFAULT_DAMPING,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Prune ``w`` (rows = outputs, cols = inputs) against ``h`` (cols x cols, ``X^T X``).

    Unstructured: ``target`` (fraction removed, exactly ``unstructured_count(w.size, target)`` weights).
    N:M: ``nm = (k, m)`` removes ``k`` of every ``m`` consecutive columns of each ``segment`` (default all
    columns), tails as ``granularity.NM``. Returns ``(new w, pruned mask, OBS error, damping used)``, the new
    weights in float32; ``h`` is not modified.
    """
    if (target is None) == (nm is None):
        raise ValueError("give either target (unstructured) or nm=(k, m)")
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"H is {h.shape}, expected ({cols}, {cols})")
    U, damp = _inverse_factor(np.array(h, dtype=np.float64), damping)
    # Columns of W as contiguous rows (``Wt[i]`` = column i), float32 as the reference: the per-column update
    # below is then one in-place BLAS rank-1 update (``sger``) on contiguous memory, not a strided column read
    # and a temporary outer product.
    Wt = np.array(w.T, dtype=np.float32, order="C")
    prunedT = np.zeros((cols, rows), dtype=bool)

    if nm is None:
        assert target is not None
        total = unstructured_count(w.size, target)
        bounds = [(s, min(s + blocksize, cols)) for s in range(0, cols, blocksize)]
        groups_of: dict[int, list[tuple[int, int]]] = {}
    else:
        k, m = nm
        groups = _nm_groups(cols, m, segment or cols)
        bounds, groups_of = [], {}
        start = 0
        for g0, g1 in groups:  # blocks end on group boundaries (a tail may make groups uneven)
            groups_of.setdefault(start, []).append((g0, g1))
            if g1 - start >= blocksize:
                bounds.append((start, g1))
                start = g1
        if start < cols:
            bounds.append((start, cols))
    error = 0.0
    for b0, b1 in bounds:
        W1 = Wt[b0:b1]  # a view: updated in place
        Err1 = np.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        d = np.diag(U1).copy()
        mask1 = prunedT[b0:b1]
        if nm is None:
            assert target is not None
            want = round(total * b1 * rows / w.size) - round(total * b0 * rows / w.size)
            if want > 0:
                saliency = (W1**2) / (d[:, None] ** 2)
                flat = np.argpartition(saliency.ravel(), want - 1)[:want]
                mask1.ravel()[flat] = True
            starts: dict[int, tuple[int, int]] = {}
        else:
            starts = {g0 - b0: (g0 - b0, g1 - b0) for g0, g1 in groups_of.get(b0, [])}
        with _one_blas_thread():
            for i in range(b1 - b0):
                if starts and i in starts:  # choose this group's mask on the weights updated so far
                    g0, g1 = starts[i]
                    width = g1 - g0
                    k, m = nm  # type: ignore[misc]
                    drop = width - (m - k) if width < m else k
                    if drop > 0:
                        saliency = (W1[g0:g1] ** 2) / (d[g0:g1, None] ** 2)
                        lowest = np.argpartition(saliency, drop - 1, axis=0)[:drop]
                        np.put_along_axis(mask1[g0:g1], lowest, True, axis=0)
                # The masked entries' error (w - q = w where masked, 0 elsewhere) spread over the columns to the
                # right; the column itself ends at q (its masked entries become exactly zero).
                err = W1[i] * mask1[i] * np.float32(1.0 / d[i])
                if i + 1 < b1 - b0:
                    # W1[i+1:] -= outer(U1[i, i+1:], err), in place: the transposed view is Fortran-ordered
                    blas.sger(-1.0, err, U1[i, i + 1 :], a=W1[i + 1 :].T, overwrite_a=True)
                W1[i][mask1[i]] = 0.0
                Err1[i] = err
        error += float(np.sum(Err1.astype(np.float64) ** 2)) / 2
        if b1 < cols:
            Wt[b1:] -= U[b0:b1, b1:].T @ Err1
    Wt[prunedT] = 0.0
    return Wt.T, prunedT.T, error, damp


def sparsegpt_sequential(
    session: Any,
    waves: Sequence[Sequence[Any]],
    values: dict[str, np.ndarray],
    plans: Mapping[str, Mapping[str, Any]],
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    *,
    max_dim: int,
    blocksize: int = DEFAULT_BLOCKSIZE,
    damping: float = DEFAULT_DAMPING,
    on_wave: Callable[[int, int], None] | None = None,
    reuse: Any = None,
) -> SequentialResult:
    """SparseGPT over ``waves`` (``capture.dependency_waves`` of the pruned variables' uses) in order.

    ``values``: every weight of the signature by variable name (fed to ``session``); pruned variables are
    replaced in it as their wave completes, so later waves see the pruned model. ``plans``: per variable to
    prune, ``{"target": t}`` or ``{"nm": (k, m), "axis": a}`` (``a``: the variable axis N:M groups run
    along). Variables read by several ops, by a depthwise op, with more than ``max_dim`` input features, or
    whose N:M axis is not the fastest input feature keep magnitude scoring (``fallback``, with the reason).
    ``reuse``: a ``capture.Reuse`` plan: outputs of earlier waves are cached per batch and fed, so each pass
    runs only the ops after them (the results are the same; None recomputes from the inputs every time).
    """
    out = SequentialResult()
    cache: dict[str, list[np.ndarray]] = {}
    by_var: dict[str, list[Any]] = {}
    for wave in waves:
        for use in wave:
            by_var.setdefault(use.variable, []).append(use)
    reasons = {
        name: _why_not(uses[0], uses, values[name].shape, plans[name], max_dim)
        for name, uses in by_var.items()
        if name in plans
    }
    # Every capture tensor built before the first run: each new op would otherwise extend the session's graph
    # once per wave (~5 s of ExtendSession on ResNet-50's ~50 waves).
    for name, reason in reasons.items():
        if reason is None:
            use = by_var[name][0]
            session.gram(use, max_rows=gram_rows(use.dims(values[name].shape)[0]))
            session.rows(use)
    for index, wave in enumerate(waves):
        todo: list[Any] = []
        for use in wave:
            name = use.variable
            if name not in plans or name in out.fallback or name in out.results:
                continue
            reason = reasons[name]
            if reason is not None:
                out.fallback[name] = reason
            else:
                todo.append(use)
        feed_names = [] if reuse is None else [t for t in reuse.feeds[index] if t in cache]
        keep = [] if reuse is None else reuse.keep[index]
        if todo or keep:
            grams, kept = _accumulate(session, todo, values, batches, {t: cache[t] for t in feed_names}, keep)
            cache.update(kept)
            if reuse is not None:
                for name in [t for t in cache if reuse.last_use.get(t, -1) <= index]:
                    del cache[name]
        if todo:
            if not out.rows:
                out.rows = grams[todo[0].op][1]
            for use in todo:
                name = use.variable
                weight = values[name]
                plan = plans[name]
                gram = grams[use.op][0]
                segment = weight.shape[plan["axis"] % weight.ndim] if "nm" in plan else None
                try:
                    new, pruned, error, damp = sparsegpt_prune(
                        use.matrix(weight).T, gram, target=plan.get("target"), nm=plan.get("nm"),
                        segment=segment, blocksize=blocksize, damping=damping,
                    )  # fmt: skip
                except np.linalg.LinAlgError as exc:
                    out.fallback[name] = str(exc)
                    continue
                updated = use.unmatrix(new.T, weight.shape).astype(weight.dtype)
                kept_mask = ~use.unmatrix(pruned.T, weight.shape)
                updated[~kept_mask] = 0
                values[name] = updated
                out.results[name] = ObsResult(updated, kept_mask, error, damp)
        if on_wave is not None:
            on_wave(index, len(waves))
    return out


def _why_not(
    use: Any, uses: list[Any], shape: tuple[int, ...], plan: Mapping[str, Any], max_dim: int
) -> str | None:
    """Why SparseGPT cannot prune this variable (it then keeps magnitude scoring), or None."""
    if len(uses) > 1:
        return f"read by {len(uses)} ops (SparseGPT updates a weight for one op's inputs)"
    if use.kind == "depthwise":
        return "a depthwise kernel: each output reads one channel's window (no input Hessian to share)"
    d_in, _ = use.dims(shape)
    if d_in > max_dim:
        return (
            f"{d_in} input features: its {d_in}x{d_in} Hessian is above the SECATEURS_CALIBRATION_MAX_DIM "
            f"cap of {max_dim}"
        )
    if "nm" in plan:
        axis = plan["axis"] % len(shape)
        if not use.in_axes or use.in_axes[-1] != axis:
            return "its N:M axis is not the input features its op reads fastest"
    return None


def _accumulate(
    session: Any,
    uses: list[Any],
    values: Mapping[str, np.ndarray],
    batches: Callable[[], Iterable[Any]],
    cached: Mapping[str, list[np.ndarray]],
    keep: list[str],
) -> tuple[dict[str, tuple[np.ndarray, int]], dict[str, list[np.ndarray]]]:
    """Per op of ``uses``: ``H = sum over batches of X^T X`` (float64) and the number of rows of ``X``; and
    the tensors ``keep`` per batch. ``cached``: tensors fed per batch instead of computed."""
    fetch: list[Any] = []
    for use in uses:
        d_in, _ = use.dims(values[use.variable].shape)
        fetch += [session.gram(use, max_rows=gram_rows(d_in)), session.rows(use)]
    fetch += keep
    kept: dict[str, list[np.ndarray]] = {name: [] for name in keep}
    sums: dict[str, tuple[np.ndarray, int]] = {}
    for b, batch in enumerate(batches()):
        out = session.run(values, batch, fetch, {name: parts[b] for name, parts in cached.items()})
        for j, name in enumerate(keep):
            kept[name].append(out[2 * len(uses) + j])
        for i, use in enumerate(uses):
            gram, rows = out[2 * i].astype(np.float64), int(out[2 * i + 1])
            if use.op in sums:
                old, n = sums[use.op]
                old += gram
                sums[use.op] = (old, n + rows)
            else:
                sums[use.op] = (gram, rows)
    return sums, kept
