"""Transformer structure: attention heads (Keras 3 and tf_keras MultiHeadAttention) and MLP widths (plain and
gated) are channel groups; removing them changes the kernels' shapes and the reshape constants, and the
compact model computes what the masked one does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.worker.structure.helpers import check_artifact, mask_groups, randomize
from worker.models import load_model
from worker.structure import compact, find_groups, max_abs_diff, probe_inputs

pytestmark = pytest.mark.tf


def _group(analysis, variable: str, role: str = "producer"):
    return next(
        g for g in analysis.groups if any(m.variable == variable and m.role == role for m in g.members)
    )


def _roles(group) -> set[tuple[str, int, str]]:
    return {(m.variable, m.axis, m.role) for m in group.members}


HEAD_MEMBERS = {
    ("attn/query/kernel", 1, "producer"),
    ("attn/key/kernel", 1, "producer"),
    ("attn/value/kernel", 1, "producer"),
    ("attn/query/bias", 0, "carrier"),
    ("attn/key/bias", 0, "carrier"),
    ("attn/value/bias", 0, "carrier"),
    ("attn/attention_output/kernel", 0, "consumer"),
}


@pytest.mark.parametrize("kind", ["transformer", "transformer_dynamic"])
def test_keras3_heads_and_mlp_widths(model_dirs, tmp_path: Path, kind: str) -> None:
    """One group per attention layer (a head's q, k, v slices + biases + the output projection's rows), one per
    MLP (the gated one couples gate and up); the residual width stays whole (LayerNorm)."""
    original = load_model(model_dirs[kind])
    handle = load_model(model_dirs[kind])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    heads = _group(analysis, "attn/query/kernel")
    assert heads.prunable and heads.channels == 4
    assert _roles(heads) == HEAD_MEMBERS
    ffn, gated = _group(analysis, "ffn1/kernel"), _group(analysis, "gate/kernel")
    assert ffn.prunable and ("ffn2/kernel", 0, "consumer") in _roles(ffn)
    assert gated.prunable and {("up/kernel", 1, "producer"), ("down/kernel", 0, "consumer")} <= _roles(gated)
    residual = _group(analysis, "embed/kernel")
    assert not residual.prunable and "normalised" in residual.reason

    keep = mask_groups(handle, analysis)
    x = probe_inputs(analysis.frozen["serving_default"], batch=3, seed=7)
    result = compact(handle, analysis, keep, tmp_path / "compact", inputs=x)
    check_artifact(handle, result)
    assert result.shapes["attn/query/kernel"] == ([16, 4, 4], [16, 2, 4])
    assert result.shapes["attn/attention_output/kernel"] == ([4, 4, 16], [2, 4, 16])
    assert result.shapes["attn/value/bias"] == ([4, 4], [2, 4])
    assert result.shapes["ffn1/kernel"] == ([16, 32], [16, 16])
    assert result.shapes["up/kernel"] == ([16, 24], [16, 12])
    assert result.channels[heads.id] == (4, 2)
    assert result.params_after < 0.7 * result.params_before
    # Not degenerate: the unmasked model differs; other sequence lengths work too when dynamic.
    assert max(max_abs_diff(original, result.out_dir, x).values()) > 1e-3
    if kind == "transformer_dynamic":
        longer = {"tokens": np.random.default_rng(3).standard_normal((2, 11, 8)).astype(np.float32)}
        assert max(max_abs_diff(handle, result.out_dir, longer).values()) < 1e-5


def test_heads_whose_biases_stay_are_kept(model_dirs, tmp_path: Path) -> None:
    """Only the kernels zeroed: a removed head would still add its value bias (softmax-averaged) to the
    output, a constant the merged output projection cannot absorb; the heads stay and the notes say so."""
    handle = load_model(model_dirs["transformer"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    heads = _group(analysis, "attn/query/kernel")
    keep = mask_groups(handle, analysis, carriers=False, only={heads.id})
    result = compact(handle, analysis, keep, tmp_path / "compact")
    assert result.channels[heads.id] == (4, 4)
    assert any(heads.id in n and "kept" in n for n in result.notes)
    check_artifact(handle, result)


def test_keras2_multi_head_attention(model_dirs, tmp_path: Path) -> None:
    handle = load_model(model_dirs["keras2_attention"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    heads = _group(analysis, "attn/query/kernel")
    assert heads.prunable and heads.channels == 3, heads.reason
    keep = mask_groups(handle, analysis, fraction=0.34, only={heads.id})
    result = compact(handle, analysis, keep, tmp_path / "compact")
    check_artifact(handle, result)
    assert result.channels[heads.id] == (3, 2)


def test_grouped_query_attention_keeps_whole_key_value_groups(model_dirs, tmp_path: Path) -> None:
    """4 query heads over 2 key/value heads: a channel of the group is one key/value head with the 2 query
    heads that read it (query kernel positions ``(2, 2)``); removing one removes all three."""
    handle = load_model(model_dirs["gqa"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    group = _group(analysis, "gqa/key/kernel")
    assert group.prunable and group.channels == 2, group.reason
    query = next(m for m in group.members if m.variable == "gqa/query/kernel")
    assert query.role == "producer" and query.positions.tolist() == [[0, 1], [2, 3]]
    keep = mask_groups(handle, analysis, only={group.id})
    result = compact(handle, analysis, keep, tmp_path / "compact")
    check_artifact(handle, result)
    assert result.shapes["gqa/query/kernel"] == ([16, 4, 4], [16, 2, 4])
    assert result.shapes["gqa/key/kernel"] == ([16, 2, 4], [16, 1, 4])
    assert result.shapes["gqa/attention_output/kernel"] == ([4, 4, 16], [2, 4, 16])


@pytest.mark.parametrize("carriers", [True, False], ids=["zeroed", "value-bias-folded"])
def test_matmul_attention_in_a_plain_module(model_dirs, tmp_path: Path, carriers: bool) -> None:
    """Attention written with tf.matmul and transposes: the 2-D projections' units become heads of head_dim
    units (positions ``(4, 4)``); with the biases kept, a removed head leaves its value bias, a constant the
    2-D output projection folds into a new bias."""
    handle = load_model(model_dirs["tf_module_attention"])
    analysis = find_groups(handle, "serving_default")
    heads = _group(analysis, "wq")
    assert heads.prunable and heads.channels == 4, heads.reason
    assert {(m.variable, m.role) for m in heads.members} == {
        ("wq", "producer"), ("wk", "producer"), ("wv", "producer"), ("bq", "carrier"), ("bv", "carrier"),
        ("wo", "consumer"),
    }  # fmt: skip
    assert all(m.positions.shape == (4, 4) for m in heads.members)
    keep = mask_groups(handle, analysis, carriers=carriers, only={heads.id})
    result = compact(handle, analysis, keep, tmp_path / "compact")
    check_artifact(handle, result)
    assert result.shapes["wq"] == ([16, 16], [16, 8]) and result.shapes["wo"] == ([16, 16], [8, 16])
    assert (result.folded > 0) == (not carriers)


# Token ids with padding (0) at the end of two rows; the last row is one token and five pads.
PADDED_IDS = np.array([[5, 3, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6], [9, 0, 0, 0, 0, 0]], np.int32)


@pytest.mark.parametrize("kind", ["masked_attention", "masked_attention_dynamic"])
def test_heads_under_a_padding_mask(model_dirs, tmp_path: Path, kind: str) -> None:
    """Keras 3 masks the scores with ``SelectV2(mask AND ones_like(scores), scores, -inf)``: the condition has
    the heads axis at full length but is the same for every head (``token_ids != 0`` broadcast), so the heads
    pass through it as through any element-wise op, are one group and go; the compact model computes what
    the masked one does on padded inputs."""
    original = load_model(model_dirs[kind])
    handle = load_model(model_dirs[kind])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    heads = _group(analysis, "attn/query/kernel")
    assert heads.prunable and heads.channels == 4, heads.reason
    assert _roles(heads) == HEAD_MEMBERS
    keep = mask_groups(handle, analysis, only={heads.id})
    x = {"token_ids": PADDED_IDS}
    result = compact(handle, analysis, keep, tmp_path / "compact", inputs=x)
    check_artifact(handle, result)
    assert result.channels[heads.id] == (4, 2)
    assert result.shapes["attn/query/kernel"] == ([16, 4, 4], [16, 2, 4])
    assert result.shapes["attn/attention_output/kernel"] == ([4, 4, 16], [2, 4, 16])
    assert max(max_abs_diff(original, result.out_dir, x).values()) > 1e-3
    if kind == "masked_attention_dynamic":
        longer = {"token_ids": np.array([[4, 8, 15, 16, 0, 0, 0, 0, 0], [7] * 9], np.int32)}
        assert max(max_abs_diff(handle, result.out_dir, longer).values()) < 1e-5


def test_heads_under_a_keras2_padding_mask(model_dirs, tmp_path: Path) -> None:
    """tf_keras adds ``(1 - mask) * -1e9`` to the scores (``AddV2``; the mask has length 1 on the heads
    axis)."""
    handle = load_model(model_dirs["keras2_masked_attention"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    heads = _group(analysis, "attn/query/kernel")
    assert heads.prunable and heads.channels == 3, heads.reason
    keep = mask_groups(handle, analysis, fraction=0.34, only={heads.id})
    result = compact(handle, analysis, keep, tmp_path / "compact", inputs={"token_ids": PADDED_IDS})
    check_artifact(handle, result)
    assert result.channels[heads.id] == (3, 2)


def test_heads_under_a_mask_broadcast_to_the_scores(model_dirs, tmp_path: Path) -> None:
    """A mask input broadcast to the scores' run-time shape (full length on the heads axis) added as
    ``(1 - m) * -1e9`` and multiplied into the probabilities: the same for every head, so the heads go."""
    handle = load_model(model_dirs["tf_module_masked_attention"])
    analysis = find_groups(handle, "serving_default")
    heads = _group(analysis, "wq")
    assert heads.prunable and heads.channels == 4, heads.reason
    keep = mask_groups(handle, analysis, only={heads.id})
    rng = np.random.default_rng(5)
    x = {"x": rng.standard_normal((3, 6, 8)).astype(np.float32), "mask": (PADDED_IDS != 0).astype(np.int32)}
    result = compact(handle, analysis, keep, tmp_path / "compact", inputs=x)
    check_artifact(handle, result)
    assert result.shapes["wq"] == ([16, 16], [16, 8]) and result.shapes["wo"] == ([16, 16], [8, 16])


def test_a_condition_that_carries_the_heads_keeps_them(model_dirs) -> None:
    """A per-head mask input ``[B, 4, T, T]``: removing a head would have to remove its slice of a signature
    input, so the heads stay whole and the group says why."""
    handle = load_model(model_dirs["per_head_mask"])
    analysis = find_groups(handle, "serving_default")
    heads = _group(analysis, "attn/query/kernel")
    assert not heads.prunable and heads.channels == 4
    assert "condition of SelectV2" in heads.reason and "carries channels" in heads.reason
