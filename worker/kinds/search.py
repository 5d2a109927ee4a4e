"""Accuracy-budget search: the highest sparsity whose metric stays within ``max_drop`` of the baseline.

ACLT-like (NNCF's Adaptive Compression Level Training, which left with its TensorFlow backend):

1. One model load per job. The dense weights are copied into memory once (``DenseCopy``) and written back
   before every trial, so trials swap masks on the same handle instead of reloading the model.
2. Probes: one-shot prunes without fine-tuning at ``PROBES`` levels over [min_sparsity, max_sparsity] (a
   prune and a predict each: cheap). One-shot is a pessimistic estimate, so the highest passing probe is
   where the fine-tuned trials start.
3. Trials with the whole spec (criterion, granularity, scope, schedule, fine-tuning): first at max_sparsity
   (done when it passes), then halving the interval between the best pass (at first the highest one-shot
   pass, which fine-tuning can only improve on) and the lowest fail until it is below ``search.resolution``.
   A spec without fine-tuning has nothing to add to the probes, so its trials are one-shot too (the same
   halving, between the highest passing and the lowest failing probe).
4. Stops when the next trial would not fit ``budget_s`` (estimated by the longest trial so far): the best
   passing trial wins and the notes say ``budget_exhausted``. No passing trial: ``no_sparsity_within_budget``.
5. The chosen sparsity runs once more through the ordinary pipeline (``run_prune``: K-fold when asked,
   evaluation on the eval set, compaction, saving, exports), so the artifact and the top-level metrics are
   the chosen trial's, measured the same way as any job's. Same seed, same data: the same masks and weights.

With ``validation_fraction`` the trials fine-tune on the rest of the train set and are judged on a stratified
hold-out of it (a streamed train set: a seeded record-hash hold-out, ``_split_stream``); the eval set then only scores the final model (unbiased). Without it they are judged on the
eval set, which the notes say.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.schemas.spec import LOWER_IS_BETTER, OneShotSchedule, PruneSpec, Search
from worker.data.split import keep_fraction
from worker.errors import PipelineError
from worker.kinds.plans import Aggregated, NextPhase, Planned
from worker.kinds.prune import RunPrune
from worker.kinds.weights import DenseCopy
from worker.stages.evaluate import score
from worker.stages.job import Data, Job, Window, predict
from worker.stages.load import bind_part, resolve_granularity, seed_everything
from worker.stages.prune import make_pruner, prune_and_fine_tune, select

PROBES = 5  # one-shot levels over [min_sparsity, max_sparsity]
TRIALS_SPAN = 0.7  # fraction of the job's progress the probes and trials fill; the final run gets the rest
MAX_TRIALS = 40  # a hard stop whatever the budget (the bisection needs ~log2(range / resolution) + a few)

Clock = Callable[[], float]


@dataclass
class Trial:
    sparsity: float
    metric: float | None
    passed: bool
    seconds: float
    phase: str  # "probe" (one-shot) or "trial" (the whole spec)

    def row(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "metric": self.metric,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "phase": self.phase,
        }


@dataclass
class Budget:
    """Seconds left for trials; ``fits`` is asked before each one with the longest trial so far."""

    seconds: float
    clock: Clock
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def fits(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.seconds


class Judge:
    """Pass/fail of a metric value against the baseline: ``max_drop`` absolute or relative, either direction."""

    def __init__(self, search: Search, baseline: float) -> None:
        self.metric, self.baseline = search.metric, baseline
        self.lower_is_better = search.metric in LOWER_IS_BETTER
        allowed = search.max_drop * abs(baseline) if search.relative else search.max_drop
        self.threshold = baseline + allowed if self.lower_is_better else baseline - allowed

    def passes(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value <= self.threshold if self.lower_is_better else value >= self.threshold


def run_search(
    job: Job,
    window: Window,
    out_dir: Path,
    run_prune: RunPrune,
    clock: Clock = time.monotonic,
    probed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Probes and trials, then the ordinary run at the chosen sparsity; the document gains ``search``.
    ``probed``: the probes' rows, measured already by trials of their own (``run_search_trial``): taken as they
    are instead of pruning again (the same numbers; their seconds count towards the longest trial)."""
    original: PruneSpec = job.spec
    search = original.search
    assert search is not None
    tick = time.perf_counter()
    full_train = job.train
    selection = _selection_data(job, search)
    notes_before = list(job.notes)  # the trials' own notes are dropped: the final run writes its own
    dense = DenseCopy(job.handle)
    judge = Judge(search, _metric(job, selection, search.metric))
    granularity = resolve_granularity(original.model_copy(update={"target_sparsity": search.min_sparsity}))
    job.spec = _trial_spec(original, search.min_sparsity, one_shot=False)
    prunable, kinds = select(job)
    trials: list[Trial] = []
    span = window.sub(0.0, TRIALS_SPAN)
    budget = Budget(search.budget_s, clock)
    state = {"done": 0.0}

    known = {(round(float(r["sparsity"]), 4), True): r for r in probed or []}

    def run_trial(sparsity: float, one_shot: bool) -> Trial:
        row = known.get((round(sparsity, 4), one_shot))
        if row is not None:  # a probe its own trial measured (worker.trial_tasks)
            trial = Trial(
                row["sparsity"], row["metric"], judge.passes(row["metric"]), row["seconds"], "probe"
            )
            trials.append(trial)
            return trial
        started = clock()
        dense.restore()
        seed_everything(original.seed)
        job.spec = _trial_spec(original, sparsity, one_shot)
        lo = state["done"]
        hi = lo + (1.0 - lo) * (0.08 if one_shot else 0.25)
        span("pruning", lo)
        pruner = make_pruner(job, prunable, kinds, granularity)
        prune_and_fine_tune(job, pruner, span.sub(lo, hi))
        value = _metric(job, selection, search.metric)
        state["done"] = hi
        trial = Trial(
            round(sparsity, 4),
            value,
            judge.passes(value),
            clock() - started,
            "probe" if one_shot else "trial",
        )
        trials.append(trial)
        return trial

    exhausted = _search(search, original, run_trial, budget, trials)
    best = max((t for t in trials if t.passed and t.phase == "trial"), key=lambda t: t.sparsity, default=None)
    if best is None and original.fine_tune is None:  # probes are the trials of a one-shot spec
        best = max((t for t in trials if t.passed), key=lambda t: t.sparsity, default=None)
    seconds = time.perf_counter() - tick
    if best is None:
        shown = ", ".join(
            f"{t.sparsity:g}{'*' if t.phase == 'probe' else ''}: {_fmt(t.metric)}" for t in trials[:30]
        )
        raise PipelineError(
            "no_sparsity_within_budget",
            f"no trial kept {search.metric} within {search.max_drop:g}{' (relative)' if search.relative else ''} "
            f"of the baseline {judge.baseline:.6g} (threshold {judge.threshold:.6g}) in {seconds:.0f} s "
            f"({'budget exhausted' if exhausted else 'search finished'}); trials (sparsity: {search.metric}, "
            f"* = one-shot probe): {shown}. Lower search.min_sparsity, raise max_drop or budget_s, or add "
            "fine_tune epochs",
        )

    dense.restore()
    job.notes[:] = notes_before
    job.train = full_train if search.validation_fraction is None else job.train
    job.spec = _trial_spec(original, best.sparsity, one_shot=False)
    document = run_prune(window.sub(TRIALS_SPAN, 1.0), out_dir)
    job.timings["search"] = seconds  # probes and trials; the stages' own timings are the final run's
    document["spec"] = original.model_dump(mode="json")
    n_trials = sum(t.phase == "trial" for t in trials)
    document["search"] = {
        "metric": search.metric,
        "lower_is_better": judge.lower_is_better,
        "baseline": judge.baseline,
        "threshold": judge.threshold,
        "selection_data": "validation split of the train set" if search.validation_fraction else "eval set",
        "chosen": {"sparsity": best.sparsity, "metric": best.metric},
        "budget_s": search.budget_s,
        "budget_exhausted": exhausted,
        "seconds": round(seconds, 3),
        "probes": len(trials) - n_trials,
        "trial_count": n_trials,
        "trials": [t.row() for t in trials],
    }
    job.notes.append(
        f"search: {len(trials) - n_trials} one-shot probes and {n_trials} trials in {seconds:.1f} s chose "
        f"sparsity {best.sparsity:g} ({search.metric} {_fmt(best.metric)} on the "
        f"{document['search']['selection_data']}, threshold {judge.threshold:.6g}); the artifact is that "
        "sparsity run again through the whole pipeline"
    )
    if exhausted:
        job.notes.append(
            f"budget_exhausted: the search stopped at budget_s={search.budget_s:g} s with the best passing trial; "
            "a larger budget may find a higher sparsity"
        )
    if search.validation_fraction is None:
        job.notes.append(
            "search: trials were judged on the eval set, so the reported metrics on it are optimistic; set "
            "search.validation_fraction to choose on a split of the train set instead"
        )
    return document


