"""Job kinds: one orchestration module each, all built from the pipeline's stages.

``worker.pipeline.run_pipeline`` loads the model once and calls :func:`run_kind`, its only dispatch point. A
kind receives the loaded ``Job``, the job's progress ``Window`` and ``run_prune(window, out_dir)``: today's
one-run pipeline (baseline, [K-fold], prune + fine-tune, evaluate, [compact], save, [export]) on the handle as
it is, per ``job.spec`` (which must then carry a ``target_sparsity``). Kinds (``KINDS``, keyed by the spec's
``JobKind``; tests/test_vocabularies.py keeps both the same):

- ``prune`` (``worker.kinds.prune``): ``run_prune`` once (``target_sparsity``).
- ``search`` (``worker.kinds.search``): trials on the one handle with the dense weights swapped back in from
  memory, then ``run_prune`` at the chosen sparsity.
- ``sweep`` (``worker.kinds.sweep``): ``run_prune`` once per target, dense weights restored in between.
- ``sensitivity`` (``worker.kinds.sensitivity``): one variable at a time, one-shot, then ``run_prune`` with
  the suggested ``layer_sparsity``; the job keeps no artifact (``worker.tasks`` drops it).

Jobs that fan out (issue 23; ``trial_rules``): the job's task only creates trial records and sends one task
per trial (``worker.trial_tasks``); each trial task loads the model and runs ``run_trial`` for its index (and
its record's params); the task that ends the last trial sends the aggregation, which builds the document from
the trials' or plans a next phase of trials (``worker.kinds.plans``). Today: ``sweep`` (one trial per
target), ``prune`` with K-fold cross-validation (one trial per fold and one for the main run:
``worker.kinds.folds``), ``sensitivity`` (four trials share the variables, then one runs the suggestion)
and ``search`` (the probes side by side, then one trial for the rest of it). Each gives the numbers its
one-task run gives (``run_kind``, still used with SECATEURS_FAN_OUT_TRIALS=false).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.schemas.spec import PruneSpec
from worker.kinds.folds import MAIN, RunFold, aggregate_folds, folds_of, plan_fold_trials, run_fold_trial
from worker.kinds.plans import Aggregated, NextPhase, Planned
from worker.kinds.prune import Kind, RunPrune, run_prune_kind
from worker.kinds.search import aggregate_search, plan_search_trials, run_search, run_search_trial
from worker.kinds.sensitivity import (
    aggregate_sensitivity,
    plan_sensitivity_trials,
    run_sensitivity,
    run_sensitivity_trial,
)
from worker.kinds.sweep import aggregate_sweep, artifact_names, run_sweep, run_sweep_trial
from worker.stages.job import Job, Window

KINDS: dict[str, Kind] = {
    "prune": run_prune_kind,
    "search": run_search,
    "sweep": run_sweep,
    "sensitivity": run_sensitivity,
}


def run_kind(job: Job, window: Window, out_dir: Path, run_prune: RunPrune) -> dict[str, Any]:
    """The metrics document (without timings) of the job kind ``job.spec.kind()``."""
    return KINDS[job.spec.kind()](job, window, out_dir, run_prune)


# One trial's run: (job, window, out_dir, run_prune, index, run_fold, params) -> its document. ``run_prune`` is
# the one run; ``run_fold(window, i)`` fold i's document (K-fold); ``params`` what the trial's record carries.
TrialKind = Callable[[Job, Window, Path, RunPrune, int, RunFold, dict[str, Any] | None], dict[str, Any]]
# The first phase's trials of a job, in order.
TrialPlan = Callable[[PruneSpec], list[Planned]]
# From the trials ended so far ({"index", "phase", "label", "status", "document", "params", "seconds",
# "error"} in index order): the job's document, or the next phase.
Aggregator = Callable[[PruneSpec, list[dict[str, Any]]], Aggregated | NextPhase]


@dataclass(frozen=True)
class TrialRules:
    """How a job of a fanned-out kind is split (``plan``), run (``run``) and put together (``aggregate``)."""

    name: str  # the trial records' kind: sweep | folds | sensitivity
    plan: TrialPlan
    run: TrialKind
    aggregate: Aggregator


def _sweep_plan(spec: PruneSpec) -> list[Planned]:
    assert spec.sweep is not None
    return [
        Planned(n, t) for n, t in zip(artifact_names(spec.sweep.targets), spec.sweep.targets, strict=True)
    ]


def _sweep_trial(
    job: Job,
    window: Window,
    out_dir: Path,
    run_prune: RunPrune,
    index: int,
    run_fold: RunFold,
    params: dict[str, Any] | None,
) -> dict[str, Any]:
    return run_sweep_trial(job, window, out_dir, run_prune, index)


def _sweep_aggregate(spec: PruneSpec, trials: list[dict[str, Any]]) -> Aggregated:
    document, top = aggregate_sweep(spec, trials)
    return Aggregated(document, top, top_listed=True)


def _folds_plan(spec: PruneSpec) -> list[Planned]:
    k = folds_of(spec)
    return [
        Planned(label, target, cost=1.0 if label == MAIN else (k - 1) / k)
        for label, target in plan_fold_trials(spec)
    ]


def _folds_trial(
    job: Job,
    window: Window,
    out_dir: Path,
    run_prune: RunPrune,
    index: int,
    run_fold: RunFold,
    params: dict[str, Any] | None,
) -> dict[str, Any]:
    return run_fold_trial(job, window, out_dir, run_prune, index, run_fold)


def _folds_aggregate(spec: PruneSpec, trials: list[dict[str, Any]]) -> Aggregated:
    document, top, listed = aggregate_folds(spec, trials)
    return Aggregated(document, top, listed)


SWEEP_TRIALS = TrialRules("sweep", _sweep_plan, _sweep_trial, _sweep_aggregate)
FOLD_TRIALS = TrialRules("folds", _folds_plan, _folds_trial, _folds_aggregate)
SENSITIVITY_TRIALS = TrialRules(
    "sensitivity", plan_sensitivity_trials, run_sensitivity_trial, aggregate_sensitivity
)


SEARCH_TRIALS = TrialRules("search", plan_search_trials, run_search_trial, aggregate_search)


def trial_rules(spec: PruneSpec) -> TrialRules | None:
    """The rules of a job that fans out into trials (worker.trial_tasks), None for one run in one task: a
    sweep (one trial per target), a ``prune`` job with K-fold cross-validation (one per fold + the main
    run), a sensitivity job (the variables shared by a few trials, then one for the suggestion) and a
    search (the probes, then the rest)."""
    if spec.kind() == "sweep":
        return SWEEP_TRIALS
    if spec.kind() == "sensitivity":
        return SENSITIVITY_TRIALS
    if spec.kind() == "search":
        return SEARCH_TRIALS
    if (
        spec.kind() == "prune"
        and spec.evaluation is not None
        and spec.evaluation.cross_validation is not None
    ):
        return FOLD_TRIALS
    return None


def run_trial(
    job: Job,
    window: Window,
    out_dir: Path,
    run_prune: RunPrune,
    index: int,
    run_fold: RunFold,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The document of trial ``index`` of the job (``trial_rules``)."""
    rules = trial_rules(job.spec)
    assert rules is not None
    return rules.run(job, window, out_dir, run_prune, index, run_fold, params)
