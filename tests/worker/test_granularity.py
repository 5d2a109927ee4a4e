"""Granularities on small arrays with hand-checkable masks: kinds, channel, N:M, block, layouts, helpers."""

from __future__ import annotations

import numpy as np
import pytest

from worker.pruning.granularity import (
    NM,
    Block,
    Channel,
    TileLayout,
    Unstructured,
    bias_keep_mask,
    check_nm_target,
    get_granularity,
    infer_kind,
    infer_kinds,
    nm_achieved_sparsity,
    nm_sparsity,
    paired_bias,
    parse_nm,
)
from worker.pruning.scope import layer_masks

T, F = True, False

# ---------------------------------------------------------------- kinds

# Names and shapes as restored from a Keras 3 export / tf_keras SavedModel (probed on TF 2.21, Keras 3.15).
KERAS_VARIABLES = {
    "conv2d/kernel": ([3, 3, 3, 4], "conv"),
    "conv2d/bias": ([4], "vector"),
    "depthwise_conv2d/kernel": ([3, 3, 4, 2], "depthwise"),  # Keras 3 spelling
    "dw2/depthwise_conv2d/depthwise_kernel": ([3, 3, 4, 2], "depthwise"),  # Keras 2 spelling
    "separable_conv2d/depthwise_kernel": ([3, 3, 8, 1], "depthwise"),
    "separable_conv2d/pointwise_kernel": ([1, 1, 8, 5], "conv"),
    "conv2d_transpose/kernel": ([3, 3, 3, 5], "conv_transpose"),
    "conv3d/kernel": ([2, 2, 2, 1, 2], "conv"),
    "conv1d/kernel": ([3, 24, 4], "conv"),
    "embedding/embeddings": ([10, 3], "embedding"),
    "lstm/lstm_cell/kernel": ([4, 12], "recurrent"),
    "lstm/lstm_cell/recurrent_kernel": ([3, 12], "recurrent"),
    "gru/gru_cell/kernel": ([3, 6], "recurrent"),
    "gru/gru_cell/bias": ([2, 6], "bias"),
    "conv_lstm2d/kernel:0": ([3, 3, 2, 12], "recurrent"),  # Keras 2 spelling
    "conv_lstm2d/conv_lstm_cell/kernel": ([3, 3, 2, 12], "recurrent"),
    "bidirectional/backward_lstm/lstm_cell/kernel": ([3, 8], "recurrent"),
    "simple_rnn/simple_rnn_cell/recurrent_kernel": ([2, 2], "recurrent"),
    "dense/kernel": ([2, 2], "dense"),
    "model/dense_1/kernel:0": ([69, 1], "dense"),
    "hidden_w": ([64, 32], "dense"),  # plain tf.Module
    "multi_head_attention/query/kernel": ([8, 2, 4], "einsum"),
    "batch_normalization/gamma": ([4], "vector"),
    "weird": ([1, 1, 1, 1, 1, 1], "other"),
}


@pytest.mark.parametrize("name", sorted(KERAS_VARIABLES))
def test_infer_kind_from_keras_names_and_shapes(name: str) -> None:
    shape, kind = KERAS_VARIABLES[name]
    assert infer_kind(name, shape) == kind


def test_bias_shape_reveals_renamed_depthwise_and_transposed_convs() -> None:
    shapes = {
        "a/kernel": [3, 3, 4, 2],  # bias of 8 = in * mult: depthwise
        "a/bias": [8],
        "b/kernel": [3, 3, 3, 5],  # bias of 3 = shape[-2]: transposed
        "b/bias": [3],
        "c/kernel": [3, 3, 4, 2],  # bias of 2 = out: a plain conv
        "c/bias": [2],
        "d/kernel": [3, 3, 4, 2],  # no bias: the name decides (plain conv)
    }
    kernels = {n: s for n, s in shapes.items() if n.endswith("kernel")}
    assert infer_kinds(kernels, shapes) == {
        "a/kernel": "depthwise",
        "b/kernel": "conv_transpose",
        "c/kernel": "conv",
        "d/kernel": "conv",
    }


def test_paired_bias_follows_keras_naming() -> None:
    names = {
        "conv/kernel",
        "conv/bias",
        "sep/depthwise_kernel",
        "sep/pointwise_kernel",
        "sep/bias",
        "dw/depthwise_kernel",
        "dw/bias",
        "lstm/cell/recurrent_kernel",
        "lstm/cell/bias",
        "nobias/kernel",
        "d/kernel:0",
        "d/bias:0",
    }
    assert paired_bias("conv/kernel", names) == "conv/bias"
    assert paired_bias("sep/pointwise_kernel", names) == "sep/bias"
    assert paired_bias("sep/depthwise_kernel", names) is None  # the bias follows the pointwise step
    assert paired_bias("dw/depthwise_kernel", names) == "dw/bias"  # a Keras 2 DepthwiseConv2D
    assert paired_bias("lstm/cell/recurrent_kernel", names) is None
    assert paired_bias("nobias/kernel", names) is None
    assert paired_bias("d/kernel:0", names) == "d/bias:0"
    assert paired_bias("kernel", {"kernel", "bias"}) == "bias"
    assert paired_bias("hidden_w", {"hidden_w", "hidden_b"}) is None


