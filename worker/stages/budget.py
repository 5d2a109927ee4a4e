"""Budget jobs: the cost model of the job's model, the latency calibration, and ``metrics.budget``.

``worker.pruning.budget`` goes along the pruner's ranking until a cost is met; this stage gives it the job's
numbers: every variable's shape, and per kernel how many times each weight is applied per sample (the same
positions the metrics' ``macs`` use, ``stages.evaluate.Weights``), so ``{"macs": 0.5}`` means half of
``baseline.macs.dense_macs``.

A latency budget has no closed form: the MACs fraction is the knob. Before fine-tuning, ``calibrate_latency``
prunes one-shot at a MACs fraction, compacts into a scratch directory, times the compact model against the
uploaded one at the asked batch size (interleaved, same process), and corrects the fraction from the measured
speed-up (latency taken as proportional to MACs near the last point, kept inside the bracket of fractions
measured too slow and fast enough), a few rounds at most; the fraction that met the speed-up wins; the dense
weights are restored after each round. The job then prunes at the chosen fraction; the speed-up of the final
compacted artifact is measured by the pipeline and reported as ``achieved``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.schemas.spec import Budget
from worker.errors import PipelineError
from worker.models import NamedVariable, load_model
from worker.pruning.budget import UNITS, BudgetPolicy, CostModel
from worker.stages.job import Job

__all__ = ["budget_policy", "budget_section", "calibrate_latency"]

LATENCY_ROUNDS = 4  # compact-and-time rounds at most
LATENCY_TOLERANCE = 0.03  # a measured speed-up at most 3% above the asked one ends the calibration
LATENCY_RUNS = 15  # timed calls per model per round (median)
START_FRACTION = 0.6  # MACs fraction of the first round is min(this, 1 / speedup)


def budget_policy(
    job: Job, prunable: Sequence[NamedVariable], macs_fraction: float | None = None
) -> BudgetPolicy:
    """The policy for ``job.spec.budget``: MACs (a fraction of the dense MACs, or ``macs_fraction`` for a
    latency budget being calibrated) or parameters (all variables of the model)."""
    from worker.stages.evaluate import Weights  # the metrics' MAC positions

    budget = job.spec.budget
    assert budget is not None
    unit = UNITS[budget.unit()]
    shapes = {nv.name: tuple(int(d) for d in nv.shape) for nv in job.handle.variables()}
    positions: dict[str, float | None] = {}
    if unit == "macs":
        weights = Weights(job, prunable)
        weights.measure()
        positions = {row["name"]: row["positions"] for row in weights.rows if row["dense_macs"] is not None}
        if not positions:
            raise PipelineError(
                "budget_unreachable",
                "no kernel of this model has a known number of multiply-accumulates (metrics.baseline.macs): "
                'a MACs or latency budget cannot be ranked; use {"params": ...}',
            )
    model = CostModel.build(unit, shapes, positions)
    dense = model.total()
    if budget.params is not None:
        target = float(budget.params)
    elif budget.macs is not None:
        target = budget.macs * dense
    else:
        target = (macs_fraction if macs_fraction is not None else 1.0) * dense
    return BudgetPolicy(model, target, unit)


def calibrate_latency(
    job: Job, pruner: Any, prunable: Sequence[NamedVariable], gradients: Callable[[], Any]
) -> float:
    """The MACs fraction whose compacted model runs ``speedup`` times faster (see the module docstring); the
    pruner's groups and the model's weights are back to dense when it returns. Rounds go to the notes."""
    from worker.structure import compact

    budget = job.spec.budget
    assert budget is not None and budget.latency is not None and pruner.analysis is not None
    speedup, batch = budget.latency.speedup, budget.latency.batch_size
    variables = list(job.handle.variables())
    dense_values = [nv.var.numpy() for nv in variables]
    fraction = min(START_FRACTION, 1.0 / speedup)
    fast_enough: float | None = None  # the largest fraction measured to meet the speed-up
    too_slow = 1.0  # the smallest fraction measured to miss it (1.0: the dense model)
    rounds: list[str] = []
    x = _timing_inputs(job, batch)
    scratch = Path(tempfile.mkdtemp(prefix="secateurs-latency-"))
    try:
        for i in range(LATENCY_ROUNDS):
            pruner.budget = budget_policy(job, prunable, fraction)
            try:
                pruner.prune(1.0, gradients())
                out = scratch / f"round{i}"
                compact(job.handle, pruner.analysis, pruner.group_keep(), out, verify=False)
                ratio = _latency_ratio(job, load_model(out), x)
            except PipelineError as exc:
                if exc.code == "budget_unreachable":
                    raise
                raise PipelineError(
                    "budget_unreachable",
                    f"latency calibration failed at a MACs fraction of {fraction:.3f}: {exc}",
                ) from exc
            finally:
                for nv, value in zip(variables, dense_values, strict=True):
                    nv.var.assign(value)
                for g in pruner.groups:
                    g.keep[:] = True
            measured = 1.0 / ratio if ratio > 0 else float("inf")
            rounds.append(f"{fraction:.3f} MACs -> {measured:.2f}x")
            if measured >= speedup:
                fast_enough = fraction if fast_enough is None else max(fast_enough, fraction)
                if measured <= speedup * (1.0 + LATENCY_TOLERANCE):
                    break
            else:
                too_slow = min(too_slow, fraction)
            # Latency taken as proportional to MACs around the last point, kept inside the bracket.
            guess = fraction * measured / speedup
            lo = fast_enough if fast_enough is not None else 0.0
            if not lo < guess < too_slow:
                guess = (lo + too_slow) / 2 if fast_enough is not None else too_slow / 2
            if abs(guess - fraction) < 0.005:
                break
            fraction = guess
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if fast_enough is None:
        raise PipelineError(
            "budget_unreachable",
            f"a {speedup:g}x speed-up at batch {batch} was not reached on this worker's CPU: compacted models "
            f"measured {'; '.join(rounds)} (fixed costs outside the pruned kernels bound the speed-up). Ask for "
            "less, or set a MACs budget",
        )
    best = fast_enough
    job.note(
        f"latency budget {speedup:g}x at batch {batch}: MACs fraction calibrated on compacted models "
        f"({'; '.join(rounds)}); pruning at {best:.3f} of the dense MACs"
    )
    return best


def _timing_inputs(job: Job, batch: int) -> dict[str, Any]:
    import tensorflow as tf

    from worker.structure import probe_inputs

    analysis, _ = job.channel_groups()
    assert analysis is not None
    probe = probe_inputs(analysis.frozen[analysis.signature], batch=batch, seed=job.spec.seed)
    specs = analysis.frozen[analysis.signature].input_specs
    return {
        k: tf.constant(np.asarray(v, dtype=specs[k].dtype.as_numpy_dtype)[:batch]) for k, v in probe.items()
    }


def _latency_ratio(job: Job, compact_handle: Any, x: Mapping[str, Any]) -> float:
    """Median latency of the compact model / the uploaded one, timed interleaved after a warm-up (the median,
    as the evaluation's p50 that reports the achieved speed-up)."""
    sig = job.spec.signature
    dense_fn, compact_fn = job.handle.function(sig), compact_handle.function(sig)
    for fn in (dense_fn, compact_fn, dense_fn, compact_fn):
        fn(**x)
    dense_t, compact_t = [], []
    for _ in range(LATENCY_RUNS):
        for fn, times in ((dense_fn, dense_t), (compact_fn, compact_t)):
            tick = time.perf_counter()
            fn(**x)
            times.append(time.perf_counter() - tick)
    return float(np.median(compact_t) / np.median(dense_t))


def budget_section(
    budget: Budget, baseline: Mapping[str, Any], pruned: Mapping[str, Any], compacted: bool
) -> dict[str, Any]:
    """``metrics.budget``: ``{"asked", "achieved", "unit"}`` from the measured baseline and pruned sides (the
    compacted model's shapes and latency); ``achieved`` is None when it could not be measured."""
    unit = budget.unit()
    if unit == "macs":
        dense = (baseline.get("macs") or {}).get("dense_macs")
        after = (pruned.get("macs") or {}).get("dense_macs" if compacted else "effective_macs")
        achieved = after / dense if dense and after is not None else None
        return {"asked": budget.macs, "achieved": achieved, "unit": "macs"}
    if unit == "params":
        total = (pruned.get("params") or {}).get("total" if compacted else "nonzero")
        return {"asked": budget.params, "achieved": total, "unit": "params"}
    assert budget.latency is not None
    key = str(budget.latency.batch_size)
    before = ((baseline.get("latency_ms") or {}).get(key) or {}).get("p50")
    after = ((pruned.get("latency_ms") or {}).get(key) or {}).get("p50")
    achieved = before / after if before and after else None
    return {
        "asked": budget.latency.speedup,
        "achieved": achieved,
        "unit": "latency_speedup",
        "batch_size": budget.latency.batch_size,
    }
