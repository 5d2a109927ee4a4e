"""Sparsity sweep: the spec once per target on one loaded model, with the Pareto-optimal targets marked.

Every target runs the ordinary pipeline (``run_prune``: baseline, prune + fine-tune, evaluation, compaction,
saving, exports) on the same handle, with the dense weights written back from memory in between
(``DenseCopy``), so the model is loaded once per job. Each target's SavedModel zip becomes the job artifact
``sparsity-0.80`` (``work/artifacts/<name>.zip``, listed by ``GET /v1/jobs/{id}/artifacts`` like the TFLite
exports; a target's exports are ``sparsity-0.80-tflite_int8`` and so on). The top-level document and
``/artifact`` are the highest target's.

``metrics.sweep.points``: per target the metric, parameters, MACs, zip size, latency and ``pareto``: true
when no other target is at least as good on both the metric and the zip size and better on one.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from app.schemas.spec import PruneSpec
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
    artifacts = out_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    documents: list[dict[str, Any]] = []
    names = artifact_names(targets)
    for index, target in enumerate(targets):
        tick = time.perf_counter()
        dense.restore()
        seed_everything(original.seed)
        job.notes[:] = notes_before
        job.spec = original.model_copy(update={"target_sparsity": float(target), "sweep": None})
        run_dir = out_dir / f"target-{index}"
        run_dir.mkdir()
        document = run_prune(window.sub(index / len(targets), (index + 1) / len(targets)), run_dir)
        name = names[index]
        os.replace(run_dir / "pruned.zip", artifacts / f"{name}.zip")
        exported = run_dir / "artifacts"
        if exported.is_dir():
            for path in sorted(exported.iterdir()):
                os.replace(path, artifacts / f"{name}-{path.name}")
        if index < len(targets) - 1:
            shutil.rmtree(run_dir, ignore_errors=True)
        points.append(_point(target, name, document, time.perf_counter() - tick))
        documents.append(document)

    last = documents[-1]
    final_dir = out_dir / f"target-{len(targets) - 1}"
    shutil.copyfile(artifacts / f"{names[-1]}.zip", out_dir / "pruned.zip")
    if (final_dir / "saved_model").is_dir():
        shutil.rmtree(out_dir / "saved_model", ignore_errors=True)
        os.replace(final_dir / "saved_model", out_dir / "saved_model")
    shutil.rmtree(final_dir, ignore_errors=True)
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
    job.notes.append(
        f"sweep: {len(targets)} targets on one loaded model (dense weights restored between them); the "
        f"top-level metrics and /artifact are the highest target's ({targets[-1]:g}); every target's zip is "
        "an artifact named sparsity-<target>; Pareto over "
        f"({metric}, zip size): {[p['target'] for p in points if p['pareto']]}"
    )
    return last


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
