"""Dense vs effective multiply-accumulates from kernel shapes, nonzero counts and output sizes. No TensorFlow."""

from __future__ import annotations

import json

import pytest

from worker.evaluation.flops import SPARSE_NOTE, estimate_flops, flops_totals, infer_kind


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {row["name"]: row for row in rows}


def test_dense_and_conv_macs_follow_the_textbook_formulas() -> None:
    layers = [
        {"name": "conv2d/kernel", "shape": [3, 3, 1, 8], "params": 72, "sparsity": 0.5},  # a metrics row
        {"name": "dense/kernel", "shape": [512, 32]},
        {"name": "dense_1/kernel", "shape": [32, 10]},
    ]
    nonzero = {"conv2d/kernel": 36, "dense/kernel": 1024, "dense_1/kernel": 320}
    rows = by_name(estimate_flops(layers, nonzero, {"conv2d/kernel": [8, 8]}))
    conv, dense = rows["conv2d/kernel"], rows["dense/kernel"]
    assert conv["kind"] == "conv2d" and conv["positions"] == 64 and conv["shape"] == [3, 3, 1, 8]
    assert conv["dense_macs"] == 3 * 3 * 1 * 8 * 8 * 8
    assert conv["effective_macs"] == conv["dense_macs"] * 36 // 72
    assert conv["macs_per_position"] == 72 and conv["effective_macs_per_position"] == 36
    assert conv["note"] is None
    assert dense["kind"] == "dense" and dense["dense_macs"] == 512 * 32
    assert dense["effective_macs"] == 1024
    assert "flat input" in dense["note"]
    assert rows["dense_1/kernel"]["effective_macs"] == rows["dense_1/kernel"]["dense_macs"] == 320
    json.dumps(list(rows.values()), allow_nan=False)


def test_unknown_output_size_gives_per_position_numbers_only() -> None:
    (row,) = estimate_flops(
        [{"name": "block/conv/kernel", "shape": [3, 3, 16, 32]}], {"block/conv/kernel": 100}
    )
    assert row["dense_macs"] is None and row["effective_macs"] is None and row["positions"] is None
    assert row["macs_per_position"] == 3 * 3 * 16 * 32
    assert row["effective_macs_per_position"] == 100
    assert "output spatial size unknown" in row["note"]


def test_without_nonzero_counts_effective_numbers_are_unknown() -> None:
    (row,) = estimate_flops([{"name": "w", "shape": [4, 5]}])
    assert row["dense_macs"] == 20
    assert (
        row["nonzero"] is None
        and row["effective_macs"] is None
        and row["effective_macs_per_position"] is None
    )


@pytest.mark.parametrize(
    ("name", "shape", "kind"),
    [
        ("dense/kernel", [8, 4], "dense"),
        ("hidden_w", [64, 32], "dense"),
        ("embedding/embeddings", [1000, 16], "embedding"),
        ("sep/depthwise_kernel", [3, 3, 8, 1], "depthwise_conv2d"),
        ("up/conv2d_transpose/kernel", [3, 3, 4, 8], "conv2d_transpose"),
        ("conv2d/kernel", [3, 3, 1, 8], "conv2d"),
        ("conv1d/kernel", [5, 8, 16], "conv1d"),
        ("conv3d/kernel", [3, 3, 3, 2, 4], "conv3d"),
        ("mha/query/kernel", [64, 4, 16], "unknown"),  # EinsumDense: rank 3 but not a convolution
        ("scalar_like", [7], "unknown"),
    ],
)
def test_kind_inference(name: str, shape: list[int], kind: str) -> None:
    assert infer_kind(name, shape) == kind


