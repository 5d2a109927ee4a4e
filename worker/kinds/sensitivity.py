"""Per-variable sensitivity: the eval metric when only one variable is pruned, one-shot, at each level.

Distiller's sensitivity analysis (archived) and NNI's (removed) in one job: for every prunable variable and
every level of ``spec.sensitivity.sparsities``, the dense weights are written back (``DenseCopy``), that one
variable is pruned one-shot with the spec's criterion and granularity (every other variable dense), and the
eval set is scored. No fine-tuning: it measures how much each variable's weights matter, not how well
training recovers them.

The result (``metrics.sensitivity``): per variable, most sensitive first (mean drop over the levels), the
metric and its drop at each level and the highest level whose drop (and every lower level's) stays within
``spec.sensitivity_max_drop``; plus ``layer_sparsity``: that level per variable, as ``^name$`` regexes a user
can paste into the next job's spec. A variable the granularity leaves dense at every level (e.g. a
channel-pruned output head) is marked ``skipped`` with the reason and left out of the suggestion. The document's ``pruned`` side is that suggestion applied one-shot, run
through the ordinary pipeline so every number is measured as in any job; the job keeps no artifact (each
variable was judged alone, so their drops do not simply add up: the suggestion is a starting point).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.schemas.spec import LOWER_IS_BETTER, OneShotSchedule, PruneSpec
from worker.errors import PipelineError
from worker.kinds.plans import Aggregated, NextPhase, Planned
from worker.kinds.prune import RunPrune
from worker.kinds.weights import DenseCopy
from worker.stages.evaluate import score
from worker.stages.job import Data, Job, Window, predict
from worker.stages.load import resolve_granularity, seed_everything
from worker.stages.prune import make_pruner, prune_and_fine_tune, select

SWEEP_SPAN = 0.75  # fraction of the job's progress the per-variable sweep fills
NO_ARTIFACT_NOTE = (
    "sensitivity jobs keep no model: 'pruned' is the suggested layer_sparsity applied one-shot, measured and "
    "discarded; run a job with that layer_sparsity (and fine-tuning) for an artifact"
)


def run_sensitivity(job: Job, window: Window, out_dir: Path, run_prune: RunPrune) -> dict[str, Any]:
    original: PruneSpec = job.spec
    tick = time.perf_counter()
    measured = measure_variables(job, window.sub(0.0, SWEEP_SPAN))
    seconds = time.perf_counter() - tick
    return run_suggestion(job, window.sub(SWEEP_SPAN, 1.0), out_dir, run_prune, original, measured, seconds)


def measure_variables(job: Job, sweep: Window, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Every prunable variable's metric at each level, pruned alone one-shot (``rows``, unsorted), with the
    ``metric`` and its dense ``baseline``. ``share`` ``(i, n)``: only the variables at positions ``i``,
    ``i + n``, ... (trial ``i`` of ``n``, ``sensitivity_trial``); their rows are what the whole loop gives."""
    original: PruneSpec = job.spec
    section = original.sensitivity
    assert section is not None
    data = job.evaluation
    if data is None or data.y is None:
        raise PipelineError(
            "dataset_mismatch",
            "a sensitivity job scores the eval dataset: give eval_dataset_id with labels 'y'",
        )
    levels = list(section.sparsities)
    job.spec = _level_spec(original, levels[0], {})
    granularity = resolve_granularity(job.spec)
    prunable, kinds = select(job)
    metric = section.metric or _default_metric(job, data)
    dense = DenseCopy(job.handle)
    baseline = _metric(job, data, metric)
    notes_before = list(job.notes)  # the per-variable prunes' notes would repeat once per variable and level
    lower = metric in LOWER_IS_BETTER
    mine = [nv for position, nv in enumerate(prunable) if position % share[1] == share[0]]
    total = max(1, len(mine) * len(levels))
    rows: list[dict[str, Any]] = []
    for index, nv in enumerate(mine):
        values: list[float | None] = []
        achieved: list[float] = []
        skipped: str | None = None
        for step, level in enumerate(levels):
            sweep("pruning", (index * len(levels) + step) / total)
            dense.restore()
            seed_everything(original.seed)
            job.spec = _level_spec(original, level, {})
            pruner = make_pruner(job, [nv], {nv.name: kinds[nv.name]}, granularity)
            prune_and_fine_tune(job, pruner, sweep.sub(0.0, 0.0))  # one-shot: no training steps to report
            values.append(_metric(job, data, metric))
            achieved.append(float(np.mean(nv.var.numpy() == 0)))
            if skipped is None:
                skipped = next((r.skipped for r in pruner.report() if r.name == nv.name and r.skipped), None)
        drops = [None if v is None else (v - baseline if lower else baseline - v) for v in values]
        within = 0.0
        for level, drop in zip(levels, drops, strict=True):
            if drop is None or drop > original.sensitivity_max_drop:
                break
            within = level
        finite = [d for d in drops if d is not None]
        rows.append(
            {
                "name": nv.name,
                "params": nv.size,
                "metrics": values,
                "drops": drops,
                "mean_drop": float(np.mean(finite)) if finite else None,
                "max_sparsity_within_drop": within,
                "sparsity_reached": achieved,
            }
        )
        if not any(achieved):  # the granularity leaves it dense (e.g. a channel-pruned output head)
            rows[-1]["skipped"] = skipped or "left dense by the spec's granularity at every level"
    dense.restore()
    job.notes[:] = notes_before
    job.spec = original
    return {"rows": rows, "metric": metric, "baseline": baseline}