def _search(
    search: Search,
    spec: PruneSpec,
    run_trial: Callable[[float, bool], Trial],
    budget: Budget,
    trials: list[Trial],
) -> bool:
    """Probes, then stepping up and halving; True when the budget (or MAX_TRIALS) stopped it early."""
    lo_s, hi_s, resolution = search.min_sparsity, search.max_sparsity, search.resolution
    longest = 0.0

    def attempt(sparsity: float, one_shot: bool) -> Trial | None:
        nonlocal longest
        if len(trials) >= MAX_TRIALS or (trials and not budget.fits(longest)):
            return None
        trial = run_trial(sparsity, one_shot)
        longest = max(longest, trial.seconds)
        return trial

    # Python floats, as probe trials carry them through JSON: round() on a numpy float rounds a half otherwise
    # (0.37345 -> 0.3734 vs 0.3735), and the bracketing would differ between one task and trials.
    probes = sorted({round(float(v), 4) for v in np.linspace(lo_s, hi_s, PROBES)})
    highest_probe: float | None = None
    for sparsity in probes:
        probe = attempt(sparsity, True)
        if probe is None:
            return True
        if probe.passed:
            highest_probe = sparsity
        else:
            break  # one-shot only gets worse from here
    one_shot = spec.fine_tune is None
    if one_shot:  # the probes were the whole spec: bisect between the last pass and the first fail
        passed = [t.sparsity for t in trials if t.passed]
        failed = [t.sparsity for t in trials if not t.passed]
        if not passed or not failed:
            return False
        best, worst = max(passed), min(failed)
    else:
        # The whole spec at max_sparsity first (done when it passes), then halve [floor, max]: the floor is
        # the highest one-shot pass (fine-tuning only recovers from there), else min_sparsity.
        top = attempt(hi_s, False)
        if top is None:
            return True
        if top.passed:
            return False
        floor = highest_probe if highest_probe is not None else lo_s
        found, worst = None, hi_s
        while worst - floor > resolution:
            middle = round((floor + worst) / 2, 4)
            trial = attempt(middle, False)
            if trial is None:
                return True
            if trial.passed:
                found = floor = middle
            else:
                worst = middle
        if found is None:  # nothing above the floor passed: the floor itself, then min_sparsity
            for candidate in dict.fromkeys([round(floor, 4), lo_s]):
                if candidate >= worst:
                    continue
                trial = attempt(candidate, False)
                if trial is None:
                    return True
                if trial.passed:
                    return False
                worst = candidate
        return False
    while worst - best > resolution:  # halve the step between the best pass and the lowest fail
        middle = round((best + worst) / 2, 4)
        trial = attempt(middle, one_shot)
        if trial is None:
            return True
        if trial.passed:
            best = middle
        else:
            worst = middle
    return False


