"""Every graph family of the issue: groups found from the graph, compaction exact vs the masked model,
the artifact reloaded in a fresh process with the same signatures and the smaller variables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.worker.structure.helpers import check_artifact, mask_groups, randomize
from worker.models import keras_to_saved_model, load_model
from worker.structure import compact, find_groups, max_abs_diff, probe_inputs

pytestmark = pytest.mark.tf


def _group(analysis, variable: str, role: str = "producer"):
    return next(
        g for g in analysis.groups if any(m.variable == variable and m.role == role for m in g.members)
    )


def _roles(group) -> set[tuple[str, int, str]]:
    return {(m.variable, m.axis, m.role) for m in group.members}


def _compact(handle, analysis, tmp_path: Path, carriers: bool, **kw):
    keep = mask_groups(handle, analysis, carriers=carriers, **kw)
    assert keep, "no prunable group"
    inputs = probe_inputs(analysis.frozen[analysis.signature], batch=3, seed=7)
    result = compact(handle, analysis, keep, tmp_path / "compact", inputs=inputs)
    check_artifact(handle, result)
    assert result.params_after < result.params_before
    return result


@pytest.mark.parametrize("carriers", [True, False], ids=["zeroed", "constants-folded"])
def test_densenet_concat(model_dirs, tmp_path: Path, carriers: bool) -> None:
    handle = load_model(model_dirs["densenet"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    stem, grow0 = _group(analysis, "stem/kernel"), _group(analysis, "grow0/kernel")
    # The stem's channels sit at offset 0 of both concats, grow0's at offset 6: BN over the concat and the
    # transition conv read them at those positions.
    trans_in = next(m for m in grow0.members if m.variable == "trans/kernel")
    assert trans_in.role == "consumer" and trans_in.positions[:, 0].tolist() == [6, 7, 8, 9]
    assert next(m for m in stem.members if m.variable == "trans_bn/gamma").positions[:, 0].tolist() == list(
        range(6)
    )
    head_in = next(m for m in _group(analysis, "trans/kernel").members if m.variable == "head/kernel")
    assert head_in.positions.shape == (8, 25)  # flatten of 5x5 positions
    result = _compact(handle, analysis, tmp_path, carriers)
    assert result.shapes["trans/kernel"][1][2] < 14
    if not carriers:
        assert result.folded > 0


@pytest.mark.parametrize("carriers", [True, False], ids=["zeroed", "constants-folded"])
def test_mobilenet_inverted_residual(model_dirs, tmp_path: Path, carriers: bool) -> None:
    handle = load_model(model_dirs["mobilenet"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    expand = _group(analysis, "b1_expand/kernel")
    assert ("b1_dw/kernel", 2, "producer") in _roles(expand)  # depthwise ties in to out
    assert ("b1_project/kernel", 2, "consumer") in _roles(expand)
    residual = _group(analysis, "b2_project/kernel")
    assert ("b3_project/kernel", 3, "producer") in _roles(residual)  # coupled by the Add
    assert ("sep/depthwise_kernel", 2, "producer") in _roles(residual)
    assert ("sep/pointwise_kernel", 2, "consumer") in _roles(residual)
    result = _compact(handle, analysis, tmp_path, carriers)
    assert result.shapes["b1_dw/kernel"] == ([3, 3, 16, 1], [3, 3, 8, 1])


def test_mobilenet_depthwise_left_unmasked_stays_exact(model_dirs, tmp_path: Path) -> None:
    """Only the 1x1 convs masked: a depthwise conv over a constant channel meets SAME zero padding, so such a
    channel is not a constant at the projection any more; compaction keeps it rather than change the model."""
    handle = load_model(model_dirs["mobilenet"])
    randomize(handle, seed=8)
    analysis = find_groups(handle, "serving_default")
    keep = mask_groups(handle, analysis, carriers=False)
    rng = np.random.default_rng(0)
    for nv in handle.variables():
        if nv.name.endswith("_dw/kernel"):
            nv.var.assign(rng.standard_normal(nv.shape).astype(np.float32))
    inputs = probe_inputs(analysis.frozen["serving_default"], batch=2, seed=1)
    result = compact(handle, analysis, keep, tmp_path / "compact", inputs=inputs)
    expand = _group(analysis, "b1_expand/kernel")
    assert result.channels[expand.id][1] > 8  # some of its removed channels had to stay
    assert any("not a constant" in n for n in result.notes)
    check_artifact(handle, result)


def test_squeeze_excite(model_dirs, tmp_path: Path) -> None:
    handle = load_model(model_dirs["squeeze_excite"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    main = _group(analysis, "stem/kernel")
    # The gate multiplies per channel: the expand conv's outputs are the stem's channels.
    assert {("se_expand/kernel", 3, "producer"), ("se_reduce/kernel", 2, "consumer")} <= _roles(main)
    assert _group(analysis, "se_reduce/kernel").prunable
    # Producers only: a removed channel's gate is sigmoid(bias), swish(BN shift) * gate folds into project.
    result = _compact(handle, analysis, tmp_path, carriers=False)
    assert result.folded > 0
    assert result.shapes["se_expand/kernel"][1][3] == 6


def test_conv1d(model_dirs, tmp_path: Path) -> None:
    handle = load_model(model_dirs["conv1d"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    c1 = _group(analysis, "c1/kernel")
    assert _roles(c1) == {
        ("c1/kernel", 2, "producer"),
        ("c1/bias", 0, "carrier"),
        ("c2/kernel", 1, "consumer"),
    }
    result = _compact(handle, analysis, tmp_path, carriers=False)  # c2 is VALID: constants fold exactly
    assert result.shapes["c1/kernel"] == ([3, 4, 8], [3, 4, 4])
    assert result.shapes["head/kernel"] == ([30, 2], [15, 2])


def test_keras2_fused_batchnorm(model_dirs, tmp_path: Path) -> None:
    handle = load_model(model_dirs["keras2_fused_bn"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    ops = {n.op for n in analysis.frozen["serving_default"].graph_def.node}
    assert "FusedBatchNormV3" in ops
    group = _group(analysis, "conv/kernel")
    assert {
        ("bn/gamma", 0, "carrier"),
        ("bn/moving_variance", 0, "carrier"),
        ("conv_b/kernel", 3, "producer"),
    } <= _roles(group)
    result = _compact(handle, analysis, tmp_path, carriers=False)
    assert result.shapes["bn/beta"] == ([8], [4])


def test_tf_module_dict_signatures(model_dirs, tmp_path: Path) -> None:
    handle = load_model(model_dirs["tf_module_dict"])
    analysis = find_groups(handle, "serving_default")
    assert _group(analysis, "w1").prunable and _group(analysis, "w2").prunable
    scale = _group(analysis, "w2")
    w3 = next(m for m in scale.members if m.variable == "w3")
    assert w3.role == "consumer" and w3.positions[:, 0].tolist() == list(range(8))  # concat offset 0
    b_input = next(
        g
        for g in analysis.groups
        if any(m.variable == "w3" and m.positions is not None and m.positions[0, 0] == 8 for m in g.members)
    )
    assert not b_input.prunable and "signature input 'b'" in b_input.reason
    result = _compact(handle, analysis, tmp_path, carriers=False)
    assert result.shapes["w3"] == ([11, 4], [7, 4])


def test_keras_file_upload(tmp_path: Path, structure_root: Path) -> None:
    from tests.support import model_factory as mf

    exported = keras_to_saved_model(
        mf.build_keras3_file(structure_root / "upload.keras", epochs=1), tmp_path / "sm"
    )
    handle = load_model(exported)
    analysis = find_groups(handle, "serving_default")
    conv = _group(analysis, "conv2d/kernel")
    flat = next(m for m in conv.members if m.variable == "dense/kernel")
    assert flat.positions.shape == (8, 64)  # 8x8 positions of each channel in the flatten
    result = _compact(handle, analysis, tmp_path, carriers=True)
    assert result.shapes["dense/kernel"] == ([512, 32], [256, 16])


def test_dense_on_sequences_tensordot(model_dirs, tmp_path: Path) -> None:
    handle = load_model(model_dirs["token_mlp"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    embed = _group(analysis, "embed/kernel")
    assert embed.prunable and ("ffn/kernel", 0, "consumer") in _roles(embed)
    assert _group(analysis, "ffn/kernel").prunable
    result = _compact(handle, analysis, tmp_path, carriers=False)  # sigmoid(bias) folded into head
    assert result.folded > 0
    assert result.shapes["ffn/kernel"] == ([8, 7], [4, 4])


def test_conv_transpose_autoencoder(model_dirs, tmp_path: Path) -> None:
    handle = load_model(model_dirs["autoencoder"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    enc2, dec = _group(analysis, "enc2/kernel"), _group(analysis, "dec/kernel")
    assert ("dec/kernel", 3, "consumer") in _roles(enc2)  # the transposed conv's filter is [kh, kw, out, in]
    assert ("dec/kernel", 2, "producer") in _roles(dec) and dec.prunable
    recon = _group(analysis, "recon/kernel")
    assert not recon.prunable and "single channel" in recon.reason
    result = _compact(handle, analysis, tmp_path, carriers=True)
    assert result.shapes["dec/kernel"] == ([3, 3, 6, 8], [3, 3, 3, 4])
    # The check is not degenerate: the unmasked model differs from the compact one.
    original = load_model(model_dirs["autoencoder"])
    x = probe_inputs(analysis.frozen["serving_default"], batch=2, seed=11)
    assert max(max_abs_diff(original, result.out_dir, x).values()) > 1e-3
    assert max(max_abs_diff(handle, result.out_dir, x).values()) < 1e-5


def test_einsum_dense(model_dirs, tmp_path: Path) -> None:
    handle = load_model(model_dirs["einsum_dense"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    embed, mix = _group(analysis, "embed/kernel"), _group(analysis, "mix/kernel")
    assert ("mix/kernel", 0, "consumer") in _roles(embed)
    assert {
        ("mix/kernel", 1, "producer"),
        ("mix/bias", 0, "carrier"),
        ("head/kernel", 0, "consumer"),
    } <= _roles(mix)
    result = _compact(handle, analysis, tmp_path, carriers=False)
    assert result.shapes["mix/kernel"] == ([8, 6], [4, 3])


@pytest.mark.parametrize("carriers", [True, False], ids=["zeroed", "constants-folded"])
def test_fused_projection_split(model_dirs, tmp_path: Path, carriers: bool) -> None:
    """``tf.split`` of a fused projection into three parts mixed element-wise: a channel is one index of each
    part (its three columns go together); a slice ``m[:, :2]`` concatenated beside ``m`` makes ``m``'s channels
    pairs-of-three too, and the ``tf.ones`` kernel after the concat is sliced (and folded into) as a constant."""
    handle = load_model(model_dirs["fused_split"])
    analysis = find_groups(handle, "serving_default")
    fused = _group(analysis, "fused")
    assert fused.prunable and fused.channels == 8
    cols = next(m for m in fused.members if m.variable == "fused").positions
    np.testing.assert_array_equal(cols, np.arange(8)[:, None] + 8 * np.arange(3)[None, :])
    mid = _group(analysis, "mid")
    assert mid.prunable and mid.channels == 2
    result = _compact(handle, analysis, tmp_path, carriers)
    assert result.shapes["fused"] == ([8, 24], [4, 12])  # w_in's group halves its rows
    if not carriers:
        assert result.folded > 0


def test_sequence_model_left_whole(model_dirs, tmp_path: Path) -> None:
    """Dense -> LSTM -> attention -> residual LayerNorm: the LSTM's units reach the LayerNorm (a mean over the
    channels) through the residual, so they are left whole with that reason; the Dense before the LSTM is a
    group with the LSTM kernel's rows as its consumer; the attention heads are a group of their own. A keep
    vector on unmasked weights changes nothing: the artifact is still the same model."""
    handle = load_model(model_dirs["sequence"])
    analysis = find_groups(handle, "serving_default")
    heads, embed = _group(analysis, "attn/query/kernel"), _group(analysis, "embed/kernel")
    assert heads.prunable and embed.prunable
    assert ("lstm/lstm_cell/kernel", 0, "consumer") in _roles(embed)
    assert not any(g.prunable for g in analysis.groups if g not in (heads, embed))
    units = _group(analysis, "lstm/lstm_cell/recurrent_kernel")
    assert {("lstm/lstm_cell/kernel", 1, "producer"), ("ln/gamma", 0, "carrier")} <= _roles(units)
    assert "Mean at" in (units.reason or "")
    ln = next(g for g in analysis.groups if any(m.variable == "ln/gamma" for m in g.members))
    assert not ln.prunable
    keep = {g.id: np.arange(g.channels) % 2 == 0 for g in analysis.groups}
    result = compact(handle, analysis, keep, tmp_path / "compact")
    assert all(before == after for before, after in result.channels.values())
    assert any("left whole" in n for n in result.notes)
    check_artifact(handle, result, tol=1e-6)


def test_unknown_or_mixing_ops_freeze_their_groups(model_dirs, tmp_path: Path) -> None:
    """Roll along the channels (no rule), padding the channel axis, softmax and a sum over channels: those
    groups are left whole with the op named, even when a keep vector asks; the clean branch is compacted."""
    handle = load_model(model_dirs["unusual_ops"])
    analysis = find_groups(handle, "serving_default")
    reasons = {v: _group(analysis, v).reason or "" for v in ("roll_w", "pad_w", "soft_w", "sum_w")}
    assert "unknown op Roll" in reasons["roll_w"]
    assert "unknown op Pad" in reasons["pad_w"]
    assert "normalised across channels (Softmax" in reasons["soft_w"]
    assert "reduced or normalised across channels (Sum" in reasons["sum_w"]
    clean = _group(analysis, "clean_w")
    assert clean.prunable and not any(_group(analysis, v).prunable for v in reasons)
    variables = {nv.name: nv.var for nv in handle.variables()}
    keep = {}
    for name in ("roll_w", "pad_w", "soft_w", "sum_w", "clean_w"):  # zero half of every producer's outputs
        group = _group(analysis, name)
        k = np.arange(group.channels) % 2 == 0
        keep[group.id] = k
        value = variables[name].numpy()
        value[:, ~k] = 0
        variables[name].assign(value)
    result = compact(handle, analysis, keep, tmp_path / "compact")
    assert set(result.shapes) == {"clean_w", "clean_b", "clean_out"}
    assert sum("left whole" in n for n in result.notes) == 4
    check_artifact(handle, result)


def test_select_rows_pass_and_a_channel_condition_stays_whole(model_dirs, tmp_path: Path) -> None:
    """``Select`` with a row vector passes the channels of its data through; ``SelectV2`` whose condition is
    computed from the channels it picks between stays whole, its reason naming the condition."""
    handle = load_model(model_dirs["select"])
    analysis = find_groups(handle, "serving_default")
    rows, gated = _group(analysis, "w1"), _group(analysis, "w3")
    assert rows.prunable and rows.channels == 16 and ("w2", 0, "consumer") in _roles(rows), rows.reason
    assert not gated.prunable and "condition of SelectV2" in gated.reason
    result = _compact(handle, analysis, tmp_path, carriers=True, only={rows.id})
    assert result.shapes["w1"] == ([8, 16], [8, 8]) and result.shapes["w2"] == ([16, 4], [8, 4])