def run_suggestion(
    job: Job,
    window: Window,
    out_dir: Path,
    run_prune: RunPrune,
    original: PruneSpec,
    measured: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """The ranking, the suggested ``layer_sparsity`` and the document: that suggestion run one-shot."""
    section = original.sensitivity
    assert section is not None
    levels = list(section.sparsities)
    metric, baseline = measured["metric"], measured["baseline"]
    lower = metric in LOWER_IS_BETTER
    rows = sorted(
        measured["rows"],
        key=lambda r: (-(r["mean_drop"] if r["mean_drop"] is not None else np.inf), r["name"]),
    )
    suggestion = {
        f"^{re.escape(r['name'])}$": r["max_sparsity_within_drop"] for r in rows if "skipped" not in r
    }
    job.spec = _level_spec(original, levels[0], suggestion)
    document = run_prune(window, out_dir)
    job.timings["sensitivity"] = (
        seconds  # the per-variable sweep; the stages' timings are the suggestion's run
    )
    document["spec"] = original.model_dump(mode="json")
    document["sensitivity"] = {
        "metric": metric,
        "lower_is_better": lower,
        "baseline": baseline,
        "sparsities": levels,
        "max_drop": original.sensitivity_max_drop,
        "seconds": round(seconds, 3),
        "ranking": [r["name"] for r in rows],
        "variables": rows,
        "layer_sparsity": suggestion,
    }
    job.notes.append(
        f"sensitivity: {len(rows)} variables x {len(levels)} levels, each pruned alone one-shot, in "
        f"{seconds:.1f} s; most sensitive: {rows[0]['name'] if rows else 'none'}"
    )
    job.notes.append(NO_ARTIFACT_NOTE)
    return document


def _level_spec(spec: PruneSpec, level: float, layer_sparsity: dict[str, float]) -> PruneSpec:
    """A one-shot prune at ``level`` per variable (layer scope: each variable ranked on its own)."""
    return spec.model_copy(
        update={
            "target_sparsity": float(level),
            "sensitivity": None,
            "scope": "layer",
            "normalization": "none",  # a per-variable ranking: normalisation only matters globally
            "schedule": OneShotSchedule(),
            "fine_tune": None,
            "layer_sparsity": layer_sparsity,
        }
    )


def _default_metric(job: Job, data: Data) -> str:
    flat = score(job, data, predict(job, data)).flat or {}
    return "accuracy" if "accuracy" in flat else "mse"


def _metric(job: Job, data: Data, name: str) -> float | None:
    flat = score(job, data, predict(job, data)).flat or {}
    value = flat.get(name)
    if value is None and name not in flat:
        available = sorted(
            k for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)
        )
        raise PipelineError(
            "invalid_spec",
            f"sensitivity.metric {name!r} is not a metric of this task; use one of {available}",
        )
    return None if value is None else float(value)


# --- as trials (worker.trial_tasks) -----------------------------------------------------------------------

SHARES = 4  # phase 0: the variables split over this many trials (position i, i + 4, ...); then the suggestion


def plan_sensitivity_trials(spec: PruneSpec) -> list[Planned]:
    return [Planned(f"variables-{i + 1}-of-{SHARES}", None, {"share": [i, SHARES]}) for i in range(SHARES)]


def run_sensitivity_trial(
    job: Job,
    window: Window,
    out_dir: Path,
    run_prune: RunPrune,
    index: int,
    run_fold: Any,
    params: dict[str, Any] | None,
) -> dict[str, Any]:
    """Phase 0: ``measure_variables`` for the trial's share; phase 1 (``params["measured"]``): the
    suggestion's run and the document, exactly as ``run_sensitivity`` ends."""
    params = params or {}
    if "measured" in params:
        return run_suggestion(
            job, window, out_dir, run_prune, job.spec, params["measured"], float(params["seconds"])
        )
    share = params.get("share") or [0, 1]
    return measure_variables(job, window, (int(share[0]), int(share[1])))


def aggregate_sensitivity(spec: PruneSpec, trials: list[dict[str, Any]]) -> Aggregated | NextPhase:
    """After the measurements: the suggestion's trial, with every row; after it: its document (the job keeps
    no model). A failed trial fails the job (the ranking would miss its variables)."""
    for trial in trials:
        if trial["status"] != "succeeded" or trial.get("document") is None:
            error = trial.get("error") or {}
            raise PipelineError(
                error.get("code") or "trials_failed",
                f"sensitivity trial {trial['label']} failed: {error.get('message') or 'no reason recorded'}",
            )
    final = [t for t in trials if t["phase"] == 1]
    if final:
        return Aggregated(final[0]["document"], None)
    measured = [t["document"] for t in trials]
    rows = [row for document in measured for row in document["rows"]]
    first = measured[0]
    seconds = max(float(t.get("seconds") or 0.0) for t in trials)  # they ran side by side
    params = {
        "measured": {"rows": rows, "metric": first["metric"], "baseline": first["baseline"]},
        "seconds": seconds,
    }
    return NextPhase([Planned("suggestion", None, params)])
