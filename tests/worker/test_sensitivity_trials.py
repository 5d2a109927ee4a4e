"""A sensitivity job run as trials (phase 0: the variables shared by ``SHARES`` trials, each on a model loaded
for it; phase 1: the suggestion's run from every row) gives the one-task run's document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.kinds import SENSITIVITY_TRIALS, trial_rules
from worker.kinds.plans import Aggregated, NextPhase
from worker.kinds.sensitivity import SHARES
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf


def _run(model: Path, spec: PruneSpec, data: Any, out: Path, index: int, params: Any) -> dict[str, Any]:
    out.mkdir()
    return run_pipeline(model, spec, None, data, out, lambda s, p: None, trial=index, trial_params=params)


def test_sensitivity_trials_give_the_one_task_document(
    keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path
) -> None:
    spec = PruneSpec.model_validate({"sensitivity": {"sparsities": [0.5, 0.9]}, "seed": 2})
    assert trial_rules(spec) is SENSITIVITY_TRIALS
    test = digits_cnn[1]
    (tmp_path / "one").mkdir()
    whole = run_pipeline(keras3_export_dir, spec, None, test, tmp_path / "one", lambda s, p: None)

    planned = SENSITIVITY_TRIALS.plan(spec)
    assert len(planned) == SHARES
    rows = []
    for index, trial in enumerate(planned):
        document = _run(keras3_export_dir, spec, test, tmp_path / f"t{index}", index, trial.params)
        rows.append(
            {
                "index": index,
                "phase": 0,
                "label": trial.label,
                "params": trial.params,
                "status": "succeeded",
                "document": document,
                "seconds": 1.0,
                "error": None,
            }
        )
    assert sum(len(r["document"]["rows"]) for r in rows) == len(whole["sensitivity"]["variables"])
    step = SENSITIVITY_TRIALS.aggregate(spec, rows)
    assert isinstance(step, NextPhase) and [p.label for p in step.trials] == ["suggestion"]
    final = _run(keras3_export_dir, spec, test, tmp_path / "final", SHARES, step.trials[0].params)
    rows.append(
        {
            "index": SHARES,
            "phase": 1,
            "label": "suggestion",
            "params": step.trials[0].params,
            "status": "succeeded",
            "document": final,
            "seconds": 1.0,
            "error": None,
        }
    )
    done = SENSITIVITY_TRIALS.aggregate(spec, rows)
    assert isinstance(done, Aggregated) and done.top is None  # a sensitivity job keeps no model
    document = done.document
    MetricsDocument.model_validate({"job_id": "j", "model_id": "m", **document})
    ours = {k: v for k, v in document["sensitivity"].items() if k != "seconds"}
    theirs = {k: v for k, v in whole["sensitivity"].items() if k != "seconds"}
    assert ours == theirs
    assert document["pruned"]["metrics"] == whole["pruned"]["metrics"]
    assert document["spec"] == whole["spec"]

    rows[1] = {
        **rows[1],
        "status": "failed",
        "document": None,
        "error": {"code": "interrupted", "message": "x"},
    }
    with pytest.raises(PipelineError, match="variables-2-of-4 failed"):
        SENSITIVITY_TRIALS.aggregate(spec, rows[:SHARES])
