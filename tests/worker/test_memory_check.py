"""The memory check before pruning: estimates from the measured factors, and a refusal that says what fits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tensorflow as tf

from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.models import NamedVariable
from worker.stages import memory

MB = 1_000_000


def variables(*shapes: tuple[int, ...]) -> list[NamedVariable]:
    return [NamedVariable(f"v{i}", tf.Variable(tf.zeros(shape))) for i, shape in enumerate(shapes)]


def spec(**fields: Any) -> PruneSpec:
    return PruneSpec.model_validate({"target_sparsity": 0.5, **fields})


def test_estimates_follow_the_measured_factors() -> None:
    vs = variables((500, 1000), (250, 1000))  # 0.75 M float32 weights: 3 MB, the largest 2 MB
    masks = 750_000
    assert memory.prune_bytes(spec(scope="layer"), vs) == masks + 3 * 2 * MB
    assert memory.prune_bytes(spec(scope="global", normalization="none"), vs) == masks + 2 * 3 * MB
    assert memory.prune_bytes(spec(scope="global", normalization="lamp"), vs) == masks + 10 * 3 * MB
    assert memory.prune_bytes(spec(granularity="channel"), vs) is None  # no measured factor: no check
    assert memory.prune_bytes(spec(fine_tune={"epochs": 1}), vs) is None


def test_a_prune_that_does_not_fit_fails_naming_what_would(monkeypatch: pytest.MonkeyPatch) -> None:
    vs = variables((500, 1000), (250, 1000))
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * MB)  # layer (6.75 MB) fits, LAMP (30.75) not
    memory.check_prune_memory(spec(scope="layer"), vs)
    with pytest.raises(PipelineError) as err:
        memory.check_prune_memory(spec(scope="global", normalization="lamp"), vs)
    assert err.value.code == "insufficient_memory"
    assert "global LAMP ranking" in err.value.message and '"scope": "layer" needs about' in err.value.message
    assert "10.0 MB" not in err.value.message and "available" in err.value.message


def test_unknown_availability_never_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    memory.check_prune_memory(spec(scope="global", normalization="lamp"), variables((1000, 1000)))


def test_available_bytes_reads_this_machine() -> None:
    free = memory.available_bytes()
    assert free is not None and 0 < free < 1 << 50


def test_the_pipeline_refuses_before_pruning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support import model_zoo
    from worker.pipeline import run_pipeline

    model_dir = model_zoo.build("dense", tmp_path / "dense")

    monkeypatch.setattr(memory, "available_bytes", lambda: 1)
    stages: list[str] = []
    with pytest.raises(PipelineError) as err:
        run_pipeline(
            model_dir,
            spec(scope="global", normalization="lamp"),
            None,
            None,
            tmp_path / "out",
            lambda stage, progress: stages.append(stage),
        )
    assert err.value.code == "insufficient_memory"
    assert "pruning" not in stages
    assert not (tmp_path / "out" / "saved_model").exists()
