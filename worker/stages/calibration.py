"""Calibration stage: the statistics a calibration criterion scores from, collected on the job's calibration
inputs through the signature's frozen graph (``worker.pruning.calibration``).

Which statistics is the criterion's ``calibration`` hook, never its name (``METHODS``):

- ``input_norms`` (Wanda): one pass over the calibration batches with the dense weights, fetching every
  pruned variable's per-feature ``sum x^2`` at once; ``InputNorms`` per variable.
- ``hessian`` (SparseGPT): the ops in dependency waves; per wave one pass accumulating ``X^T X`` per op with
  the weights pruned so far, then SparseGPT prunes and updates each variable of the wave; the updated values
  are written into the variables before the pruner runs, and its ``ObsResult`` (with the keep-mask) becomes
  the variable's statistics, so the pruner's mask is SparseGPT's and holds through fine-tuning like any mask.

A variable no rule handles (its op has no calibration rule, SparseGPT cannot take it, its Hessian is above
``SECATEURS_CALIBRATION_MAX_DIM``) keeps magnitude scoring: one note names them and why, and its metrics row
says ``method: "magnitude"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from app.config import get_settings
from worker.pruning.calibration.capture import (
    CaptureSession,
    WeightUse,
    dependency_waves,
    find_uses,
    reuse_plan,
)
from worker.pruning.calibration.sparsegpt import sparsegpt_sequential
from worker.pruning.calibration.wanda import collect_input_norms
from worker.pruning.granularity import NM
from worker.pruning.interface import PrunerLike
from worker.pruning.pruner import variable_view
from worker.stages.job import Job

__all__ = ["METHODS", "calibrate"]

Method = Callable[[Job, PrunerLike, dict[str, list[WeightUse]], dict[str, np.ndarray], CaptureSession], Any]


def calibrate(job: Job, pruner: PrunerLike) -> dict[str, Any] | None:
    """Statistics per active variable for the pruner's criterion (None when it needs none); records
    ``timings_s.calibration`` and the notes."""
    kind = pruner.criterion.calibration
    if kind is None:
        return None
    tick = time.perf_counter()
    sig = job.frozen_signature()
    names = list(pruner.active)
    uses: dict[str, list[WeightUse]] = {name: [] for name in names}
    for use in find_uses(sig, names):
        uses[use.variable].append(use)
    fallback: dict[str, str] = {}
    handled: dict[str, list[WeightUse]] = {}
    for name, var_uses in uses.items():
        reason = _unhandled(var_uses, sig.name)
        if reason is None:
            handled[name] = var_uses
        else:
            fallback[name] = reason
    needed = set(sig.weights.values())
    values = {nv.name: variable_view(nv.var) for nv in job.handle.variables() if nv.name in needed}
    with CaptureSession(sig) as session:
        stats, more = METHODS[kind](job, pruner, handled, values, session)
    fallback.update(more)
    for name in fallback:
        stats.pop(name, None)
    settings = job.spec.calibration_settings()
    records = min(settings.samples, (job.calibration or job.train).n)  # type: ignore[union-attr]
    job.note(
        f"criterion {pruner.criterion.name!r}: calibrated on {records} input records "
        f"({'the calibration dataset' if job.calibration is not None else 'the train dataset, inputs only'}; "
        f"batches of {settings.batch_size}), {len(stats)} of {len(names)} variables from their ops' inputs"
    )
    if fallback:
        job.note(
            f"criterion {pruner.criterion.name!r}: scored by magnitude instead (named in layers[].method): "
            + "; ".join(f"{name}: {why}" for name, why in fallback.items())
        )
    job.timings["calibration"] = job.timings.get("calibration", 0.0) + time.perf_counter() - tick
    return stats


def _unhandled(uses: list[WeightUse], signature: str) -> str | None:
    """Why no calibration method can read this variable's inputs, or None."""
    if not uses:
        return f"signature {signature!r} does not read it"
    bad = [u for u in uses if not u.supported]
    if bad:
        return bad[0].reason
    first = uses[0]
    if any((u.kind, u.in_axes) != (first.kind, first.in_axes) for u in uses[1:]):
        return f"read by {len(uses)} ops with different input layouts"
    return None


def _input_norms(
    job: Job,
    pruner: PrunerLike,
    uses: dict[str, list[WeightUse]],
    values: dict[str, np.ndarray],
    session: CaptureSession,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Wanda: per-feature input norms of every handled variable, one pass with the current weights."""
    shapes = {name: pruner.shapes[name] for name in uses}
    return collect_input_norms(session, uses, shapes, values, job.calibration_batches()), {}


def _hessian(
    job: Job,
    pruner: PrunerLike,
    uses: dict[str, list[WeightUse]],
    values: dict[str, np.ndarray],
    session: CaptureSession,
) -> tuple[dict[str, Any], dict[str, str]]:
    """SparseGPT, sequential over dependency waves; the updated weights are written into the variables."""
    plans: dict[str, dict[str, Any]] = {}
    # Before any weight is updated: in global scope, the per-variable targets a magnitude global prune
    # allocates (under the spec's normalization); the pruner then prunes each variable at the same target.
    targets = pruner.layer_targets(1.0)
    for name in uses:
        gran, target = pruner.granularities[name], targets[name]
        if isinstance(gran, NM):
            axis = gran.axis(pruner.kinds[name])
            plans[name] = {"nm": (gran.per_group(target), gran.m), "axis": axis}
        else:
            plans[name] = {"target": target}
    flat = [u for var_uses in uses.values() for u in var_uses]
    sig = job.frozen_signature()
    waves = dependency_waves(sig, flat)
    result = sparsegpt_sequential(
        session,
        waves,
        values,
        plans,
        job.calibration_batches(),
        max_dim=get_settings().calibration_max_dim,
        reuse=reuse_plan(sig, waves),
    )
    for name, obs in result.results.items():
        pruner.variables[name].assign(obs.weight)
    if result.results:
        raised = sorted(n for n, r in result.results.items() if r.damping > 0.01)
        job.note(
            f"criterion 'sparsegpt': {len(result.results)} variable(s) pruned op by op in {len(waves)} dependency "
            "wave(s), each wave's inputs recomputed from the already-pruned model; remaining weights updated "
            "(optimal brain surgeon, blocks of 128 columns, 1% damping)"
            + (f"; damping raised for {raised} (ill-conditioned inputs)" if raised else "")
        )
    return dict(result.results), dict(result.fallback)


# The criterion's ``calibration`` hook -> what collects its statistics.
METHODS: dict[str, Method] = {"input_norms": _input_norms, "hessian": _hessian}
