"""K-fold cross-validation run as trials (one ``run_pipeline(..., trial=i)`` per fold and one for the main
run, each on a model loaded for it, then ``aggregate_folds``) gives the one-task run's document: the same
folds, scores and summary, and the same main run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.kinds import FOLD_TRIALS, trial_rules
from worker.kinds.plans import Aggregated
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf


def _without_seconds(report: dict[str, Any]) -> dict[str, Any]:
    """The section without run times (``seconds`` per fold and its summary)."""
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in report["per_fold"]]
    summary = {k: v for k, v in report["summary"].items() if k != "seconds"}
    return {**report, "per_fold": rows, "summary": summary}


def test_fold_trials_aggregate_to_the_one_task_cross_validation(
    keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path
) -> None:
    spec = PruneSpec.model_validate(
        {
            "target_sparsity": 0.7,
            "fine_tune": {"epochs": 1, "batch_size": 128},
            "evaluation": {"cross_validation": {"folds": 2}},
            "seed": 4,
        }
    )
    assert trial_rules(spec) is FOLD_TRIALS
    train, test = digits_cnn
    (tmp_path / "one").mkdir()
    whole = run_pipeline(keras3_export_dir, spec, train, test, tmp_path / "one", lambda s, p: None)
    rows = []
    labels = FOLD_TRIALS.plan(spec)
    assert [p.label for p in labels] == ["fold-1", "fold-2", "main"]
    for index in range(len(labels)):
        out = tmp_path / f"trial-{index}"
        out.mkdir()
        document = run_pipeline(keras3_export_dir, spec, train, test, out, lambda s, p: None, trial=index)
        rows.append(
            {"index": index, "status": "succeeded", "document": document, "seconds": 1.0, "error": None}
        )
    assert (tmp_path / "trial-2" / "artifacts" / "main.zip").is_file()
    assert "cross_validation" not in rows[2]["document"]  # the main run's trial runs no folds
    outcome = FOLD_TRIALS.aggregate(spec, rows)
    assert isinstance(outcome, Aggregated) and (outcome.top, outcome.top_listed) == (2, False)
    document = outcome.document
    MetricsDocument.model_validate({"job_id": "j", "model_id": "m", **document})
    assert _without_seconds(document["cross_validation"]) == _without_seconds(whole["cross_validation"])
    assert document["pruned"]["metrics"] == whole["pruned"]["metrics"]
    assert document["layers"] == whole["layers"]
    assert set(whole["notes"]) <= set(document["notes"])

    failed = [
        *rows[:1],
        {**rows[1], "status": "failed", "document": None, "error": {"code": "interrupted", "message": "x"}},
        rows[2],
    ]
    with pytest.raises(PipelineError, match="fold 2 of the cross-validation failed"):
        FOLD_TRIALS.aggregate(spec, failed)


def test_the_main_run_is_planned_heaviest_so_it_is_sent_first() -> None:
    """K-fold's main run trains on the whole train set, each fold on (k-1)/k of it: sent first, the last trial
    to start on a free worker is a fold (the makespan of k + 1 unequal trials on few workers)."""
    spec = PruneSpec.model_validate({"target_sparsity": 0.5, "evaluation": {"cross_validation": {"folds": 5}}})
    planned = FOLD_TRIALS.plan(spec)
    assert [p.label for p in planned] == ["fold-1", "fold-2", "fold-3", "fold-4", "fold-5", "main"]
    assert [p.cost for p in planned] == [0.8] * 5 + [1.0]
    sweep = PruneSpec.model_validate({"sweep": {"targets": [0.5, 0.9]}})
    assert {p.cost for p in trial_rules(sweep).plan(sweep)} == {1.0}  # type: ignore[union-attr]
