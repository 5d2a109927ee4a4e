"""K-fold cross-validation as trials (issue 23): a ``prune`` job with ``evaluation.cross_validation`` runs its
k folds and its main run (the artifact, pruned on the whole train set) as k + 1 trials on any workers.

Trial ``i < k`` is fold ``i`` exactly as the one-task run computes it (``worker.stages.crossval``: the same fold
plan from the same seed, a fresh model, the seeds reset); trial ``k`` is the main run without the folds (they
never changed it: its seeds are reset before it prunes). ``aggregate_folds`` puts the folds' rows into the
main run's document as its ``cross_validation`` section, with the notes the one-task run writes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.evaluation.crossval import FoldPlan
from worker.kinds.prune import RunPrune
from worker.stages.crossval import finish_cross_validation, plan_cross_validation, run_fold
from worker.stages.job import Job, Window
from worker.stages.load import seed_everything

MAIN = "main"  # the label of the main run's trial; its zip is the job's saved_model
RunFold = Callable[[Window, int], dict[str, Any]]


def folds_of(spec: PruneSpec) -> int:
    assert spec.evaluation is not None and spec.evaluation.cross_validation is not None
    return spec.evaluation.cross_validation.folds


def plan_fold_trials(spec: PruneSpec) -> list[tuple[str, float | None]]:
    return [*((f"fold-{i + 1}", None) for i in range(folds_of(spec))), (MAIN, spec.target_sparsity)]


def run_fold_trial(
    job: Job, window: Window, out_dir: Path, run_prune: RunPrune, index: int, run_fold: RunFold
) -> dict[str, Any]:
    """Fold ``index``'s document (``fold_document``), or for ``index == k`` the main run's, its zip moved to
    ``out_dir/artifacts/main.zip`` (exports stay ``artifacts/<format>``)."""
    if index < folds_of(job.spec):
        return run_fold(window, index)
    original = job.spec
    assert original.evaluation is not None
    no_folds = original.evaluation.model_copy(update={"cross_validation": None})
    job.spec = original.model_copy(update={"evaluation": no_folds})  # the folds are trials of their own
    document = run_prune(window, out_dir)
    document["spec"] = original.model_dump(mode="json")
    job.spec = original
    (out_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    os.replace(out_dir / "pruned.zip", out_dir / "artifacts" / f"{MAIN}.zip")
    return document


def fold_document(
    model_dir: Path, job: Job, train_arrays: Any, granularity: Any, window: Window, index: int
) -> dict[str, Any]:
    """One fold of the job's cross-validation, with what the aggregation needs of the plan (fold sizes, the
    task, stratification): the plan is made here again, from the same labels and seed, as every fold's is."""
    seed_everything(job.spec.seed)
    source = plan_cross_validation(job, train_arrays)
    row, dropped = run_fold(model_dir, job.spec, source, index, granularity, window)
    return {
        "fold": index,
        "row": row,
        "dropped": dropped,
        "task": source.task,
        "stratified": source.plan.stratified,
        "plan_note": source.plan.note,
        "sizes": [list(size) for size in source.sizes],
    }


def aggregate_folds(spec: PruneSpec, trials: list[dict[str, Any]]) -> tuple[dict[str, Any], int, bool]:
    """The main run's document with the ``cross_validation`` section of the folds' rows; the index of the
    main run's trial; False: its zip is the saved_model only (no artifact of its own name). A failed trial
    fails the job (a cross-validation with a fold missing would summarise other folds than asked)."""
    k = folds_of(spec)
    for trial in trials:
        if trial["status"] != "succeeded" or not trial.get("document"):
            error = trial.get("error") or {}
            what = "the main run" if trial["index"] == k else f"fold {trial['index'] + 1}"
            raise PipelineError(
                error.get("code") or "trials_failed",
                f"{what} of the cross-validation failed: {error.get('message') or 'no reason recorded'}",
            )
    folds = [t["document"] for t in sorted(trials, key=lambda t: t["index"]) if t["index"] < k]
    first = folds[0]
    plan = FoldPlan(folds=[], stratified=bool(first["stratified"]), note=first.get("plan_note"))
    sizes = [(int(a), int(b)) for a, b in first["sizes"]]
    report, notes = finish_cross_validation(
        spec, plan, first["task"], [f["row"] for f in folds], any(f["dropped"] for f in folds), sizes
    )
    main = next(t for t in trials if t["index"] == k)
    document = copy.deepcopy(main["document"])
    document["cross_validation"] = report
    document.setdefault("notes", []).extend(n for n in notes if n not in document["notes"])
    timings = document.setdefault("timings_s", {})
    timings["cross_validation"] = round(
        sum(float(f.get("timings_s", {}).get("total") or 0.0) for f in folds), 4
    )
    return document, k, False