# ---------------------------------------------------------------- layouts


def test_tile_layout_edge_tiles_sizes_scores_and_expand() -> None:
    layout = TileLayout((5, 3), (5, 3), (2, 2))
    assert layout.grid == (3, 2) and layout.n_groups == 6
    np.testing.assert_array_equal(layout.sizes(), [4, 2, 4, 2, 2, 1])
    scores = np.arange(15.0).reshape(5, 3)
    sums, sizes = layout.group_scores(scores, "sum")
    # Group (0,0) = 0+1+3+4, (0,1) = 2+5, (2,1) = 14.
    assert sums[0] == 8 and sums[1] == 7 and sums[5] == 14
    means, _ = layout.group_scores(scores, "mean")
    np.testing.assert_allclose(means, sums / sizes)
    keep = layout.expand(np.array([T, F, T, T, T, F]))
    expected = np.ones((5, 3), bool)
    expected[0:2, 2] = False
    expected[4, 2] = False
    np.testing.assert_array_equal(keep, expected)
    np.testing.assert_array_equal(layout.removed(keep), [F, T, F, F, F, T])
    with pytest.raises(ValueError, match="view"):
        TileLayout((2, 3), (7,), (1,))


# ---------------------------------------------------------------- channel

CONV = np.zeros((1, 2, 2, 3))  # [kh, kw, in, out]
CONV[..., 0] = 1.0  # L1 sum 4
CONV[..., 1] = -0.25  # L1 sum 1
CONV[..., 2] = [[[3.0, -3.0], [0.0, 0.0]]]  # L1 sum 6


@pytest.mark.parametrize(
    ("target", "removed"),
    [
        (1 / 3, [1]),  # wanted 4 weights = exactly one channel: the weakest (sum 1)
        (0.5, [1]),  # wanted 6: one channel (4) and two (8) are equally near; fewer wins
        (0.6, [1, 0]),  # wanted round(7.2) = 7: two channels (8) are nearest
        (0.99, [1, 0]),  # the guard keeps the best channel below a target of 1
        (1.0, [0, 1, 2]),
    ],
)
def test_channel_mask_on_known_conv_kernel(target: float, removed: list[int]) -> None:
    keep = Channel().mask(np.abs(CONV), "conv", target)
    for c in range(3):
        assert (keep[..., c] == (c not in removed)).all()


def test_channel_counting_is_in_weights_nearest_whole_channels() -> None:
    scores = np.broadcast_to(
        np.arange(1.0, 9.0), (3, 3, 1, 8)
    )  # 8 channels of 9 weights, channel c scores c+1
    for target, channels in ((0.5, 4), (0.9, 7), (0.1, 1), (0.05, 0)):
        keep = Channel().mask(scores, "conv", target)
        gone = [c for c in range(8) if not keep[..., c].any()]
        assert gone == list(range(channels)), target
        assert keep.sum() == 9 * (8 - channels)  # whole channels only


def test_channel_depthwise_groups_in_times_mult_in_tensorflow_order() -> None:
    kernel = np.zeros((2, 1, 2, 2))  # [kh, kw, in, mult]; output channel c * mult + m
    kernel[:, :, 0, 0], kernel[:, :, 0, 1], kernel[:, :, 1, 0], kernel[:, :, 1, 1] = 5.0, 1.0, 0.5, 3.0
    layout = Channel().layout("depthwise", kernel.shape)
    sums, sizes = layout.group_scores(kernel, "sum")
    np.testing.assert_array_equal(sums, [10.0, 2.0, 1.0, 6.0])
    np.testing.assert_array_equal(sizes, [2, 2, 2, 2])
    keep = Channel().mask(kernel, "depthwise", 0.5)
    assert keep[:, :, 0, 0].all() and keep[:, :, 1, 1].all()
    assert not keep[:, :, 0, 1].any() and not keep[:, :, 1, 0].any()
    np.testing.assert_array_equal(bias_keep_mask(layout, keep, (4,)), [T, F, F, T])
    assert bias_keep_mask(layout, keep, (2, 6)) is None  # not one entry per channel: not paired


