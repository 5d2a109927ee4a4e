"""A search run as trials (round 1: the one-shot probes side by side, each on a model loaded for it; round 2:
the rest of the search and the final run, given the probes' rows) gives the one-task search's document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.kinds import SEARCH_TRIALS, trial_rules
from worker.kinds.plans import Aggregated, NextPhase
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf


def _row(index: int, phase: int, label: str, params: Any, document: Any) -> dict[str, Any]:
    return {
        "index": index,
        "phase": phase,
        "label": label,
        "params": params,
        "status": "succeeded",
        "document": document,
        "seconds": 1.0,
        "error": None,
    }


def test_search_trials_give_the_one_task_search(
    keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path
) -> None:
    spec = PruneSpec.model_validate(
        {
            "search": {"max_drop": 0.05, "min_sparsity": 0.05, "max_sparsity": 0.95},
            "preset": "fast",
            "seed": 3,
        }
    )
    assert trial_rules(spec) is SEARCH_TRIALS
    train, test = digits_cnn

    def run(out: Path, **trial: Any) -> dict[str, Any]:
        out.mkdir()
        return run_pipeline(keras3_export_dir, spec, train, test, out, lambda s, p: None, **trial)

    whole = run(tmp_path / "one")
    planned = SEARCH_TRIALS.plan(spec)
    rows = [
        _row(i, 0, p.label, p.params, run(tmp_path / f"p{i}", trial=i, trial_params=p.params))
        for i, p in enumerate(planned)
    ]
    step = SEARCH_TRIALS.aggregate(spec, rows)
    assert isinstance(step, NextPhase) and [p.label for p in step.trials] == ["search"]
    final = run(tmp_path / "final", trial=len(rows), trial_params=step.trials[0].params)
    assert (tmp_path / "final" / "artifacts" / "search.zip").is_file()
    rows.append(_row(len(rows), 1, "search", step.trials[0].params, final))
    done = SEARCH_TRIALS.aggregate(spec, rows)
    assert isinstance(done, Aggregated) and (done.top, done.top_listed) == (len(rows) - 1, False)
    document = done.document
    MetricsDocument.model_validate({"job_id": "j", "model_id": "m", **document})

    def same(section: dict[str, Any]) -> dict[str, Any]:
        trials = [{k: v for k, v in t.items() if k != "seconds"} for t in section["trials"]]
        return {**{k: v for k, v in section.items() if k != "seconds"}, "trials": trials}

    assert same(document["search"]) == same(whole["search"])
    assert document["pruned"]["metrics"] == whole["pruned"]["metrics"]
    assert document["layers"] == whole["layers"]

    failed = {
        "status": "failed",
        "document": None,
        "error": {"code": "no_sparsity_within_budget", "message": "m"},
    }
    with pytest.raises(PipelineError) as raised:
        SEARCH_TRIALS.aggregate(spec, [*rows[:-1], {**rows[-1], **failed}])
    assert (raised.value.code, raised.value.message) == ("no_sparsity_within_budget", "m")  # its own reason
