"""Budgets end to end through ``run_pipeline`` on a transformer block (attention heads + MLP widths): the
groups are ranked by importance per cost, the compacted artifact meets the budget (checked against the masked
model), ``metrics.budget`` says asked vs achieved, and an unreachable budget fails saying what was reachable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec
from tests.worker.structure import builders
from worker.errors import PipelineError
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf

FAST_EVAL = {"latency": {"batch_sizes": [1], "runs": 2}}


@pytest.fixture(scope="module")
def transformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builders.keras3_transformer(tmp_path_factory.mktemp("budget") / "transformer")


def _data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    train = {"x": rng.standard_normal((32, 6, 8)).astype("float32"), "y": np.arange(32) % 3}
    evaluation = {"x": rng.standard_normal((16, 6, 8)).astype("float32"), "y": np.arange(16) % 3}
    return train, evaluation


def _run(model: Path, budget: dict[str, Any], out: Path) -> dict[str, Any]:
    spec = PruneSpec.model_validate({"budget": budget, "granularity": "channel", "evaluation": FAST_EVAL})
    train, evaluation = _data()
    out.mkdir(parents=True, exist_ok=True)
    metrics = run_pipeline(model, spec, train, evaluation, out, lambda s, p: None)
    MetricsDocument.model_validate({"job_id": "job_test", "model_id": "mdl_test", **metrics})
    return metrics


def test_macs_budget_removes_heads_and_mlp_width(transformer: Path, tmp_path: Path) -> None:
    metrics = _run(transformer, {"macs": 0.5}, tmp_path / "macs")
    budget = metrics["budget"]
    assert budget["unit"] == "macs" and budget["asked"] == 0.5
    dense, pruned = metrics["baseline"]["macs"]["dense_macs"], metrics["pruned"]["macs"]["dense_macs"]
    assert budget["achieved"] == pytest.approx(pruned / dense)
    assert 0.42 <= budget["achieved"] <= 0.5
    structure = metrics["structure"]
    assert structure["compact"] is True, structure
    rows = {row["id"].split(":", 1)[1]: row for row in structure["groups"]}
    assert rows["attn/query/kernel"]["channels_before"] == 4  # the heads are ranked with the MLP units
    assert rows["ffn1/kernel"]["channels_after"] < 32 or rows["gate/kernel"]["channels_after"] < 24
    assert max(structure["max_abs_diff"].values()) <= 1e-4
    assert not metrics["baseline"]["macs"]["uncounted"] or all(
        name.endswith("bias") for name in metrics["baseline"]["macs"]["uncounted"]
    )  # the attention kernels' MACs are counted (EinsumDense reshapes its kernel)


def test_params_budget_and_unreachable(transformer: Path, tmp_path: Path) -> None:
    metrics = _run(transformer, {"params": 2500}, tmp_path / "params")
    budget = metrics["budget"]
    assert budget["unit"] == "params" and budget["achieved"] <= 2500
    assert budget["achieved"] == metrics["pruned"]["params"]["total"] < metrics["baseline"]["params"]["total"]
    with pytest.raises(PipelineError) as info:
        _run(transformer, {"params": 100}, tmp_path / "unreachable")
    assert info.value.code == "budget_unreachable"
    assert "without emptying a layer" in info.value.message and "parameters" in info.value.message


class FakeTiming:
    """Replaces ``measure_speedup`` (this machine's latency is noise at this size): the speed-up of a compact
    model is its parameter ratio to the upload, times ``bias``; each call is recorded with the phase it ran
    in (``calibrate``, ``correct`` or ``verify``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after_calibration: float = 1.0) -> None:
        from worker.stages import budget as stage

        self.bias = 1.0
        self.phase = "calibrate"
        self.calls: list[tuple[str, float, float]] = []  # (phase, parameter ratio, reported speed-up)
        meet, verify = stage.meet_latency, stage.verify_latency

        def correct(*args: Any) -> None:
            self.phase, self.bias = "correct", after_calibration
            meet(*args)

        def final(*args: Any) -> Any:
            self.phase = "verify"
            return verify(*args)

        monkeypatch.setattr(stage, "measure_speedup", self)
        monkeypatch.setattr(stage, "meet_latency", correct)
        monkeypatch.setattr("worker.pipeline.verify_latency", final)

    def __call__(self, dense: Any, compact: Any, signature: str, x: Any) -> Any:
        from worker.stages.latency import PairedLatency

        assert dense.path != compact.path and signature == "serving_default"  # both loaded from disk
        ratio = sum(nv.size for nv in dense.variables()) / sum(nv.size for nv in compact.variables())
        speedup = ratio * self.bias
        self.calls.append((self.phase, ratio, speedup))
        return PairedLatency(dense_ms=10.0, compact_ms=10.0 / speedup, runs=7, warmup=3)

    def of(self, phase: str) -> list[tuple[str, float, float]]:
        return [call for call in self.calls if call[0] == phase]


def test_latency_budget_calibrates_then_verifies_the_artifact(
    transformer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calibration meets the speed-up; the check after pruning measures it met (nothing more removed), and
    ``achieved`` is the alternate measurement of the artifact, not the evaluation's separate p50s."""
    timing = FakeTiming(monkeypatch)
    metrics = _run(transformer, {"latency": {"speedup": 1.5, "batch_size": 1}}, tmp_path / "latency")
    assert any(s >= 1.5 for _, _, s in timing.of("calibrate"))
    assert len(timing.of("correct")) == 1 and timing.of("correct")[0][2] >= 1.5
    (verified,) = timing.of("verify")
    budget = metrics["budget"]
    assert budget["unit"] == "latency_speedup" and budget["asked"] == 1.5
    assert budget["achieved"] == pytest.approx(verified[2])
    assert budget["measured"]["dense_ms"] == 10.0 and budget["measured"]["runs"] == 7
    assert verified[1] == pytest.approx(timing.of("correct")[0][1])  # the artifact is the checked state
    assert any("latency budget 1.5x at batch 1: MACs fraction calibrated" in n for n in metrics["notes"])
    assert not any("removed after the calibrated fraction" in n for n in metrics["notes"])
    assert metrics["structure"]["compact"] is True


def test_latency_budget_keeps_removing_while_the_compacted_model_is_short(
    transformer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calibration was optimistic (after it, every model measures 0.85 of what it did): the check after
    pruning removes more channels, round after round, until the compacted model measures the speed-up."""
    timing = FakeTiming(monkeypatch, after_calibration=0.85)
    metrics = _run(transformer, {"latency": {"speedup": 1.5, "batch_size": 1}}, tmp_path / "latency")
    checks = timing.of("correct")
    assert len(checks) >= 2, checks
    assert all(s < 1.5 for _, _, s in checks[:-1]) and checks[-1][2] >= 1.5
    assert [r for _, r, _ in checks] == sorted(r for _, r, _ in checks)  # each round removed more
    (verified,) = timing.of("verify")
    assert metrics["budget"]["achieved"] == pytest.approx(verified[2]) and verified[2] >= 1.5
    assert verified[1] == pytest.approx(checks[-1][1])
    assert any("removed after the calibrated fraction fell short" in n for n in metrics["notes"])
    assert not any("not met" in n for n in metrics["notes"])


def test_latency_budget_short_after_the_last_round_is_reported(
    transformer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every check measures less than asked however much goes: after the last round the artifact is the last
    state, its measured speed-up is ``achieved`` (below ``asked``) and the notes say so."""
    from worker.stages import budget as stage

    monkeypatch.setattr(stage, "CORRECTION_ROUNDS", 2)
    timing = FakeTiming(monkeypatch, after_calibration=1.0)
    original = timing.__call__

    def capped(dense: Any, compact: Any, signature: str, x: Any) -> Any:
        measured = original(dense, compact, signature, x)
        if timing.phase == "calibrate":
            return measured
        return type(measured)(dense_ms=10.0, compact_ms=10.0 / 1.4, runs=7, warmup=3)  # always 1.4x

    monkeypatch.setattr(stage, "measure_speedup", capped)
    metrics = _run(transformer, {"latency": {"speedup": 1.5, "batch_size": 1}}, tmp_path / "latency")
    assert len(timing.of("correct")) == 3  # the check, then 2 further rounds
    budget = metrics["budget"]
    assert budget["achieved"] == pytest.approx(1.4) and budget["asked"] == 1.5
    assert any("still short after 2 further rounds" in n for n in metrics["notes"])
    assert any("1.5x at batch 1 not met by the artifact" in n for n in metrics["notes"])


def test_latency_budget_past_the_end_of_the_ranking_fails(
    transformer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compacted model far slower than the calibration said needs more than the ranking has: the job fails
    ``budget_unreachable`` with the measured rounds, never an artifact claiming the speed-up. (Rounds enough
    for steps of at most ``MAX_STEP`` to get there.)"""
    from worker.stages import budget as stage

    monkeypatch.setattr(stage, "CORRECTION_ROUNDS", 40)
    FakeTiming(monkeypatch, after_calibration=0.01)
    with pytest.raises(PipelineError) as info:
        _run(transformer, {"latency": {"speedup": 1.5, "batch_size": 1}}, tmp_path / "latency")
    assert info.value.code == "budget_unreachable"
    assert (
        "at the end of the ranking" in info.value.message and "(end of the ranking) ->" in info.value.message
    )


def test_latency_budget_no_calibration_round_reaches_it(
    transformer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timing = FakeTiming(monkeypatch)
    timing.bias = 0.1
    with pytest.raises(PipelineError) as info:
        _run(transformer, {"latency": {"speedup": 1.5, "batch_size": 1}}, tmp_path / "latency")
    assert info.value.code == "budget_unreachable" and "was not reached" in info.value.message
    assert "MACs ->" in info.value.message  # what the measured rounds reached
    assert timing.of("calibrate") and not timing.of("correct")


def test_next_fraction_takes_latency_as_affine_in_macs() -> None:
    """Latency 0.3 + 0.7 x MACs (a fixed part no channel removal touches): one measured point and the upload
    (1.0, 1x) give the exact fraction; outside the bracket, its midpoint."""
    from worker.stages.budget import _next_fraction

    def speedup(fraction: float) -> float:
        return 1.0 / (0.3 + 0.7 * fraction)

    assert _next_fraction([(0.6, speedup(0.6))], 2.0, 0.0, 0.6) == pytest.approx(0.2 / 0.7)
    two = [(0.6, speedup(0.6)), (0.4, speedup(0.4))]
    assert _next_fraction(two, 2.0, 0.0, 0.4) == pytest.approx(0.2 / 0.7)
    assert _next_fraction([(0.6, speedup(0.6))], 5.0, 0.1, 0.6) == pytest.approx(0.35)  # needs < 0: midpoint


def test_a_step_removes_something_but_never_almost_everything() -> None:
    from worker.stages.budget import MAX_STEP, MIN_STEP, _step

    assert _step(0.01, 0.5) == pytest.approx(0.5 * (1 - MAX_STEP))  # a wild extrapolation is held back
    assert _step(0.499, 0.5) == pytest.approx(0.5 * (1 - MIN_STEP))  # a 1.98x still moves
    assert _step(0.4, 0.5) == 0.4