@pytest.mark.parametrize(
    ("name", "shape", "kind"),
    [
        ("text_embedding_head/dense/kernel", [16, 4], "dense"),  # a Dense inside a model named "embedding"
        ("embedding_model/dense_3/kernel", [8, 8], "dense"),
        ("embedding_model/embedding/embeddings", [40, 8], "embedding"),
        ("my_lstm/lstm/lstm_cell/kernel", [4, 32], "dense"),  # recurrent: one step of [in, 4 * units]
        ("gru/bias", [2, 96], "unknown"),  # a GRU's rank-2 bias is no kernel
    ],
)
def test_kinds_come_from_the_pruning_classifier(name: str, shape: list[int], kind: str) -> None:
    """One kernel-kind truth: flops reads the layer and leaf of a name as ``granularity.infer_kind`` does, never
    a word anywhere in the model's path, so a Dense kernel is counted whatever its model is called."""
    assert infer_kind(name, shape) == kind
    (row,) = estimate_flops([{"name": name, "shape": shape}])
    assert (row["dense_macs"] is not None) == (kind == "dense")


def test_other_kinds_count_or_refuse_honestly() -> None:
    layers = [
        {"name": "embedding/embeddings", "shape": [1000, 16]},
        {"name": "mha/query/kernel", "shape": [64, 4, 16]},
        {"name": "sep/depthwise_kernel", "shape": [3, 3, 8, 2]},
        {"name": "up/conv2d_transpose/kernel", "shape": [3, 3, 4, 8]},
        {"name": "conv1d/kernel", "shape": [5, 8, 16]},
        {"name": "tokens/kernel", "shape": [16, 16], "kind": "dense"},
        {"name": "odd", "shape": [2, 3, 4], "kind": "conv1d"},  # an explicit kind beats the name
    ]
    spatial = {
        "sep/depthwise_kernel": [4, 4],
        "up/conv2d_transpose/kernel": [5, 5],
        "conv1d/kernel": [20],
        "tokens/kernel": [12],
        "odd": [7],
    }
    rows = by_name(estimate_flops(layers, None, spatial))
    for lookup in ("embedding/embeddings", "mha/query/kernel"):
        assert rows[lookup]["dense_macs"] is None and rows[lookup]["macs_per_position"] is None
        assert "no multiply-adds" in rows[lookup]["note"]
    assert rows["sep/depthwise_kernel"]["dense_macs"] == 3 * 3 * 8 * 2 * 16
    assert rows["up/conv2d_transpose/kernel"]["dense_macs"] == 3 * 3 * 4 * 8 * 25  # per INPUT pixel
    assert rows["conv1d/kernel"]["dense_macs"] == 5 * 8 * 16 * 20
    assert rows["tokens/kernel"]["dense_macs"] == 16 * 16 * 12  # a Dense over 12 tokens
    assert rows["odd"]["kind"] == "conv1d" and rows["odd"]["dense_macs"] == 24 * 7
    transposed = estimate_flops([{"name": "up/conv2d_transpose/kernel", "shape": [3, 3, 4, 8]}])
    assert "input spatial size unknown" in transposed[0]["note"]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="nonzero"):
        estimate_flops([{"name": "w", "shape": [2, 2]}], {"w": 5})
    with pytest.raises(ValueError, match="2 positive spatial sizes"):
        estimate_flops([{"name": "conv/kernel", "shape": [3, 3, 1, 1]}], None, {"conv/kernel": [8]})
    with pytest.raises(ValueError, match="unknown kind"):
        estimate_flops([{"name": "w", "shape": [2, 2], "kind": "lstm"}])


def test_totals_count_known_layers_and_name_the_rest() -> None:
    rows = estimate_flops(
        [
            {"name": "conv/kernel", "shape": [3, 3, 1, 4]},  # no spatial size: uncounted
            {"name": "a/kernel", "shape": [10, 10]},
            {"name": "b/kernel", "shape": [10, 5]},
            {"name": "emb/embedding", "shape": [50, 10]},
        ],
        {"conv/kernel": 36, "a/kernel": 20},  # b has no count: dense known, effective unknown
    )
    totals = flops_totals(rows)
    assert totals["dense_macs"] == 100 + 50
    assert totals["effective_macs"] == 20
    assert totals["effective_fraction"] == pytest.approx(20 / 100)  # over the layers with both numbers only
    assert totals["counted_layers"] == 2
    assert totals["uncounted"] == ["conv/kernel", "emb/embedding"]
    assert totals["note"] == SPARSE_NOTE and "sparse kernel" in SPARSE_NOTE
    assert flops_totals([])["effective_fraction"] is None
