"""Least-squares channel repair and BatchNorm re-estimation, as arithmetic (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

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


def _conv(x: np.ndarray, kernel: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """A direct NHWC convolution (loops over the output grid), independent of im2col's indexing."""
    n, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    (top, bottom), (left, right) = geometry.pads(h, w)
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh, ow = geometry.output_size(h, w)
    (sh, sw), (dh, dw) = geometry.strides, geometry.dilations
    out = np.zeros((n, oh, ow, cout))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for b in range(kw):
                    out[:, i, j, :] += padded[:, i * sh + a * dh, j * sw + b * dw, :] @ kernel[a, b]
    return out


@pytest.mark.parametrize(
    "geometry",
    [
        ConvGeometry((3, 3), padding="SAME"),
        ConvGeometry((3, 3), padding="VALID"),
        ConvGeometry((3, 2), strides=(2, 2), padding="SAME"),
        ConvGeometry((3, 3), dilations=(2, 2), padding="SAME"),
        ConvGeometry((2, 2), strides=(2, 1), padding=((1, 0), (0, 2))),
        ConvGeometry((1, 1), strides=(2, 2), padding="VALID"),
    ],
)
def test_im2col_times_the_kernel_is_the_convolution(geometry: ConvGeometry) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 6, 3))
    kernel = rng.standard_normal((*geometry.kernel, 3, 4))
    want = _conv(x, kernel, geometry)
    got = im2col(x, geometry) @ kernel.reshape(-1, 4)
    np.testing.assert_allclose(got, want.reshape(-1, 4), atol=1e-10)
    positions = sample_positions(rng, want.size // 4, 9)
    assert len(positions) == 9 and np.all(np.diff(positions) > 0)
    np.testing.assert_allclose(
        im2col(x, geometry, positions) @ kernel.reshape(-1, 4), output_rows(want, positions), atol=1e-10
    )


def test_same_padding_matches_tensorflows_output_size() -> None:
    assert ConvGeometry((3, 3), strides=(2, 2), padding="SAME").output_size(7, 8) == (4, 4)
    assert ConvGeometry((3, 3), strides=(2, 2), padding="VALID").output_size(7, 8) == (3, 3)
    assert ConvGeometry((4, 4), padding="SAME").pads(8, 8) == ((1, 2), (1, 2))


def _pruned_layer(
    seed: int = 0, d_in: int = 12, d_out: int = 5, n: int = 400
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Correlated inputs (so the kept channels can stand in for removed ones), a dense kernel, the dense
    output, and a mask removing a third of the input channels."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, d_in))
    x = rng.standard_normal((n, 4)) @ basis + 0.1 * rng.standard_normal((n, d_in)) + 0.5
    w = rng.standard_normal((d_in, d_out))
    kept = np.ones(d_in, bool)
    kept[rng.choice(d_in, d_in // 3, replace=False)] = False
    return x, w, x @ w, kept


def test_refit_lowers_the_output_error_and_keeps_removed_rows_zero() -> None:
    x, w, y, kept = _pruned_layer()
    pruned_x = x * kept  # the pruned model feeds zeros on removed channels
    masked = w * kept[:, None]
    eq = NormalEquations(*w.shape)
    for part in np.array_split(np.arange(len(x)), 3):  # batches accumulate into the same fit
        eq.add(pruned_x[part], y[part])
    fit = solve(eq, masked, kept, np.ones(w.shape[1], bool), ridge=1e-6)
    assert np.all(fit.weights[~kept] == 0.0)
    direct_before = np.sum((pruned_x @ masked - y) ** 2) / np.sum(y**2)
    direct_after = np.sum((pruned_x @ fit.weights - y) ** 2) / np.sum(y**2)
    assert fit.error_before == pytest.approx(direct_before, rel=1e-6)
    assert fit.error_after == pytest.approx(direct_after, rel=1e-6)
    assert direct_after < 0.1 * direct_before
    # the unregularised optimum over the kept rows
    best = np.linalg.lstsq(pruned_x[:, kept], y, rcond=None)[0]
    np.testing.assert_allclose(fit.weights[kept], best, rtol=1e-3, atol=1e-3)


def test_intercept_absorbs_a_mean_shift_and_is_reported_as_a_shift() -> None:
    x, w, y, kept = _pruned_layer(seed=1)
    eq = NormalEquations(*w.shape)
    eq.add(x * kept, y)
    plain = solve(eq, w * kept[:, None], kept, np.ones(w.shape[1], bool), ridge=1e-6)
    shifted = solve(eq, w * kept[:, None], kept, np.ones(w.shape[1], bool), ridge=1e-6, intercept=True)
    assert shifted.error_after <= plain.error_after + 1e-12
    direct = np.sum(((x * kept) @ shifted.weights + shifted.shift - y) ** 2) / np.sum(y**2)
    assert shifted.error_after == pytest.approx(direct, rel=1e-6)
    assert np.all(shifted.weights[~kept] == 0.0)


def test_removed_output_columns_are_left_to_the_masks_and_the_ridge_pulls_to_the_kernel() -> None:
    x, w, y, kept = _pruned_layer(seed=2)
    kept_out = np.array([True, False, True, True, False])
    masked = w * kept[:, None] * kept_out[None, :]
    eq = NormalEquations(*w.shape)
    eq.add(x * kept, y)
    fit = solve(eq, masked, kept, kept_out, intercept=True)
    assert np.all(fit.weights[:, ~kept_out] == 0.0) and np.all(fit.shift[~kept_out] == 0.0)
    assert np.all(fit.weights[~kept] == 0.0)
    assert fit.error_after < fit.error_before
    stiff = solve(eq, masked, kept, kept_out, ridge=1e9)  # all ridge: the masked kernel itself
    np.testing.assert_allclose(stiff.weights, masked, atol=1e-6)


def test_no_data_or_nothing_kept_returns_the_masked_kernel() -> None:
    w = np.arange(12.0).reshape(4, 3)
    kept = np.array([True, False, True, True])
    fit = solve(NormalEquations(4, 3), w, kept, np.ones(3, bool))
    np.testing.assert_array_equal(fit.weights, w * kept[:, None])
    assert fit.error_before == fit.error_after == 0.0


def test_batchnorm_statistics_equal_the_recomputed_moments() -> None:
    rng = np.random.default_rng(3)
    batches = [rng.normal(5.0, 2.0, (b, 4, 4, 6)) for b in (7, 32, 1)]
    acc = MomentAccumulator(6)
    for batch in batches:
        acc.add(batch)
    everything = np.concatenate(batches).reshape(-1, 6)
    np.testing.assert_allclose(acc.mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.variance, everything.var(axis=0), rtol=1e-10)
    assert acc.count == len(everything)


def _moments(x: np.ndarray) -> MomentAccumulator:
    acc = MomentAccumulator(x.shape[-1])
    acc.add(x)
    return acc


def test_batchnorm_statistics_are_re_estimated_where_they_fit_the_dense_activations() -> None:
    rng = np.random.default_rng(5)
    x_dense = rng.normal(2.0, 3.0, (2000, 3))
    x_pruned = rng.normal(-1.0, 0.5, (2000, 3))
    x_pruned[:, 2] = 0.0  # a removed channel: constant
    old_mean, old_variance = np.array([2.1, 1.9, 2.0]), np.array([8.0, 10.0, 9.0])  # a trained model's
    mean, variance, estimated, matched = batchnorm_statistics(
        old_mean, old_variance, 1e-3, _moments(x_dense), _moments(x_pruned)
    )
    assert estimated.tolist() == [True, True, False] and not matched.any()
    np.testing.assert_allclose(mean[:2], x_pruned.mean(0)[:2], rtol=1e-12)  # the recomputed statistics
    np.testing.assert_allclose(variance[:2], x_pruned.var(0)[:2], rtol=1e-12)
    assert mean[2] == old_mean[2] and variance[2] == old_variance[2]


def test_batchnorm_statistics_that_do_not_fit_are_matched_to_the_dense_model() -> None:
    rng = np.random.default_rng(4)
    x_dense = rng.normal([1.0, -2.0, 0.5], [0.01, 0.5, 2.0], (500, 3))
    x_pruned = 0.6 * x_dense + rng.normal(0.3, 0.2, (500, 3))
    old_mean, old_variance, eps = (
        np.array([0.0, -1.5, 0.0]),
        np.array([1.0, 0.3, 0.05]),
        1e-3,
    )  # untrained, off
    mean, variance, estimated, matched = batchnorm_statistics(
        old_mean, old_variance, eps, _moments(x_dense), _moments(x_pruned)
    )
    assert matched.tolist() == [True, False, True] and estimated.tolist() == [False, True, False]
    y_dense = (x_dense - old_mean) / np.sqrt(old_variance + eps)
    y_pruned = (x_pruned - mean) / np.sqrt(variance + eps)
    np.testing.assert_allclose(y_pruned.mean(0)[matched], y_dense.mean(0)[matched], atol=1e-9)
    np.testing.assert_allclose(y_pruned.var(0)[matched], y_dense.var(0)[matched], rtol=1e-9)
