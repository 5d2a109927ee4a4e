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

Kinds that fan out (issue 23; ``TRIAL_KINDS``): the job's task only creates trial records and sends one
task per trial (``worker.trials``); each trial task loads the model and runs ``run_trial`` for its index; the
task that ends the last trial sends the aggregation, which builds the kind's document from the trials'
(``AGGREGATORS``). Today: ``sweep`` (one trial per target). The other kinds run in one task as above.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.schemas.spec import PruneSpec
from worker.kinds.prune import Kind, RunPrune, run_prune_kind
from worker.kinds.search import run_search
from worker.kinds.sensitivity import run_sensitivity
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


TrialKind = Callable[[Job, Window, Path, RunPrune, int], dict[str, Any]]
# (label, target) of each trial of a job, in order.
TrialPlan = Callable[[PruneSpec], list[tuple[str, float | None]]]
Aggregator = Callable[[PruneSpec, list[dict[str, Any]]], tuple[dict[str, Any], int]]


def _sweep_plan(spec: PruneSpec) -> list[tuple[str, float | None]]:
    assert spec.sweep is not None
    return list(zip(artifact_names(spec.sweep.targets), spec.sweep.targets, strict=True))


# kind -> (the trials of a job, one trial's run, the aggregation); worker.trials reads it.
TRIAL_KINDS: dict[str, tuple[TrialPlan, TrialKind, Aggregator]] = {
    "sweep": (_sweep_plan, run_sweep_trial, aggregate_sweep),
}


def run_trial(job: Job, window: Window, out_dir: Path, run_prune: RunPrune, index: int) -> dict[str, Any]:
    """The document of trial ``index`` of the job's kind (one of ``TRIAL_KINDS``)."""
    return TRIAL_KINDS[job.spec.kind()][1](job, window, out_dir, run_prune, index)
