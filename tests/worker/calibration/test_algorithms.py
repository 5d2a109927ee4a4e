"""SparseGPT and Wanda on a random linear layer, NumPy only (no TensorFlow import: fast).

The claim each test checks is the paper's: from the same calibration inputs, the output reconstruction error
``||XW - XW'||`` is clearly smaller with SparseGPT than with magnitude pruning at 50% and 2:4, and Wanda is no
worse than magnitude when a few input features carry outliers.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from worker.pruning.calibration.sparsegpt import sparsegpt_prune, unstructured_count
from worker.pruning.calibration.wanda import input_norms, per_output_ranks, wanda_scores
from worker.pruning.granularity import NM, Unstructured

D_IN, D_OUT, N = 64, 32, 1024


def _layer(seed: int, outliers: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Correlated inputs (a random mixing of fewer latent factors, unequal feature scales) and a weight."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(N, 24))
    x = latent @ rng.normal(size=(24, D_IN)) + 0.3 * rng.normal(size=(N, D_IN))
    x *= rng.uniform(0.2, 2.0, size=D_IN)
    if outliers:
        x[:, rng.choice(D_IN, 4, replace=False)] *= 25.0
    w = rng.normal(size=(D_IN, D_OUT))
    return x.astype(np.float32), w.astype(np.float32)


def _error(x: np.ndarray, w: np.ndarray, pruned: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64) @ w - x.astype(np.float64) @ pruned))


def _magnitude(w: np.ndarray, granularity: object, target: float) -> np.ndarray:
    keep = granularity.mask(np.abs(w), "dense", target)  # type: ignore[attr-defined]
    return np.where(keep, w, 0.0)


def _sparsegpt(x: np.ndarray, w: np.ndarray, **kw: object) -> tuple[np.ndarray, np.ndarray]:
    h = x.astype(np.float64).T @ x.astype(np.float64)
    new, pruned, _, _ = sparsegpt_prune(w.T, h, **kw)  # type: ignore[arg-type]
    return new.T, ~pruned.T


@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_beats_magnitude_at_half(seed: int) -> None:
    x, w = _layer(seed)
    new, keep = _sparsegpt(x, w, target=0.5)
    assert int((~keep).sum()) == unstructured_count(w.size, 0.5)
    assert np.all(new[~keep] == 0)
    mag = _error(x, w, _magnitude(w, Unstructured(), 0.5))
    obs = _error(x, w, new)
    assert obs < 0.6 * mag, (obs, mag)


@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_beats_magnitude_at_2_4(seed: int) -> None:
    x, w = _layer(seed)
    new, keep = _sparsegpt(x, w, nm=(2, 4))
    groups = keep.reshape(D_IN // 4, 4, D_OUT).sum(axis=1)
    assert np.all(groups == 2)  # exactly 2 of every 4 consecutive inputs per output
    assert np.array_equal(NM(2, 4).mask(np.where(keep, 1.0, 0.0), "dense", 0.5), keep)
    mag = _error(x, w, _magnitude(w, NM(2, 4), 0.5))
    obs = _error(x, w, new)
    assert obs < 0.7 * mag, (obs, mag)


def test_sparsegpt_nm_segments_and_tails() -> None:
    """N:M groups restart in every segment (cin of each (kh, kw)); a tail of 2 < M keeps at most N of them."""
    rng = np.random.default_rng(3)
    rows, segment, segments = 5, 6, 3
    w = rng.normal(size=(rows, segment * segments))
    x = rng.normal(size=(200, segment * segments))
    _, pruned, _, _ = sparsegpt_prune(w, x.T @ x, nm=(3, 4), segment=segment, blocksize=7)
    per = (~pruned).reshape(rows, segments, segment)
    assert np.all(per[:, :, :4].sum(-1) == 1) and np.all(per[:, :, 4:].sum(-1) == 1)
    # the granularity reads the same pattern from the variable's (kh*kw, cin, out) view
    kernel_keep = (~pruned).T.reshape(1, segments, segment, rows)
    assert np.array_equal(NM(1, 4).mask(kernel_keep.astype(float), "conv", 0.75), kernel_keep)


def test_sparsegpt_blocks_and_dead_inputs() -> None:
    """Blocks smaller than the width give the same count; an input that is always zero is no problem."""
    x, w = _layer(4)
    x[:, 3] = 0.0
    h = x.astype(np.float64).T @ x.astype(np.float64)
    for blocksize in (16, 128):
        new, pruned, error, damp = sparsegpt_prune(w.T, h, target=0.7, blocksize=blocksize)
        assert int(pruned.sum()) == unstructured_count(w.size, 0.7)
        assert np.isfinite(new).all() and error >= 0 and damp == pytest.approx(0.01)


def test_wanda_no_worse_than_magnitude_with_outlier_features() -> None:
    for seed in range(3):
        x, w = _layer(seed, outliers=True)
        use = SimpleNamespace(in_axes=(0,), kind="matmul")
        stats = input_norms((x.astype(np.float64) ** 2).sum(0), N, w.shape, use)
        assert stats.norms.shape == (D_IN, 1) and stats.row_axes == (0,)
        scores = per_output_ranks(wanda_scores(w, stats), stats.row_axes)
        keep = Unstructured().mask(scores, "dense", 0.5)
        assert np.all(keep.sum(axis=0) == D_IN // 2)  # per output: half of its inputs
        wanda = _error(x, w, np.where(keep, w, 0.0))
        mag = _error(x, w, _magnitude(w, Unstructured(), 0.5))
        assert wanda <= mag, (seed, wanda, mag)
        nm_keep = NM(2, 4).mask(wanda_scores(w, stats), "dense", 0.5)
        assert _error(x, w, np.where(nm_keep, w, 0.0)) <= _error(x, w, _magnitude(w, NM(2, 4), 0.5))


def test_input_norms_on_conv_and_depthwise_axes() -> None:
    conv = SimpleNamespace(in_axes=(0, 1, 2), kind="conv2d")
    sq = np.arange(2 * 2 * 3, dtype=np.float64)
    stats = input_norms(sq, 10, (2, 2, 3, 5), conv)
    assert stats.norms.shape == (2, 2, 3, 1)
    assert stats.norms[1, 0, 2, 0] == pytest.approx(np.sqrt(sq.reshape(2, 2, 3)[1, 0, 2]))
    depthwise = SimpleNamespace(in_axes=(0, 1, 2), kind="depthwise")
    assert input_norms(sq, 10, (2, 2, 3, 1), depthwise).row_axes == (0, 1)
    transposed = SimpleNamespace(in_axes=(1,), kind="matmul")  # a (out, in) matrix read with transpose_b
    assert input_norms(np.arange(4.0), 1, (3, 4), transposed).norms.shape == (1, 4)


def test_per_output_ranks_keeps_pruned_first() -> None:
    score = np.array([[1.0, 5.0], [3.0, -np.inf], [2.0, 4.0]])
    ranks = per_output_ranks(score, (0,))
    assert ranks[:, 0].tolist() == pytest.approx([1 / 3, 1.0, 2 / 3])
    assert ranks[1, 1] == -np.inf and ranks[0, 1] == 1.0
