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


def test_latency_budget_calibrates_the_macs_fraction(
    transformer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timing itself is replaced (this machine's latency is noise at this size): a compact model whose
    latency is proportional to its MACs meets 2x at half the MACs, found in the first round."""
    from worker.stages import budget as stage

    seen: list[float] = []

    def ratio(job: Any, compact_handle: Any, x: Any) -> float:
        total = sum(nv.size for nv in compact_handle.variables())
        dense = sum(nv.size for nv in job.handle.variables())
        seen.append(total / dense)
        return 0.5

    monkeypatch.setattr(stage, "_latency_ratio", ratio)
    metrics = _run(transformer, {"latency": {"speedup": 2.0, "batch_size": 1}}, tmp_path / "latency")
    assert len(seen) == 1 and seen[0] < 1.0
    assert any("latency budget 2x at batch 1" in note for note in metrics["notes"])
    budget = metrics["budget"]
    assert budget["unit"] == "latency_speedup" and budget["asked"] == 2.0 and budget["achieved"] is not None
    assert metrics["structure"]["compact"] is True
