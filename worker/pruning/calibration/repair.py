"""Least-squares channel repair and BatchNorm re-estimation: the arithmetic, numpy only.

Why: removing a channel deletes one input of every op that reads it (the next conv's input slice, the Dense
rows a flattened channel feeds). He et al. 2017 ("Channel Pruning for Accelerating Very Deep Neural
Networks") and ThiNet (Luo et al. 2017) recover most of what that breaks without any training: refit the
consumer's remaining weights by least squares so that, on a few hundred unlabeled calibration inputs, the
pruned op reproduces what the *dense* model's op computed. Re-estimating BatchNorm statistics on the same
inputs (NNCF's batch-norm adaptation) then corrects the scale and shift the pruned layers no longer match.

Every weight-consuming op is seen as a matrix product ``Y = X W``:

- Dense/MatMul/Einsum: a row of ``X`` is one input vector (``[..., d_in]`` flattened), ``W`` is ``[d_in,
  d_out]``;
- Conv2D (NHWC): a row of ``X`` is one im2col patch, ``kh * kw * c_in`` values ordered ``(kh, kw, c_in)`` --
  the order of a ``[kh, kw, c_in, c_out]`` kernel reshaped to ``[kh * kw * c_in, c_out]`` -- with the op's
  strides, dilations and padding (``im2col``).

The fit (``solve``): with ``X`` the op's input under the pruned model (only kept input channels nonzero) and
``Y`` the dense model's op output at the same positions,

    min_W'  || X[:, kept] W' + 1 d^T - Y[:, kept_out] ||^2 + lam || W' - W0 ||^2

``W0`` is the current (masked) kernel: the ridge pulls towards it, not towards zero, so directions the
calibration data does not excite keep their trained values. ``d`` (optional) is a per-output shift that the
caller adds to the op's bias. Removed input rows and removed output columns stay exactly zero.
``lam = ridge * mean(diag(X_kept^T X_kept))``, so ``ridge`` is scale-free.

Memory: ``NormalEquations`` accumulates ``X^T X`` ((d_in + 1)^2 float64), ``X^T Y`` (d_in x d_out) and column
sums over any number of calibration rows; the caller samples at most ``rows`` positions per batch
(``sample_positions``), so a batch's patch matrix is at most ``rows x d_in`` float64. For the largest conv of
ResNet-50 (3x3x512 -> 512: d_in = 4608) that is 170 MB for ``X^T X`` and 19 MB for ``X^T Y``, plus 75 MB for
2048 sampled patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = [
    "ConvGeometry",
    "MomentAccumulator",
    "NormalEquations",
    "Refit",
    "batchnorm_statistics",
    "im2col",
    "sample_positions",
    "solve",
]

DEFAULT_RIDGE = 1e-2  # relative to the mean diagonal of X^T X over the kept inputs
# A BatchNorm channel's statistics describe the calibration data when the dense model's activations there have
# a mean within one (old) standard deviation of the moving mean and a variance within this factor of it.
CALIBRATED_RATIO = 4.0


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's window: kernel size, strides, dilations and padding (NHWC).

    ``padding``: ``"VALID"``, ``"SAME"`` (TensorFlow's: the extra row/column goes to the bottom/right), or
    explicit ``((top, bottom), (left, right))``."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    padding: Literal["VALID", "SAME"] | tuple[tuple[int, int], tuple[int, int]] = "VALID"

    def pads(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((top, bottom), (left, right))`` zero padding for an input of ``height x width``."""
        if self.padding == "VALID":
            return (0, 0), (0, 0)
        if self.padding == "SAME":
            out = []
            for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations, strict=True):
                span = (k - 1) * d + 1
                total = max((-(-size // s) - 1) * s + span - size, 0)
                out.append((total // 2, total - total // 2))
            return out[0], out[1]
        (top, bottom), (left, right) = self.padding
        return (int(top), int(bottom)), (int(left), int(right))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the op's output."""
        (top, bottom), (left, right) = self.pads(height, width)
        sizes = []
        for size, k, s, d in zip(
            (height + top + bottom, width + left + right),
            self.kernel,
            self.strides,
            self.dilations,
            strict=True,
        ):
            span = (k - 1) * d + 1
            sizes.append(max((size - span) // s + 1, 0))
        return sizes[0], sizes[1]


def sample_positions(rng: np.random.Generator, total: int, rows: int) -> np.ndarray:
    """Sorted indices of at most ``rows`` of ``total`` output positions (all of them when they fit)."""
    if total <= rows:
        return np.arange(total, dtype=np.int64)
    return np.sort(rng.choice(total, size=rows, replace=False)).astype(np.int64)


def im2col(x: np.ndarray, geometry: ConvGeometry, positions: np.ndarray | None = None) -> np.ndarray:
    """The patches a 2-D convolution multiplies with its kernel: ``[rows, kh * kw * c_in]`` float64.

    ``x`` is ``[n, h, w, c_in]``; ``positions`` are flat indices into the output grid ``[n, oh, ow]`` (None:
    every position, in that order, i.e. the rows of the op's output reshaped to ``[-1, c_out]``)."""
    n, height, width, channels = x.shape
    oh, ow = geometry.output_size(height, width)
    (top, bottom), (left, right) = geometry.pads(height, width)
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    if positions is None:
        positions = np.arange(n * oh * ow, dtype=np.int64)
    b, rest = np.divmod(positions, oh * ow)
    i, j = np.divmod(rest, ow)
    kh, kw = geometry.kernel
    (sh, sw), (dh, dw) = geometry.strides, geometry.dilations
    patches = np.empty((len(positions), kh, kw, channels), dtype=np.float64)
    for a in range(kh):
        for c in range(kw):
            patches[:, a, c, :] = padded[b, i * sh + a * dh, j * sw + c * dw, :]
    return patches.reshape(len(positions), kh * kw * channels)


def output_rows(y: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """The op's output ``[..., d_out]`` as rows ``[rows, d_out]`` float64 (at ``positions`` if given)."""
    flat = np.asarray(y).reshape(-1, np.shape(y)[-1])
    return np.asarray(flat if positions is None else flat[positions], np.float64)


@dataclass
class NormalEquations:
    """``X^T X``, ``X^T Y`` and the sums a least-squares fit with an intercept needs, accumulated over
    calibration batches (float64): memory does not grow with the number of rows."""

    d_in: int
    d_out: int
    gram: np.ndarray = field(init=False)
    cross: np.ndarray = field(init=False)
    x_sum: np.ndarray = field(init=False)
    y_sum: np.ndarray = field(init=False)
    y_sq: np.ndarray = field(init=False)  # per output column: sum of y^2
    count: int = 0

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.d_in, self.d_in))
        self.cross = np.zeros((self.d_in, self.d_out))
        self.x_sum = np.zeros(self.d_in)
        self.y_sum = np.zeros(self.d_out)
        self.y_sq = np.zeros(self.d_out)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Rows ``x`` ``[rows, d_in]`` (the pruned model's op input) and ``y`` ``[rows, d_out]`` (the dense
        model's op output at the same positions)."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        if x.shape != (len(x), self.d_in) or y.shape != (len(x), self.d_out):
            raise ValueError(f"rows {x.shape} / {y.shape} do not fit d_in={self.d_in}, d_out={self.d_out}")
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.x_sum += x.sum(axis=0)
        self.y_sum += y.sum(axis=0)
        self.y_sq += (y * y).sum(axis=0)
        self.count += len(x)

    def squared_error(
        self, weights: np.ndarray, shift: np.ndarray | None = None, columns: np.ndarray | None = None
    ) -> float:
        """``sum ||X W + 1 shift^T - Y||^2`` over the output ``columns`` (bool; None = all), from the
        accumulated sums alone."""
        cols = np.ones(self.d_out, bool) if columns is None else np.asarray(columns, bool)
        w = np.asarray(weights, np.float64)[:, cols]
        total = (  # matrix products (BLAS), not a three-operand einsum: d_in^2 * d_out in a plain loop
            float(np.sum(w * (self.gram @ w)))
            - 2.0 * float(np.sum(w * self.cross[:, cols]))
            + float(self.y_sq[cols].sum())
        )
        if shift is not None:
            d = np.asarray(shift, np.float64)[cols]
            total += 2.0 * d @ (self.x_sum @ w) - 2.0 * d @ self.y_sum[cols] + self.count * (d @ d)
        return max(float(total), 0.0)

    def relative_error(
        self, weights: np.ndarray, shift: np.ndarray | None = None, columns: np.ndarray | None = None
    ) -> float:
        """``squared_error / sum ||Y||^2`` over the same columns (0 when the target is all zero)."""
        cols = np.ones(self.d_out, bool) if columns is None else np.asarray(columns, bool)
        norm = float(self.y_sq[cols].sum())
        return self.squared_error(weights, shift, cols) / norm if norm > 0 else 0.0


@dataclass(frozen=True)
class Refit:
    """A solved refit: the new kernel matrix (removed rows/columns exactly zero, as given), the shift to add
    to the op's bias (zeros without an intercept) and the relative output error before and after."""

    weights: np.ndarray
    shift: np.ndarray
    error_before: float
    error_after: float


def solve(
    eq: NormalEquations,
    current: np.ndarray,
    kept_in: Sequence[bool] | np.ndarray,
    kept_out: Sequence[bool] | np.ndarray,
    *,
    ridge: float = DEFAULT_RIDGE,
    intercept: bool = False,
) -> Refit:
    """The ridge least-squares refit of the module docstring.

    ``current``: the masked kernel matrix ``[d_in, d_out]`` (``W0``); ``kept_in`` / ``kept_out``: bool masks
    of the input rows and output columns that remain. Rows not kept are exactly zero in the result; columns
    not kept are copied from ``current`` (the caller's masks zero them). If the refit would not lower the
    error on the calibration rows (it always should; float trouble aside), ``current`` comes back."""
    w0 = np.asarray(current, np.float64)
    rows = np.asarray(kept_in, bool)
    cols = np.asarray(kept_out, bool)
    if w0.shape != (eq.d_in, eq.d_out) or rows.shape != (eq.d_in,) or cols.shape != (eq.d_out,):
        raise ValueError(f"kernel {w0.shape} / masks do not fit d_in={eq.d_in}, d_out={eq.d_out}")
    before = eq.relative_error(w0, None, cols)
    weights = w0.copy()
    weights[~rows, :] = 0.0
    shift = np.zeros(eq.d_out)
    if not rows.any() or not cols.any() or eq.count == 0:
        return Refit(weights, shift, before, eq.relative_error(weights, None, cols))
    gram = eq.gram[np.ix_(rows, rows)]
    cross = eq.cross[np.ix_(rows, cols)]
    if intercept:  # centre: the shift absorbs the means, the kernel fits the covariances
        mx = eq.x_sum[rows] / eq.count
        my = eq.y_sum[cols] / eq.count
        gram = gram - eq.count * np.outer(mx, mx)
        cross = cross - eq.count * np.outer(mx, my)
    scale = float(np.mean(np.diag(gram))) if gram.size else 0.0
    lam = ridge * scale if scale > 0 else max(ridge, 1e-12)
    base = w0[np.ix_(rows, cols)]
    lhs = gram + lam * np.eye(len(gram))
    rhs = cross + lam * base
    try:
        fitted = np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        fitted = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    if not np.all(np.isfinite(fitted)):
        return Refit(weights, shift, before, eq.relative_error(weights, None, cols))
    weights[np.ix_(rows, cols)] = fitted
    if intercept:
        shift[cols] = my - mx @ fitted
    after = eq.relative_error(weights, shift, cols)
    if after > before:
        masked = w0.copy()
        masked[~rows, :] = 0.0
        return Refit(masked, np.zeros(eq.d_out), before, eq.relative_error(masked, None, cols))
    return Refit(weights, shift, before, after)


@dataclass
class MomentAccumulator:
    """Per-channel mean and (population) variance of activations ``[..., channels]`` over calibration
    batches, merged batch by batch (Chan et al.'s parallel update: no catastrophic cancellation)."""

    channels: int
    count: int = 0
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.channels)
        self.m2 = np.zeros(self.channels)

    def add(self, x: np.ndarray) -> None:
        rows = np.asarray(x, np.float64).reshape(-1, self.channels)
        n = len(rows)
        if n == 0:
            return
        mean = rows.mean(axis=0)
        m2 = ((rows - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        """Population variance (divided by the count), as a BatchNorm normalises a batch."""
        return self.m2 / self.count if self.count else np.zeros(self.channels)


def batchnorm_statistics(
    mean: np.ndarray,
    variance: np.ndarray,
    epsilon: float,
    dense: MomentAccumulator,
    pruned: MomentAccumulator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """New moving ``(mean, variance)`` of an inference-mode BatchNorm, ``(x - mean) / sqrt(variance + eps)``,
    after pruning changed its input; and two channel masks: ``estimated`` and ``matched``.

    ``dense`` / ``pruned``: moments of the BatchNorm's input on the calibration data in the dense and the
    pruned model. Where the old statistics describe the dense activations (``_calibrated``: a trained model,
    calibration data like its training data), they are re-estimated from the pruned activations: ``mean =
    E[x_pruned]``, ``variance = Var[x_pruned]`` (NNCF's batch-norm adaptation; measured better than matching
    on trained models). Where they do not (an untrained model, calibration data unlike the training data),
    re-estimating would change what the dense model computes on that data, so they are *matched* instead: the
    pruned normalised activations get the dense ones' mean and variance, ``s' = s r``, ``mean' = E[x_pruned]
    - (E[x_dense] - mean) r`` with ``s = sqrt(variance + eps)``, ``r = sqrt(Var[x_pruned] / Var[x_dense])``.
    Channels constant in either model (removed ones) keep their statistics."""
    mean = np.asarray(mean, np.float64)
    variance = np.asarray(variance, np.float64)
    square = np.maximum(variance + epsilon, 1e-30)
    live = (dense.variance > 0) & (pruned.variance > 0)
    estimated = live & _calibrated(mean, square, dense)
    matched = live & ~estimated
    ratio = np.sqrt(np.where(live, pruned.variance, 1.0) / np.where(live, dense.variance, 1.0))
    match_variance = np.maximum(square * ratio**2 - epsilon, 0.0)
    ratio = np.sqrt((match_variance + epsilon) / square)  # what the clamp at 0 leaves of it
    match_mean = pruned.mean - (dense.mean - mean) * ratio
    new_mean = np.where(estimated, pruned.mean, np.where(matched, match_mean, mean))
    new_variance = np.where(estimated, pruned.variance, np.where(matched, match_variance, variance))
    return new_mean, new_variance, estimated, matched


def _calibrated(mean: np.ndarray, square: np.ndarray, dense: MomentAccumulator) -> np.ndarray:
    """Channels whose statistics (``mean``, ``square = variance + eps``) fit the dense activations."""
    close = np.abs(dense.mean - mean) <= np.sqrt(square)
    ratio = dense.variance / square
    return close & (ratio <= CALIBRATED_RATIO) & (ratio >= 1.0 / CALIBRATED_RATIO)
