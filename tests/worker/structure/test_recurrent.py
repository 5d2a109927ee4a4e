"""Recurrent layers (Keras 3 LSTM, GRU, SimpleRNN, Bidirectional): a layer's units are one group, walked through
its ``While`` loop body; half of them zeroed and removed, the compact model matches the masked one. What the
loop rule cannot prove (a mask, state outputs, GRU with ``reset_after=False``) stays whole with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.worker.structure.helpers import check_artifact, mask_groups, randomize
from worker.models import load_model
from worker.structure import compact, find_groups, probe_inputs

pytestmark = pytest.mark.tf

# kind -> (recurrent kernel variables whose units are a prunable group, gates per unit, next kernel reading them)
PRUNED = {
    "lstm": ({"rnn/lstm_cell": 6}, 4, "head/kernel"),
    "lstm_sequences": ({"rnn/lstm_cell": 6}, 4, "head/kernel"),
    "lstm_unroll": ({"rnn/lstm_cell": 6}, 4, "head/kernel"),  # no loop: each step's ops walked as they are
    "gru": ({"rnn/gru_cell": 6}, 3, "head/kernel"),
    "gru_sequences": ({"rnn/gru_cell": 6}, 3, "head/kernel"),
    "simple_rnn": ({"rnn/simple_rnn_cell": 6}, 1, "head/kernel"),
    "stacked": ({"rnn/lstm_cell": 6, "rnn2/lstm_cell": 4}, 4, "head/kernel"),
    "bidirectional": ({"bi/forward_rnn/lstm_cell": 6, "bi/backward_rnn/lstm_cell": 6}, 4, "head/kernel"),
    "conv1d_lstm": ({"rnn/lstm_cell": 6}, 4, "head/kernel"),
    "embedding_lstm": ({"rnn/lstm_cell": 6}, 4, "head/kernel"),
}


def _units(analysis, cell: str):
    return next(
        g
        for g in analysis.groups
        if any(m.variable == f"{cell}/recurrent_kernel" and m.role == "producer" for m in g.members)
    )


def _roles(group) -> set[tuple[str, int, str]]:
    return {(m.variable, m.axis, m.role) for m in group.members}


def _outputs(handle, inputs) -> np.ndarray:
    import tensorflow as tf

    out = handle.call("serving_default", {k: tf.constant(v) for k, v in inputs.items()})
    return np.asarray(next(iter(dict(out).values())))


@pytest.mark.parametrize("kind", sorted(PRUNED))
def test_units_grouped_and_compacted(model_dirs, tmp_path: Path, kind: str) -> None:
    """One group per recurrent layer: kernel and recurrent kernel columns (unit ``j`` = gate columns ``g*u +
    j``), the recurrent kernel's rows, the bias, and the next kernel's rows. Half the units zeroed and removed: the compact model matches the masked one, which
    differs from the unmasked model (the check is not degenerate)."""
    cells, gates, consumer = PRUNED[kind]
    handle = load_model(model_dirs[f"recurrent:{kind}"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    for cell, units in cells.items():
        group = _units(analysis, cell)
        assert group.prunable, group.reason
        assert group.channels == units
        roles = {(m.variable, m.axis, m.role) for m in group.members}
        assert {
            (f"{cell}/kernel", 1, "producer"),
            (f"{cell}/recurrent_kernel", 0, "consumer"),
            (f"{cell}/recurrent_kernel", 1, "producer"),
        } <= roles
        bias = next(m for m in group.members if m.variable == f"{cell}/bias")
        assert bias.role == "carrier" and bias.axis == (1 if "gru" in cell else 0)
        kernel = next(m for m in group.members if m.variable == f"{cell}/kernel")
        expected = np.arange(units)[:, None] + units * np.arange(gates)[None, :]
        got = np.arange(units)[:, None] if kernel.positions is None else kernel.positions
        np.testing.assert_array_equal(got, expected)
    last = list(cells)[-1]
    assert any(m.variable == consumer and m.role == "consumer" for m in _units(analysis, last).members)

    inputs = probe_inputs(analysis.frozen["serving_default"], batch=3, seed=7)
    if "embedding" in kind:
        inputs = {"tokens": np.random.default_rng(3).integers(0, 10, (3, 5)).astype(np.int32)}
    before = _outputs(handle, inputs)
    keep = mask_groups(handle, analysis, only={_units(analysis, c).id for c in cells})
    assert np.max(np.abs(_outputs(handle, inputs) - before)) > 1e-3
    result = compact(handle, analysis, keep, tmp_path / "compact", inputs=inputs)
    check_artifact(handle, result)
    for cell, units in cells.items():
        assert result.channels[_units(analysis, cell).id] == (units, units // 2)
        after = units // 2
        assert result.shapes[f"{cell}/recurrent_kernel"][1] == [after, gates * after]
    assert result.params_after < result.params_before


def test_conv_before_lstm_is_a_group(model_dirs) -> None:
    """The layer before a recurrent one keeps its own group, with the recurrent kernel's input rows as a
    consumer (the loop reads the sequence from a TensorList)."""
    handle = load_model(model_dirs["recurrent:conv1d_lstm"])
    analysis = find_groups(handle, "serving_default")
    conv = next(g for g in analysis.groups if any(m.variable == "conv/bias" for m in g.members))
    assert conv.prunable and ("rnn/lstm_cell/kernel", 0, "consumer") in {
        (m.variable, m.axis, m.role) for m in conv.members
    }


def test_bias_left_alone_keeps_the_units(model_dirs, tmp_path: Path) -> None:
    """Zeroing only the kernels leaves ``sigmoid(bias)`` gates: the unit's state is not zero, and its
    recurrent kernel rows feed the other units, so nothing is removed (the final states are checked on the
    probes; the notes say which units stayed)."""
    handle = load_model(model_dirs["recurrent:lstm"])
    randomize(handle)
    analysis = find_groups(handle, "serving_default")
    group = _units(analysis, "rnn/lstm_cell")
    keep = mask_groups(handle, analysis, carriers=False, only={group.id})
    result = compact(handle, analysis, keep, tmp_path / "compact")
    assert result.channels[group.id] == (6, 6)
    assert sum(f"{group.id}: channel" in n and "kept" in n for n in result.notes) == 3
    check_artifact(handle, result)


@pytest.mark.parametrize(
    ("kind", "cell", "reason"),
    [
        ("embedding_mask", "rnn/lstm_cell", "a mask (mask_zero, a Masking layer) is applied inside the loop"),
        ("return_state", "rnn/lstm_cell", "reaches signature output 'output_1'"),
        ("gru_reset_before", "rnn/gru_cell", "unknown op MatMul at"),
    ],
)
def test_left_whole(model_dirs, tmp_path: Path, kind: str, cell: str, reason: str) -> None:
    """What the loop rule cannot prove leaves the units whole, naming why; a keep vector changes nothing."""
    handle = load_model(model_dirs[f"recurrent:{kind}"])
    analysis = find_groups(handle, "serving_default")
    groups = [
        g
        for g in analysis.groups
        if any(m.variable.startswith(f"{cell}/") and m.axis == 1 for m in g.members)
    ]
    assert groups and not any(g.prunable for g in groups)
    assert any(reason in (g.reason or "") for g in groups), [g.reason for g in groups]
    keep = {g.id: np.arange(g.channels) % 2 == 0 for g in groups}
    result = compact(handle, analysis, keep, tmp_path / "compact")
    assert all(before == after for before, after in result.channels.values())
    check_artifact(handle, result, tol=1e-6)


def test_initial_state_input_leaves_the_layer_whole(model_dirs, tmp_path: Path) -> None:
    """States that start from signature inputs are not zero: the loop is left whole, and the sequence it
    writes carries that reason to the next layer's rows."""
    handle = load_model(model_dirs["recurrent:initial_state"])
    analysis = find_groups(handle, "serving_default")
    assert not any(g.prunable for g in analysis.groups)
    head_rows = next(g for g in analysis.groups if ("head/kernel", 0, "consumer") in _roles(g))
    assert "initial state 4 comes from Placeholder, not zeros" in (head_rows.reason or "")
    keep = {g.id: np.arange(g.channels) % 2 == 0 for g in analysis.groups}
    result = compact(handle, analysis, keep, tmp_path / "compact")
    assert all(before == after for before, after in result.channels.values())
    check_artifact(handle, result, tol=1e-6)
