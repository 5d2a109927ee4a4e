"""Sparsity sweep: the spec once per target, with the Pareto-optimal targets marked.

Two ways to run it, with the same numbers: as trials (``run_sweep_trial``, one task per target on any worker,
each on a model it loaded, then ``aggregate_sweep`` over their documents: ``worker.trial_tasks``, the default),
or in one task (``run_sweep``: every target on the same handle, with the dense weights written back from memory
in between (``DenseCopy``), so the model is loaded once per job). Either way every target runs the ordinary
pipeline (``run_prune``: baseline, prune + fine-tune, evaluation, compaction, saving, exports) from the spec's
seed (``_run_target``). Each target's SavedModel zip becomes the job artifact
``sparsity-0.80`` (``work/artifacts/<name>.zip``, listed by ``GET /v1/jobs/{id}/artifacts`` like the TFLite
exports; a target's exports are ``sparsity-0.80-tflite_int8`` and so on). The top-level document and
``/artifact`` are the highest target's.

``metrics.sweep.points``: per target the metric, parameters, MACs, zip size, latency and ``pareto``: true
when no other target is at least as good on both the metric and the zip size and better on one.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path
from typing import Any

from app.schemas.spec import PruneSpec
from worker.errors import PipelineError
from worker.kinds.prune import RunPrune
from worker.kinds.weights import DenseCopy
from worker.stages.job import Job, Window
from worker.stages.load import seed_everything


def run_sweep(job: Job, window: Window, out_dir: Path, run_prune: RunPrune) -> dict[str, Any]:
    original: PruneSpec = job.spec
    assert original.sweep is not None
    targets = original.sweep.targets
    dense = DenseCopy(job.handle)
    notes_before = list(job.notes)
    points: list[dict[str, Any]] = []
    documents: list[dict[str, Any]] = []
    names = artifact_names(targets)
    for index, target in enumerate(targets):
        tick = time.perf_counter()
        dense.restore()
        part = window.sub(index / len(targets), (index + 1) / len(targets))
        document = _run_target(job, original, index, part, out_dir, run_prune, notes_before)
        if index < len(targets) - 1:
            shutil.rmtree(out_dir / f"target-{index}", ignore_errors=True)
        points.append(_point(target, names[index], document, time.perf_counter() - tick))
        documents.append(document)

    last = documents[-1]
    final_dir = out_dir / f"target-{len(targets) - 1}"
    shutil.copyfile(out_dir / "artifacts" / f"{names[-1]}.zip", out_dir / "pruned.zip")
    if (final_dir / "saved_model").is_dir():
        shutil.rmtree(out_dir / "saved_model", ignore_errors=True)
        os.replace(final_dir / "saved_model", out_dir / "saved_model")
    shutil.rmtree(final_dir, ignore_errors=True)
    return finish_sweep(original, last, points, "on one loaded model (dense weights restored between them)")


def run_sweep_trial(
    job: Job, window: Window, out_dir: Path, run_prune: RunPrune, index: int
) -> dict[str, Any]:
    """One target of the sweep, as a trial task of its own (``worker.trials``): exactly what the loop above
    runs for that target (the same seed, notes and spec), on a model this task loaded. Its zip and exports go
    to ``out_dir/artifacts`` under the job's artifact names; the document is that target's, to be combined by
    ``aggregate_sweep`` once every trial ended."""
    original: PruneSpec = job.spec
    assert original.sweep is not None
    document = _run_target(job, original, index, window, out_dir, run_prune, list(job.notes))
    shutil.rmtree(out_dir / f"target-{index}", ignore_errors=True)
    return document


def _run_target(
    job: Job,
    original: PruneSpec,
    index: int,
    window: Window,
    out_dir: Path,
    run_prune: RunPrune,
    notes_before: list[str],
) -> dict[str, Any]:
    """``run_prune`` at target ``index`` from the same seed; its zip and exports into ``out_dir/artifacts``."""
    assert original.sweep is not None
    target = original.sweep.targets[index]
    name = artifact_names(original.sweep.targets)[index]
    artifacts = out_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    seed_everything(original.seed)
    job.notes[:] = notes_before
    job.spec = original.model_copy(update={"target_sparsity": float(target), "sweep": None})
    run_dir = out_dir / f"target-{index}"
    run_dir.mkdir()
    document = run_prune(window, run_dir)
    os.replace(run_dir / "pruned.zip", artifacts / f"{name}.zip")
    exported = run_dir / "artifacts"
    if exported.is_dir():
        for path in sorted(exported.iterdir()):
            os.replace(path, artifacts / f"{name}-{path.name}")
    return document


def aggregate_sweep(original: PruneSpec, trials: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The sweep's document from its trials (``{"index", "status", "document", "seconds", "error"}`` in
    target order): the same points, Pareto flags and top level as ``run_sweep``; a target whose trial failed
    is a point with its ``error`` and no metric. Returns the document and the index of the target on top (the
    highest that succeeded). Raises ``PipelineError`` when no target succeeded."""
    assert original.sweep is not None
    targets = original.sweep.targets
    names = artifact_names(targets)
    done = [t for t in trials if t["status"] == "succeeded" and t.get("document")]
    if not done:
        first = next((t.get("error") for t in trials if t.get("error")), None) or {}
        raise PipelineError(
            first.get("code") or "trials_failed",
            f"every target of the sweep failed; the first: {first.get('message') or 'no reason recorded'}",
        )
    points: list[dict[str, Any]] = []
    for trial in trials:
        index = trial["index"]
        if trial["status"] == "succeeded" and trial.get("document"):
            points.append(
                _point(targets[index], names[index], trial["document"], float(trial.get("seconds") or 0))
            )
        else:
            points.append(_failed_point(targets[index], trial.get("error"), trial.get("seconds")))
    top = done[-1]
    last = copy.deepcopy(top["document"])
    last.setdefault("notes", [])
    failed = [p["target"] for p in points if "error" in p]
    how = f"as {len(targets)} trial tasks (each on a model its worker loaded, from the same seed)"
    if failed:
        how += f"; failed targets (see each point's error): {failed}"
    return finish_sweep(original, last, points, how), top["index"]


