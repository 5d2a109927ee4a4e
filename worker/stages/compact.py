"""Compaction stage: the pruned (masked) model rebuilt without its removed channels, checked, measured.

Zeros do not make TensorFlow's dense kernels faster; a model whose removed channels are gone does. After
pruning and fine-tuning, with the spec's ``compact`` true:

1. Which channels go: under ``channel`` granularity the groups ``GroupPruner`` removed; under any other
   granularity the channels of the graph's groups whose producers ended all zero (``zero_channel_keep``).
2. ``worker.structure.compact`` writes a SavedModel with the smaller variables and the input's signatures.
3. Equivalence: the compact model is loaded once and run on the job's data (the reference data of the
   evaluation: the eval set, else a train sample; seeded random inputs when there is no dataset); every
   output must be within ``ATOL + RTOL * max |masked output|`` of the masked model's, element by element.
   The max abs differences are recorded. A failed check, a failed rewrite, or nothing to remove leaves the
   masked model as the artifact and ``structure.notes`` says why -- never a wrong model.
4. Measured on the compact model: parameters (its variables), the prunable weights and MACs per kernel
   from the new shapes (a removed channel takes its weights and their MACs with it; spatial sizes do not
   change), latency (the caller times the loaded compact handle).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from worker.evaluation.flops import estimate_flops, flops_totals
from worker.models import ModelHandle, NamedVariable, load_model
from worker.pruning.group_pruner import zero_channel_keep
from worker.pruning.interface import PrunerLike
from worker.pruning.pruner import variable_view
from worker.stages.evaluate import Reference, Weights
from worker.stages.job import Data, Job, predict

__all__ = [
    "ATOL",
    "RTOL",
    "Compacted",
    "Compaction",
    "check_shapes",
    "compact_model",
    "measure_compact",
]

RTOL = 1e-4  # of the largest masked output magnitude: summing fewer terms reorders float32 rounding
ATOL = 1e-5
CHECK_SAMPLES_WITHOUT_DATA = 16  # seeded random inputs when the job has no dataset
PROBE_SAMPLES = 8  # job inputs the rewrite reads constant channels off (and checks every signature on)


@dataclass
class Compacted:
    """The compact model: where it is, loaded once (latency, checks), and the new shapes of the job's
    variables whose shapes changed."""

    path: Path
    handle: ModelHandle
    shapes: dict[str, tuple[int, ...]]
    job: Job  # the job with ``handle`` replaced (for predict/Weights-style reads)


@dataclass
class Compaction:
    """What the stage did: the compact model (None: the artifact is the masked model) and ``structure``."""

    compacted: Compacted | None
    structure: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


def compact_model(
    job: Job,
    pruner: PrunerLike,
    reference: Reference | None,
    masked_outputs: Mapping[str, np.ndarray] | None,
    target: Path,
) -> Compaction:
    """Run steps 1-3 of the module docstring, writing the compact model to ``target`` (the artifact's
    directory; removed again when the masked model is the artifact). Time: ``timings_s.compact``."""
    spec = job.spec
    rows = pruner.structure_groups()
    if not spec.compact:
        if pruner.analysis is None:  # no groups were read: nothing to say about structure
            return Compaction(None, None)
        notes = ["compact is false: the artifact is the masked model"]
        return Compaction(None, _structure(False, rows, notes=notes))
    tick = time.perf_counter()
    try:
        return _compact(job, pruner, reference, masked_outputs, target, rows)
    finally:
        job.timings["compact"] = time.perf_counter() - tick


def _compact(
    job: Job,
    pruner: PrunerLike,
    reference: Reference | None,
    masked_outputs: Mapping[str, np.ndarray] | None,
    target: Path,
    rows: list[dict[str, Any]],
) -> Compaction:
    if pruner.analysis is not None:  # the groups the pruner removed
        analysis = pruner.analysis
        keep = pruner.group_keep()
    else:
        analysis, problem = job.channel_groups()
        if analysis is None:
            return _masked(target, rows, str(problem))
        values = {nv.name: nv.var for nv in job.handle.variables()}
        shapes = {name: tuple(int(d) for d in var.shape) for name, var in values.items()}
        keep, rows = zero_channel_keep(analysis.groups, shapes, lambda name: values[name].numpy())
    if all(flags.all() for flags in keep.values()):
        return _masked(target, rows, "no channel group lost a channel")

    from worker.structure import compact  # the library: graphs and arrays in, a model directory out

    if target.exists():
        shutil.rmtree(target)
    probe = None
    if reference is not None:  # the job's own inputs for reading constants off the masked model
        probe = {k: v[:PROBE_SAMPLES] for k, v in reference.data.x.items()}
    tick = time.perf_counter()
    try:
        result = compact(job.handle, analysis, keep, target, inputs=probe)
    except Exception as exc:  # a rewrite it cannot do: the masked model is still correct
        return _masked(target, rows, f"the rewrite failed ({type(exc).__name__}: {str(exc)[:300]})")
    rewrite_s = time.perf_counter() - tick
    tick = time.perf_counter()
    library_notes = [str(n) for n in result.notes]
    compact_rows = _with_result(rows, result.channels)
    if result.params_after >= result.params_before and not result.shapes:
        return _masked(target, rows, "the rewrite could remove no channel", library_notes)
    try:
        handle = load_model(target)
    except Exception as exc:
        return _masked(target, rows, f"the compact model does not load ({exc})", library_notes)
    compact_job = replace(job, handle=handle, notes=[], timings={}, gradient_passes=[], analyses={})
    if handle.signatures != job.handle.signatures:
        return _masked(target, rows, "the compact model's signatures differ from the input's", library_notes)

    data, expected = _check_data(job, reference, masked_outputs)
    if data is None or expected is None:
        return _masked(target, rows, "no inputs to check the compact model on", library_notes)
    try:
        got = predict(compact_job, data)
    except Exception as exc:
        return _masked(target, rows, f"the compact model fails on the job's data ({exc})", library_notes)
    diffs, tolerance, failed = _compare(expected, got)
    if failed:
        outcome = _masked(target, rows, f"equivalence check failed: {failed}", library_notes)
        assert outcome.structure is not None
        outcome.structure.update(max_abs_diff=diffs, tolerance=tolerance)
        return outcome
    shapes = {name: tuple(after) for name, (_, after) in result.shapes.items()}
    problem = check_shapes(target, shapes)
    if problem is not None:
        return _masked(target, rows, problem, library_notes)
    compacted = Compacted(target, handle, shapes, compact_job)
    structure = _structure(True, compact_rows, diffs, tolerance, library_notes or None)
    # Where the time goes: the rewrite (analysis already done, slicing, saving, its own check on probes) and
    # this stage's load + check on the job's data.
    structure["seconds"] = {"rewrite": round(rewrite_s, 3), "check": round(time.perf_counter() - tick, 3)}
    return Compaction(compacted, structure)


def _with_result(rows: list[dict[str, Any]], channels: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Rows with the channels the rewrite actually removed (it keeps a channel it cannot remove exactly)."""
    out = []
    for row in rows:
        row = dict(row)
        if "channels_after" in row and row["id"] in channels:
            after = int(channels[row["id"]][1])
            if after != row["channels_after"]:
                row["channels_zeroed"] = row["channels_before"] - row["channels_after"]
            row["channels_after"] = after
        out.append(row)
    return out


