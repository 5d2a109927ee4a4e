"""Grouped convolutions (Keras 3 ``Conv2D(groups=g)``, run as an XLA-compiled call; a plain grouped ``Conv2D``
op): pruned by whole groups. Group ``j`` is the producer's channels ``j*cin_g ..`` with the grouped kernel's
output channels ``j*cout_g ..``; the kernel's input axis is never sliced. Half the groups zeroed and removed,
the compact model matches the masked one; what the rule cannot prove stays whole with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.worker.structure.helpers import check_artifact, mask_groups, randomize
from tests.worker.test_compact_pipeline import compare_compact_and_masked
from worker.models import load_model
from worker.structure import compact, find_groups, group_masks, probe_inputs

pytestmark = pytest.mark.tf


def _group_of(analysis, variable: str, axis: int):
    return next(
        g for g in analysis.groups if any(m.variable == variable and m.axis == axis for m in g.members)
    )


def _outputs(handle, inputs) -> dict[str, np.ndarray]:
    import tensorflow as tf

    out = handle.call("serving_default", {k: tf.constant(v) for k, v in inputs.items()})
    return {k: np.asarray(v) for k, v in dict(out).items()}


def _blocks(groups: int, width: int) -> np.ndarray:
    return np.arange(groups * width).reshape(groups, width)


def test_keras_grouped_conv_is_a_group_of_whole_groups(model_dirs, tmp_path: Path) -> None:
    """c1 (8) -> gc (12, 4 groups) + BN -> gc2 (12, 4 groups) -> c3: one group of 4 channels, each the
    producer's 2 channels and the grouped kernels' 3 output channels of one group; compacted at half."""
    handle = load_model(model_dirs["grouped_conv"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    group = _group_of(analysis, "gc/kernel", 3)
    assert group.prunable, group.reason
    assert group.channels == 4
    members = {(m.variable, m.axis): m for m in group.members}
    expected = {
        ("c1/kernel", 3, "producer", 2),
        ("c1/bias", 0, "carrier", 2),
        ("gc/kernel", 3, "producer", 3),
        ("gc/bias", 0, "carrier", 3),
        ("bn/gamma", 0, "carrier", 3),
        ("bn/moving_mean", 0, "carrier", 3),
        ("gc2/kernel", 3, "producer", 3),
        ("gc2/bias", 0, "carrier", 3),
        ("c3/kernel", 2, "consumer", 3),
    }
    for variable, axis, role, width in expected:
        member = members[(variable, axis)]
        assert member.role == role, (variable, member.role)
        np.testing.assert_array_equal(member.positions, _blocks(4, width))
    assert ("gc/kernel", 2) not in members and ("gc2/kernel", 2) not in members  # cin_g is never sliced

    inputs = probe_inputs(analysis.frozen["serving_default"], batch=3, seed=7)
    before = _outputs(handle, inputs)
    keep = mask_groups(handle, analysis, fraction=0.5, only={group.id})
    after = _outputs(handle, inputs)
    assert max(np.max(np.abs(after[k] - before[k])) for k in before) > 1e-3  # the check is not degenerate
    result = compact(handle, analysis, keep, tmp_path / "compact", inputs=inputs)
    check_artifact(handle, result)
    assert result.channels[group.id] == (4, 2)
    assert result.shapes["c1/kernel"][1] == [3, 3, 3, 4]
    assert result.shapes["gc/kernel"] == ([3, 3, 2, 12], [3, 3, 2, 6])
    assert result.shapes["gc2/kernel"] == ([1, 1, 3, 12], [1, 1, 3, 6])
    assert result.shapes["c3/kernel"][1] == [1, 1, 6, 6]


def test_plain_grouped_conv_ops(model_dirs, tmp_path: Path) -> None:
    """A plain ``Conv2D`` op with ``groups == cin`` is pruned like a depthwise conv, a jit_compile call of a
    grouped conv and its bias by whole groups; a call whose body holds more than the convolution, groups that a
    concat's parts do not line up with, and 4 groups followed by 2 stay whole with the reason, even when a
    keep vector asks."""
    handle = load_model(model_dirs["tf_module_grouped_conv"])
    analysis = find_groups(handle, "serving_default")
    depthwise_like = _group_of(analysis, "kd", 3)
    assert depthwise_like.prunable, depthwise_like.reason
    roles = {(m.variable, m.axis, m.role) for m in depthwise_like.members}
    assert {
        ("k1", 3, "producer"),
        ("kd", 3, "producer"),
        ("bd", 0, "carrier"),
        ("k3", 2, "consumer"),
    } <= roles
    assert ("kd", 2, "producer") not in roles

    with_bias = _group_of(analysis, "kb", 3)
    assert with_bias.prunable and with_bias.channels == 2, with_bias.reason
    members = {(m.variable, m.axis): m for m in with_bias.members}
    assert members[("bb", 0)].role == "carrier" and members[("k6", 2)].role == "consumer"
    np.testing.assert_array_equal(members[("k5", 3)].positions, _blocks(2, 4))
    np.testing.assert_array_equal(members[("bb", 0)].positions, _blocks(2, 3))

    call = _group_of(analysis, "k2", 3)
    assert not call.prunable
    assert "grouped convolution call" in call.reason and "['Relu'] besides one Conv2D" in call.reason
    concat = _group_of(analysis, "kc", 3)
    assert not concat.prunable
    assert "do not line up with 4 whole groups of 2" in concat.reason
    chain = _group_of(analysis, "kg4", 3)
    assert not chain.prunable and "do not line up with 2 whole groups of 4" in chain.reason

    keep = {g.id: np.arange(g.channels) % 2 == 0 for g in analysis.groups if g.channels > 1}
    variables = {nv.name: nv.var for nv in handle.variables()}
    pruned = {g.id: keep[g.id] for g in (depthwise_like, with_bias)}
    for name, mask in group_masks(handle, analysis, pruned).items():
        variables[name].assign(variables[name].numpy() * mask)
    result = compact(handle, analysis, keep, tmp_path / "compact")
    check_artifact(handle, result)
    assert result.channels[depthwise_like.id] == (8, 4)
    assert result.shapes["kd"] == ([3, 3, 1, 8], [3, 3, 1, 4])
    assert result.shapes["kb"] == ([3, 3, 4, 6], [3, 3, 4, 3]) and result.shapes["k5"][1] == [1, 1, 3, 4]
    assert not {"k2", "kc", "kcg", "k7", "kg4", "kg2"} & set(result.shapes)


def test_grouped_conv_constants_fold(model_dirs, tmp_path: Path) -> None:
    """Only the kernels zeroed (biases and BatchNorm shifts left): a removed group's input channels are read by
    its own removed filters only, and its outputs' constants fold into the next 1x1 kernel's bias."""
    handle = load_model(model_dirs["grouped_conv"])
    randomize(handle, seed=4)
    analysis = find_groups(handle, "serving_default")
    group = _group_of(analysis, "gc/kernel", 3)
    keep = mask_groups(handle, analysis, fraction=0.5, carriers=False, only={group.id})
    result = compact(handle, analysis, keep, tmp_path / "compact")
    check_artifact(handle, result)
    assert result.channels[group.id] == (4, 2)
    assert result.folded > 0


def test_channel_job_compacts_a_grouped_conv_net(model_dirs, tmp_path: Path) -> None:
    """A ``granularity: channel`` job through ``run_pipeline`` on the grouped conv net: the groups are scored and
    removed whole (the grouped kernels keep ``cin_g`` input rows), and the compact model equals the masked one."""
    rng = np.random.default_rng(0)
    data = (
        {"x": rng.standard_normal((48, 8, 8, 3)).astype("float32"), "y": np.arange(48) % 3},
        {"x": rng.standard_normal((24, 8, 8, 3)).astype("float32"), "y": np.arange(24) % 3},
    )
    spec = {"target_sparsity": 0.5, "granularity": "channel"}
    metrics = compare_compact_and_masked(model_dirs["grouped_conv"], spec, data, tmp_path)
    group = next(g for g in metrics["structure"]["groups"] if g.get("channels_before") == 4)
    assert group["channels_after"] < group["channels_before"] == 4, group
    rows = {row["name"]: row["shape"] for row in metrics["layers"]}
    gc = next(shape for name, shape in rows.items() if name == "gc/kernel" or name.endswith("/gc/kernel"))
    assert gc == [3, 3, 2, 3 * group["channels_after"]], rows