def _trial_spec(spec: PruneSpec, sparsity: float, one_shot: bool) -> PruneSpec:
    """The spec of one trial: a plain prune at ``sparsity``; probes drop schedule and fine-tuning."""
    update: dict[str, Any] = {"target_sparsity": float(sparsity), "search": None}
    if one_shot:
        update.update(schedule=OneShotSchedule(), fine_tune=None)
    return spec.model_copy(update=update)


def _selection_data(job: Job, search: Search) -> Data:
    """What trials are judged on: a stratified hold-out of the train set (which then trains on the rest),
    or the eval set. Either must carry labels."""
    if search.validation_fraction is None:
        if job.evaluation is None or job.evaluation.y is None:
            raise PipelineError(
                "dataset_mismatch",
                "a search judges trials on labelled data: give an eval dataset with 'y' (or set "
                "search.validation_fraction to hold out part of a labelled train set)",
            )
        return job.evaluation
    train = job.train
    if train is None or train.y is None:
        raise PipelineError(
            "dataset_mismatch", "search.validation_fraction splits the train set, which needs labels 'y'"
        )
    if train.stream is not None:
        fit, held = _split_stream(job, train, search.validation_fraction)
        how = "by a seeded hash of each record's shard and index, not stratified"
        n_fit, n_held, n_all = fit.total, held.total, train.total
    else:
        fit, held = _split(train, search.validation_fraction, job.spec.seed)
        how = "stratified"
        n_fit, n_held, n_all = fit.n, held.n, train.n
    job.train = fit
    job.note(
        f"search: {n_held} of {n_all} train samples held out ({how}, seed {job.spec.seed}) to judge "
        f"trials; the trials and the final model fine-tune on the other {n_fit}; the eval set only scores "
        "the final model"
    )
    return held


def _split_stream(job: Job, data: Data, fraction: float) -> tuple[Data, Data]:
    """A streamed train set split without holding it: a record is held out when the seeded hash of its
    (shard, record index) falls below ``fraction`` (``worker.data.split``), so every pass (trials, epochs,
    the final run) agrees on the split; both parts stream like a whole set and are counted exactly first."""
    assert data.stream is not None
    held_keep = keep_fraction(0.0, fraction, seed=job.spec.seed)
    fit_keep = held_keep.complement()
    n_fit, n_held = data.stream.reader.count([fit_keep, held_keep])
    if n_fit == 0 or n_held == 0:
        raise PipelineError(
            "dataset_mismatch", f"validation_fraction {fraction} leaves an empty split of {n_fit + n_held} records"
        )
    return bind_part(job, data, fit_keep, n_fit, "train"), bind_part(job, data, held_keep, n_held, "validation")