def _masked(target: Path, rows: list[dict[str, Any]], why: str, extra: Sequence[str] = ()) -> Compaction:
    """The artifact stays the masked model: whatever the rewrite wrote goes, ``structure`` says why."""
    if target.exists():
        shutil.rmtree(target)
    line = f"nothing compacted: {why}; the artifact is the masked model"
    return Compaction(None, _structure(False, rows, notes=[line, *extra]), [line])


def check_shapes(saved: Path, shapes: Mapping[str, Sequence[int]]) -> str | None:
    """None when the SavedModel's checkpoint holds a tensor of every new shape (as many as expected), read
    from the files (checkpoint keys are object paths, not our variable names); else what is missing."""
    reader = tf.train.load_checkpoint(str(saved / "variables" / "variables"))
    on_disk: dict[tuple[int, ...], int] = {}
    for shape in reader.get_variable_to_shape_map().values():
        on_disk[tuple(shape)] = on_disk.get(tuple(shape), 0) + 1
    wanted: dict[tuple[int, ...], list[str]] = {}
    for name, shape in shapes.items():
        wanted.setdefault(tuple(int(d) for d in shape), []).append(name)
    missing = [
        f"{names} {list(shape)}" for shape, names in wanted.items() if on_disk.get(shape, 0) < len(names)
    ]
    if missing:
        return f"the compact checkpoint lacks variables of the expected new shapes: {'; '.join(missing[:5])}"
    return None


def _structure(
    compact: bool,
    rows: list[dict[str, Any]],
    diffs: dict[str, float | None] | None = None,
    tolerance: dict[str, float] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"compact": compact, "groups": rows, "max_abs_diff": diffs}
    if tolerance is not None:
        out["tolerance"] = tolerance
    if notes:
        out["notes"] = notes
    return out