def test_channel_conv_transpose_uses_axis_minus_two() -> None:
    kernel = np.zeros((1, 1, 3, 2))  # [kh, kw, out, in]
    kernel[0, 0] = [[1.0, 1.0], [0.1, 0.1], [2.0, -2.0]]
    keep = Channel().mask(np.abs(kernel), "conv_transpose", 1 / 3)
    np.testing.assert_array_equal(keep[0, 0], [[T, T], [F, F], [T, T]])


def test_channel_dense_columns_and_skips() -> None:
    w = np.array([[1.0, 0.1, 2.0], [1.0, 0.2, -2.0]])
    np.testing.assert_array_equal(Channel().mask(np.abs(w), "dense", 0.3), [[T, F, T], [T, F, T]])
    g = Channel()
    assert (
        g.skip_reason("bias", (2, 6)) and g.skip_reason("vector", (4,)) and g.skip_reason("einsum", (8, 2, 4))
    )
    assert g.skip_reason("depthwise", (3, 3, 4, 2)) is None
    assert g.zeroes_bias("conv") and g.zeroes_bias("depthwise") and not g.zeroes_bias("recurrent")


# ---------------------------------------------------------------- N:M

W44 = np.array(
    [
        [0.1, -5.0, 3.0, 1.0],
        [-0.4, 0.2, -3.0, 2.0],
        [2.0, 0.3, 0.5, -0.1],
        [-1.0, 4.0, 0.6, 0.0],
    ]
)


def test_two_four_on_a_known_dense_matrix() -> None:
    # Dense [in=4, out=4]: each column is one group of 4 along the input axis; keep its 2 largest |w|.
    keep = NM(2, 4).mask(np.abs(W44), "dense", 0.5)
    np.testing.assert_array_equal(keep, [[F, T, T, T], [F, F, T, T], [T, F, F, F], [T, T, F, F]])
    keep14 = NM(1, 4).mask(np.abs(W44), "dense", 0.75)
    # Column 2 ties |3| = |-3|: the lower index is pruned first, row 1 stays.
    np.testing.assert_array_equal(keep14, [[F, T, F, F], [F, F, T, T], [T, F, F, F], [F, F, F, F]])


def test_nm_groups_run_along_the_input_axis_of_each_kind() -> None:
    conv = np.arange(1.0, 9.0).reshape(1, 1, 8, 1)  # [kh, kw, in=8, out=1]: groups [1..4] and [5..8]
    keep = NM(2, 4).mask(conv, "conv", 0.5)
    np.testing.assert_array_equal(keep.reshape(-1), [F, F, T, T, F, F, T, T])
    transposed = np.arange(1.0, 9.0).reshape(1, 1, 1, 8)  # [kh, kw, out=1, in=8]: axis -1
    np.testing.assert_array_equal(NM(2, 4).mask(transposed, "conv_transpose", 0.5), keep.reshape(1, 1, 1, 8))


@pytest.mark.parametrize(("length", "pruned"), [(6, 2), (7, 3), (8, 4), (5, 2), (3, 1)])
def test_nm_tail_group_keeps_at_most_n(length: int, pruned: int) -> None:
    scores = np.arange(1.0, length + 1)[:, None]  # a [length, 1] dense kernel
    keep = NM(2, 4).mask(scores, "dense", 0.5)
    assert int((~keep).sum()) == pruned
    assert nm_achieved_sparsity(2, 4, length) == pytest.approx(pruned / length)
    padded = np.concatenate([keep[:, 0], np.zeros(-length % 4, bool)])
    assert (padded.reshape(-1, 4).sum(axis=1) <= 2).all()  # valid 2:4 once padded with zeros


def test_nm_ties_nan_and_monotone_minus_inf() -> None:
    np.testing.assert_array_equal(NM(2, 4).mask(np.ones((4, 1)), "dense", 0.5)[:, 0], [F, F, T, T])
    scores = np.array([[5.0], [np.nan], [1.0], [2.0]])
    np.testing.assert_array_equal(NM(2, 4).mask(scores, "dense", 0.5)[:, 0], [T, F, F, T])
    already = np.array([[5.0], [-np.inf], [1.0], [2.0]])  # index 1 pruned earlier
    np.testing.assert_array_equal(NM(2, 4).mask(already, "dense", 0.25)[:, 0], [T, F, T, T])


def test_nm_target_sets_weights_removed_per_group() -> None:
    g = NM(2, 4)
    assert [g.per_group(t) for t in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0)] == [0, 0, 1, 2, 2, 2]
    scores = np.abs(W44)
    assert int((~g.mask(scores, "dense", 0.25)).sum()) == 4  # 3:4 on the way to 2:4
    assert int((~g.mask(scores, "dense", 0.9)).sum()) == 8  # never beyond N:M