def finish_sweep(
    original: PruneSpec, last: dict[str, Any], points: list[dict[str, Any]], how: str
) -> dict[str, Any]:
    """The top-level document (``last``: the highest target's) with the ``sweep`` section and its note."""
    targets = [p["target"] for p in points if "error" not in p]
    metric, lower = _metric_name(last)
    mark_pareto(points, lower)
    last["spec"] = original.model_dump(mode="json")
    last["sweep"] = {
        "metric": metric,
        "lower_is_better": lower,
        "baseline": _flat(last.get("baseline"), metric),
        "pareto_x": "zip_bytes",
        "points": points,
    }
    last["notes"].append(
        f"sweep: {len(points)} targets {how}; the "
        f"top-level metrics and /artifact are the highest target's ({targets[-1]:g}); every target's zip is "
        "an artifact named sparsity-<target>; Pareto over "
        f"({metric}, zip size): {[p['target'] for p in points if p['pareto']]}"
    )
    return last


def _failed_point(target: float, error: dict[str, Any] | None, seconds: float | None) -> dict[str, Any]:
    return {
        "target": target,
        "sparsity": None,
        "metric": None,
        "params_total": None,
        "params_nonzero": None,
        "dense_macs": None,
        "effective_macs": None,
        "zip_bytes": None,
        "latency_ms_p50": None,
        "latency_batch": None,
        "seconds": round(float(seconds or 0.0), 3),
        "artifact": None,
        "pareto": False,
        "error": error or {"code": "failed", "message": "the trial failed"},
    }


def artifact_names(targets: list[float]) -> list[str]:
    """``sparsity-0.80`` per target: two decimals when they say every target exactly, else up to four."""
    if all(abs(round(t, 2) - t) < 1e-9 for t in targets):
        return [f"sparsity-{t:.2f}" for t in targets]
    return [f"sparsity-{t:.4f}".rstrip("0").rstrip(".") for t in targets]


def _metric_name(document: dict[str, Any]) -> tuple[str, bool]:
    """accuracy (classification) or mse (regression); without labels, the fidelity's output difference."""
    flat = (document.get("pruned") or {}).get("metrics") or {}
    if isinstance(flat, dict) and "accuracy" in flat:
        return "accuracy", False
    if isinstance(flat, dict) and "mse" in flat:
        return "mse", True
    return "mean_abs_output_diff", True


def _flat(side: Any, metric: str) -> float | None:
    if not isinstance(side, dict):
        return None
    metrics = side.get("metrics")
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    if value is None and isinstance(side.get("fidelity"), dict):
        value = side["fidelity"].get(metric)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _point(target: float, name: str, document: dict[str, Any], seconds: float) -> dict[str, Any]:
    pruned = document.get("pruned") or {}
    metric, _ = _metric_name(document)
    latency = pruned.get("latency_ms") or {}
    first = latency[min(latency, key=int)] if latency else {}
    macs = pruned.get("macs") or {}
    return {
        "target": target,
        "sparsity": pruned.get("sparsity"),
        "metric": _flat(pruned, metric),
        "params_total": (pruned.get("params") or {}).get("total"),
        "params_nonzero": (pruned.get("params") or {}).get("nonzero"),
        "dense_macs": macs.get("dense_macs"),
        "effective_macs": macs.get("effective_macs"),
        "zip_bytes": (pruned.get("size_bytes") or {}).get("zip"),
        "latency_ms_p50": first.get("p50"),
        "latency_batch": int(min(latency, key=int)) if latency else None,
        "seconds": round(seconds, 3),
        "artifact": name,
        "pareto": False,
    }


def mark_pareto(points: list[dict[str, Any]], lower_is_better: bool) -> None:
    """``pareto`` = not dominated on (metric: higher better unless ``lower_is_better``, zip bytes: lower)."""

    def key(p: dict[str, Any]) -> tuple[float, float] | None:
        metric, size = p.get("metric"), p.get("zip_bytes")
        if metric is None or size is None:
            return None
        return (-metric if lower_is_better else metric, -float(size))  # both: larger is better

    keys = [key(p) for p in points]
    for p, k in zip(points, keys, strict=True):
        p["pareto"] = k is not None and not any(
            o is not None and o[0] >= k[0] and o[1] >= k[1] and o != k for o in keys
        )