def _check_data(
    job: Job, reference: Reference | None, masked_outputs: Mapping[str, np.ndarray] | None
) -> tuple[Data | None, Mapping[str, np.ndarray] | None]:
    """The reference data and the masked outputs on it; without a dataset, seeded random inputs."""
    if reference is not None and masked_outputs is not None:
        return reference.data, masked_outputs
    rng = np.random.default_rng(job.spec.seed)
    x: dict[str, np.ndarray] = {}
    for name, info in job.sig.inputs.items():
        shape = info["shape"]
        dtype = tf.as_dtype(info["dtype"])
        if shape is None or not dtype.is_floating:
            return None, None
        dims = [CHECK_SAMPLES_WITHOUT_DATA if i == 0 else (d or 1) for i, d in enumerate(shape)]
        if shape and shape[0] is not None:
            dims[0] = shape[0]
        x[name] = rng.standard_normal(dims).astype(dtype.as_numpy_dtype)
    data = Data(x=x, y=None)
    return data, predict(job, data)


def _compare(
    expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
) -> tuple[dict[str, float | None], dict[str, float], str | None]:
    """Per output: max |got - expected|, the tolerance, and the first failure (None: all within)."""
    diffs: dict[str, float | None] = {}
    tolerance: dict[str, float] = {}
    failed: str | None = None
    for name, want in sorted(expected.items()):
        have = got.get(name)
        want = np.asarray(want)
        if have is None or np.shape(have) != want.shape:
            diffs[name] = None
            failed = failed or f"output {name!r} is missing or has shape {np.shape(have)}, not {want.shape}"
            continue
        if not np.issubdtype(want.dtype, np.number):
            same = bool(np.array_equal(have, want))
            diffs[name] = 0.0 if same else None
            failed = failed or (None if same else f"output {name!r} differs")
            continue
        want64 = want.astype(np.float64)
        diff = np.abs(np.asarray(have, np.float64) - want64)
        finite = np.isfinite(want64)
        nan_mismatch = bool((np.isfinite(np.asarray(have, np.float64)) != finite).any())
        biggest = float(np.abs(want64[finite]).max()) if finite.any() else 0.0
        tol = ATOL + RTOL * biggest
        worst = float(diff[finite].max()) if finite.any() else 0.0
        diffs[name], tolerance[name] = worst, tol
        if nan_mismatch or worst > tol:
            failed = failed or f"output {name!r} differs by up to {worst:.3g} (tolerance {tol:.3g})"
    return diffs, tolerance, failed


def measure_compact(
    job: Job, weights: Weights, prunable: Sequence[NamedVariable], compacted: Compacted
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``({"params", "sparsity", "macs"}, per-layer row updates)`` of the compact model.

    ``params.total``/``nonzero`` are counted on the loaded compact model's variables; the prunable weights and
    the MACs per kernel come from the new shapes (``estimate_flops`` with the same spatial sizes): the
    removed channels were all zero, so each kernel keeps its nonzero count."""
    total = nonzero_all = 0
    for nv in compacted.handle.variables():
        total += nv.size
        nonzero_all += int(np.count_nonzero(variable_view(nv.var))) if nv.size else 0
    nonzero = {nv.name: int(np.count_nonzero(variable_view(nv.var))) for nv in job.handle.variables()}
    shape_of = {
        nv.name: tuple(compacted.shapes.get(nv.name, tuple(nv.shape))) for nv in job.handle.variables()
    }
    prunable_size = sum(math.prod(shape_of[nv.name]) for nv in prunable)
    prunable_nonzero = sum(nonzero[nv.name] for nv in prunable)
    side: dict[str, Any] = {
        "params": {"total": total, "prunable": prunable_size, "nonzero": nonzero_all},
        "sparsity": 1.0 - prunable_nonzero / prunable_size if prunable_size else 0.0,
    }
    layers = [
        {"name": nv.name, "shape": list(shape_of[nv.name]), "kind": weights.kinds.get(nv.name)}
        for nv in weights.kernels
    ]
    rows = estimate_flops(layers, {nv.name: nonzero[nv.name] for nv in weights.kernels}, weights.spatial)
    if rows:
        side["macs"] = flops_totals(rows)
    updates: dict[str, dict[str, Any]] = {}
    macs = {row["name"]: row for row in rows}
    for nv in prunable:
        size = math.prod(shape_of[nv.name])
        update: dict[str, Any] = {
            "shape": list(shape_of[nv.name]),
            "params": size,
            "sparsity": 1.0 - nonzero[nv.name] / size if size else 0.0,
        }
        if nv.name in compacted.shapes:
            update["shape_before"] = list(nv.shape)
        row = macs.get(nv.name)
        if row is not None:
            update.update(dense_macs=row["dense_macs"], effective_macs=row["effective_macs"])
        updates[nv.name] = update
    return side, updates