def test_nm_skips_kinds_without_a_reduction_axis() -> None:
    g = NM(2, 4)
    assert "depthwise" in (g.skip_reason("depthwise", (3, 3, 8, 1)) or "")
    assert g.skip_reason("bias", (2, 8)) and g.skip_reason("vector", (8,))
    assert "length 2" in (g.skip_reason("dense", (2, 10)) or "")
    assert g.skip_reason("conv", (3, 3, 1, 8)) is not None  # a first conv on one input channel
    assert g.skip_reason("embedding", (10, 3)) is None and g.skip_reason("recurrent", (4, 12)) is None


def test_nm_helpers_for_the_api() -> None:
    assert parse_nm("2:4") == (2, 4) and parse_nm("block") is None and parse_nm("2:4:8") is None
    assert nm_sparsity(2, 4) == 0.5 and nm_sparsity(1, 4) == 0.75 and nm_sparsity(4, 8) == 0.5
    check_nm_target(0.5, 2, 4)
    check_nm_target(0.5 + 1e-10, 2, 4)
    check_nm_target(1 - 3 / 7, 3, 7)
    with pytest.raises(ValueError, match=r"0\.75"):
        check_nm_target(0.5, 1, 4)
    with pytest.raises(ValueError):
        check_nm_target(0.5 + 1e-8, 2, 4)
    with pytest.raises(ValueError):
        NM(4, 4)


# ---------------------------------------------------------------- block

S44 = np.array(
    [
        [9.0, 9.0, 20.0, 2.0],
        [9.0, 9.0, 2.0, 1.0],
        [0.0, 1.0, 8.0, 8.0],
        [1.0, 0.0, 8.0, 8.0],
    ]
)


def test_block_two_by_two_on_a_known_matrix() -> None:
    # Block means: (0,0) 9, (0,1) 6.25, (1,0) 0.5, (1,1) 8 -> half the weights = the two lowest blocks.
    keep = Block((2, 2)).mask(S44, "dense", 0.5)
    np.testing.assert_array_equal(keep, [[T, T, F, F], [T, T, F, F], [F, F, T, T], [F, F, T, T]])
    # Unstructured at the same target would keep the 20: blocks go whole.
    assert layer_masks({"w": S44}, {"w": 0.5})["w"][0, 2]


def test_block_edges_rank_by_mean_and_count_real_weights() -> None:
    scores = np.full((3, 3), 2.0)
    scores[0:2, 2] = 3.0  # edge block (0,1): 2 weights, sum 6 but mean 3 > full block (0,0)'s mean 2
    keep = Block((2, 2)).mask(scores, "dense", 0.4)  # wanted round(3.6) = 4 weights: one full block
    np.testing.assert_array_equal(keep, [[F, F, T], [F, F, T], [T, T, T]])
    corner = np.ones((5, 3))
    corner[4, 2], corner[0:2, 2] = 0.1, 0.2  # the 1-weight corner, then the 2-weight edge block
    keep = Block((2, 2)).mask(corner, "dense", 0.2)  # wanted 3 = 1 + 2
    assert int((~keep).sum()) == 3 and not keep[4, 2] and not keep[0:2, 2].any()


def test_block_on_conv_kernels_uses_the_gemm_matrix() -> None:
    conv = S44.reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(
        Block((2, 2)).mask(conv, "conv", 0.5).reshape(4, 4), Block((2, 2)).mask(S44, "dense", 0.5)
    )
    assert Block().block_shape == (4, 4) and Block((1, 4)).label == "block 1x4"
    assert Block().skip_reason("depthwise", (3, 3, 4, 1)) and Block().skip_reason("vector", (3,))
    with pytest.raises(ValueError, match="block_shape"):
        Block((0, 2))


# ---------------------------------------------------------------- registry


def test_unstructured_matches_layer_masks() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 5, 4))
    np.testing.assert_array_equal(
        Unstructured().mask(scores, "conv", 0.37), layer_masks({"w": scores}, {"w": 0.37})["w"]
    )


def test_get_granularity_parses_spec_values() -> None:
    assert get_granularity("unstructured") == Unstructured()
    assert get_granularity("channel") == Channel()
    assert get_granularity("2:4") == NM(2, 4) and get_granularity("2:4").label == "2:4"
    assert get_granularity("block", block_shape=[2, 8]) == Block((2, 8))
    assert get_granularity("block") == Block((4, 4))
    with pytest.raises(ValueError, match="block_shape"):
        get_granularity("channel", block_shape=(2, 2))
    with pytest.raises(ValueError, match="known"):
        get_granularity("filter")
