"""Dense, Conv, BatchNorm and residual Add: groups from the graph, compaction exact and smaller."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.worker.structure.helpers import check_artifact, mask_groups, randomize
from worker.models import load_model
from worker.structure import compact, find_groups

pytestmark = pytest.mark.tf


def _by_producer(analysis, variable: str):
    return next(
        g for g in analysis.groups if any(m.variable == variable and m.role == "producer" for m in g.members)
    )


def test_mlp_groups(mlp_dir: Path) -> None:
    handle = load_model(mlp_dir)
    analysis = find_groups(handle, "serving_default")
    hidden = _by_producer(analysis, "hidden/kernel")
    assert hidden.prunable and hidden.channels == 16
    roles = {(m.variable, m.axis): m.role for m in hidden.members}
    assert roles == {
        ("hidden/kernel", 1): "producer",
        ("hidden/bias", 0): "carrier",
        ("gate/kernel", 0): "consumer",
    }
    logits = _by_producer(analysis, "logits/kernel")
    assert not logits.prunable and "reaches signature output" in logits.reason
    inputs = next(
        g for g in analysis.groups if any(m.variable == "hidden/kernel" and m.axis == 0 for m in g.members)
    )
    assert not inputs.prunable and "signature input" in inputs.reason


def test_mlp_compact_folds_sigmoid_constant(mlp_dir: Path, tmp_path: Path) -> None:
    handle = load_model(mlp_dir)
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    # Producers only: a removed 'gate' unit outputs sigmoid(bias) != 0, folded into the logits bias.
    keep = mask_groups(handle, analysis, fraction=0.5, carriers=False)
    x = np.random.default_rng(3).standard_normal((7, 20)).astype(np.float32)
    result = compact(handle, analysis, keep, tmp_path / "c", inputs={"features": x})
    assert result.folded > 0
    assert result.shapes["gate/kernel"] == ([16, 12], [8, 6])
    assert result.shapes["logits/kernel"] == ([12, 5], [6, 5])
    assert result.params_after < result.params_before
    check_artifact(handle, result)


def test_resnet_groups(resnet_dir: Path) -> None:
    handle = load_model(resnet_dir)
    analysis = find_groups(handle, "serving_default")
    residual = _by_producer(analysis, "stem/kernel")
    producers = {m.variable for m in residual.producers}
    assert producers == {"stem/kernel", "block_b/kernel"}  # coupled by the Add
    carriers = {m.variable for m in residual.members if m.role == "carrier"}
    assert {"stem_bn/gamma", "stem_bn/beta", "block_b_bn/moving_mean"} <= carriers
    consumers = {m.variable for m in residual.members if m.role == "consumer"}
    assert consumers == {"block_a/kernel", "proj/kernel"}
    inner = _by_producer(analysis, "block_a/kernel")
    assert inner.prunable and {m.variable for m in inner.members} >= {"block_a/bias", "block_b/kernel"}
    proj = _by_producer(analysis, "proj/kernel")
    assert proj.prunable and any(m.variable == "head/kernel" for m in proj.members)


def test_resnet_compact_exact(resnet_dir: Path, tmp_path: Path) -> None:
    handle = load_model(resnet_dir)
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    keep = mask_groups(handle, analysis, fraction=0.5, carriers=True)
    x = np.random.default_rng(4).standard_normal((3, 12, 12, 3)).astype(np.float32)
    result = compact(handle, analysis, keep, tmp_path / "c", inputs={"image": x})
    assert result.shapes["stem/kernel"] == ([3, 3, 3, 8], [3, 3, 3, 4])
    assert result.shapes["block_a/kernel"] == ([3, 3, 8, 6], [3, 3, 4, 3])
    assert result.shapes["head/kernel"] == ([10, 4], [5, 4])
    reloaded = check_artifact(handle, result)
    assert set(reloaded["signatures"]) == {"serve", "serving_default"}  # Keras 3 export: both kept


def test_a_group_cut_to_one_channel_keeps_its_axis(resnet_dir: Path, tmp_path: Path) -> None:
    """Keras 3 reads a conv bias through ``Reshape [1, 1, 1, C] -> Squeeze`` (no axes): with C cut to 1 that
    Squeeze would drop the channel axis too; the rewrite names the axes it squeezed."""
    handle = load_model(resnet_dir)
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    inner = _by_producer(analysis, "block_a/kernel")  # has a bias
    keep = mask_groups(handle, analysis, fraction=0.9, only={inner.id})  # 5 of 6 go
    result = compact(handle, analysis, keep, tmp_path / "c")
    assert result.channels[inner.id] == (6, 1)
    assert result.shapes["block_a/bias"] == ([6], [1])
    check_artifact(handle, result)


def test_resnet_constant_through_same_padding_is_kept(resnet_dir: Path, tmp_path: Path) -> None:
    """BatchNorm shift left non-zero in front of a 3x3 SAME conv: not foldable, so those channels stay."""
    handle = load_model(resnet_dir)
    randomize(handle, seed=5)
    analysis = find_groups(handle, "serving_default")
    inner = _by_producer(analysis, "block_a/kernel")
    keep = mask_groups(handle, analysis, fraction=0.5, carriers=False, only={inner.id})
    x = np.random.default_rng(4).standard_normal((2, 12, 12, 3)).astype(np.float32)
    result = compact(handle, analysis, keep, tmp_path / "c", inputs={"image": x})
    before, after = result.channels[inner.id]
    assert before == 6 and after > 3  # relu(shift) > 0 for some: kept
    assert any("kept" in n for n in result.notes)
    check_artifact(handle, result)


def test_live_channels_are_never_removed(mlp_dir: Path, tmp_path: Path) -> None:
    """A keep vector asking to drop channels the masked model still uses: they stay, the notes say why."""
    handle = load_model(mlp_dir)
    randomize(handle, seed=2)
    analysis = find_groups(handle, "serving_default")
    hidden = _by_producer(analysis, "hidden/kernel")
    keep = {hidden.id: np.arange(16) >= 4}  # nothing zeroed
    result = compact(handle, analysis, keep, tmp_path / "c")
    assert result.channels[hidden.id] == (16, 16)
    assert any("not zero in the masked model" in n for n in result.notes)
    check_artifact(handle, result)


def test_bad_keep_vectors_are_refused(mlp_dir: Path, tmp_path: Path) -> None:
    from worker.errors import PipelineError

    handle = load_model(mlp_dir)
    analysis = find_groups(handle, "serving_default")
    hidden = _by_producer(analysis, "hidden/kernel")
    with pytest.raises(PipelineError, match="shape"):
        compact(handle, analysis, {hidden.id: np.ones(3, bool)}, tmp_path / "a")
    with pytest.raises(PipelineError, match="no channel group"):
        compact(handle, analysis, {"g99:nope": np.ones(3, bool)}, tmp_path / "b")


def test_a_rule_that_fails_freezes_instead_of_guessing(
    mlp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.structure import rules

    def broken(walker, op) -> None:
        raise IndexError("surprise")

    monkeypatch.setitem(rules.RULES, "Relu", broken)
    analysis = find_groups(load_model(mlp_dir), "serving_default")
    hidden = _by_producer(analysis, "hidden/kernel")
    assert not hidden.prunable and "not understood (IndexError: surprise)" in hidden.reason
    assert _by_producer(analysis, "gate/kernel").prunable  # the rest of the graph is still read


def test_the_walker_knows_only_the_rules_it_is_given(mlp_dir: Path) -> None:
    """The rule table is the walker's argument: with MatMul's rule alone, the ops after each Dense kernel
    (bias add, activations) are unknown, so every kernel's channels are left whole, naming such an op."""
    from worker.structure import rules
    from worker.structure.graph_walk import Walker

    handle = load_model(mlp_dir)
    one_rule = replace(rules.DEFAULT_RULES, ops={"MatMul": rules.matmul})
    assert Walker(handle, one_rule).rules.ops.keys() == {"MatMul"}
    analysis = find_groups(handle, "serving_default", rules=one_rule)
    for name in ("hidden/kernel", "gate/kernel"):
        group = _by_producer(analysis, name)
        assert not group.prunable and "unknown op" in str(group.reason)
    assert _by_producer(find_groups(handle, "serving_default"), "hidden/kernel").prunable  # the default table