def _split(data: Data, fraction: float, seed: int) -> tuple[Data, Data]:
    from sklearn.model_selection import train_test_split

    index = np.arange(data.n)
    y = np.asarray(data.y)
    labels = y if y.ndim == 1 else np.argmax(y, axis=-1) if y.ndim == 2 and y.shape[1] > 1 else None
    try:
        fit, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:  # too few samples of a class (or regression targets): plain shuffled split
        fit, held = train_test_split(index, test_size=fraction, random_state=seed)
    if len(fit) == 0 or len(held) == 0:
        raise PipelineError("dataset_mismatch", f"validation_fraction {fraction} leaves an empty split")
    return data.subset(np.sort(fit)), data.subset(np.sort(held))


def _metric(job: Job, data: Data, name: str) -> float:
    """``name`` of the model as it is now on ``data`` (the selected output's flat metrics)."""
    flat = score(job, data, predict(job, data)).flat or {}
    value = flat.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        available = sorted(
            k for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)
        )
        raise PipelineError(
            "invalid_spec",
            f"search.metric {name!r} is not a metric of this task (output {job.output!r}); use one of {available}",
        )
    return float(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# --- as trials (worker.trial_tasks) -----------------------------------------------------------------------
# Round 1: the one-shot probes, one trial each, side by side; round 2: one trial runs the rest of the search
# (the fine-tuned trials halve the interval one after another, on one handle) and the final run, with the
# probes' rows. The probes a one-task search would not run (those above the first failing one) are measured
# but left out, so the trials, the choice and the document are the one-task search's.


def probe_levels(search: Search) -> list[float]:
    return sorted({round(float(v), 4) for v in np.linspace(search.min_sparsity, search.max_sparsity, PROBES)})


def plan_search_trials(spec: PruneSpec) -> list[Planned]:
    assert spec.search is not None
    return [Planned(f"probe-{level:g}", level, {"probe": level}) for level in probe_levels(spec.search)]


def run_search_trial(
    job: Job,
    window: Window,
    out_dir: Path,
    run_prune: RunPrune,
    index: int,
    run_fold: Any,
    params: dict[str, Any] | None,
) -> dict[str, Any]:
    """A probe (round 1: ``{"probe": sparsity}`` -> ``{"probe": row}``) or the rest of the search with the
    probes' rows (round 2: ``{"probed": rows}`` -> the job's document, its zip as ``artifacts/search.zip``)."""
    params = params or {}
    if "probed" in params:
        document = run_search(job, window, out_dir, run_prune, probed=params["probed"])
        (out_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        os.replace(out_dir / "pruned.zip", out_dir / "artifacts" / f"{FINAL}.zip")
        return document
    original: PruneSpec = job.spec
    search = original.search
    assert search is not None
    selection = _selection_data(job, search)
    judge = Judge(search, _metric(job, selection, search.metric))
    granularity = resolve_granularity(original.model_copy(update={"target_sparsity": search.min_sparsity}))
    job.spec = _trial_spec(original, search.min_sparsity, one_shot=False)
    prunable, kinds = select(job)
    started = time.monotonic()
    seed_everything(original.seed)
    sparsity = float(params["probe"])
    job.spec = _trial_spec(original, sparsity, one_shot=True)
    window("pruning", 0.0)
    pruner = make_pruner(job, prunable, kinds, granularity)
    prune_and_fine_tune(job, pruner, window.sub(0.0, 1.0))
    value = _metric(job, selection, search.metric)
    probe = Trial(round(sparsity, 4), value, judge.passes(value), time.monotonic() - started, "probe")
    job.spec = original
    return {"probe": probe.row()}


FINAL = "search"  # the label of round 2's trial; its zip is the job's saved_model


def aggregate_search(spec: PruneSpec, trials: list[dict[str, Any]]) -> Aggregated | NextPhase:
    """After the probes: the rest of the search as one trial; after it, its document. A failed trial fails
    the job with that trial's own reason (e.g. ``no_sparsity_within_budget``)."""
    for trial in trials:
        if trial["status"] != "succeeded" or trial.get("document") is None:
            error = trial.get("error") or {}
            raise PipelineError(
                error.get("code") or "trials_failed",
                error.get("message") or f"search trial {trial['label']} failed with no reason recorded",
            )
    final = [t for t in trials if t["phase"] == 1]
    if final:
        return Aggregated(final[0]["document"], final[0]["index"], False)
    rows = sorted((t["document"]["probe"] for t in trials), key=lambda r: r["sparsity"])
    return NextPhase([Planned(FINAL, None, {"probed": rows})])
