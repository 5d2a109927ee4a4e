"""Metrics documents for report tests, built by hand (no TensorFlow), shaped like the worker's real output."""

from __future__ import annotations

import copy
from typing import Any

HOSTILE = '<script>alert("x")</script>'


def _classification(accuracy: float, diagonal: int, off: int) -> dict[str, Any]:
    matrix = [
        [diagonal if i == j else (off if j == (i + 1) % 10 else 0) for j in range(10)] for i in range(10)
    ]
    return {
        "task": "classification",
        "accuracy": accuracy,
        "precision_macro": accuracy,
        "recall_macro": accuracy,
        "f1_macro": accuracy,
        "confusion_matrix": matrix,
        "loss": 1 - accuracy,
    }


def _side(
    accuracy: float, sparsity: float, nonzero: int, zip_bytes: int, diagonal: int, off: int
) -> dict[str, Any]:
    return {
        "metrics": _classification(accuracy, diagonal, off),
        "params": {"total": 16858, "prunable": 16776, "nonzero": nonzero},
        "sparsity": sparsity,
        "size_bytes": {"saved_model": 208000, "zip": zip_bytes},
        "latency_ms": {"1": {"p50": 0.35, "p95": 0.55, "mean": 0.38, "runs": 20, "warmup": 2}},
        "macs": {"dense_macs": 21312, "effective_macs": int(21312 * (1 - sparsity)), "uncounted": []},
    }


def prune_document(job_id: str = "job_report", model_id: str = "mdl_report") -> dict[str, Any]:
    """A one-shot prune job's document with a hostile variable name and note."""
    return {
        "job_id": job_id,
        "model_id": model_id,
        "spec": {"target_sparsity": 0.7, "criterion": "magnitude", "include": [HOSTILE]},
        "baseline": _side(0.95, 0.0, 16776, 136000, 43, 2),
        "pruned": {**_side(0.93, 0.7, 5115, 59000, 42, 3), "fidelity": {"mean_abs_output_diff": 0.01}},
        "delta": {"accuracy": -0.02, "loss": 0.02},
        "layers": [
            {
                "name": "digits_cnn/conv2d/kernel",
                "shape": [3, 3, 1, 8],
                "params": 72,
                "sparsity": 0.69,
                "target": 0.7,
            },
            {
                "name": f"digits_cnn/{HOSTILE}/kernel",
                "shape": [512, 32],
                "params": 16384,
                "sparsity": 0.7,
                "target": 0.7,
            },
            {
                "name": "digits_cnn/dense_1/kernel",
                "shape": [32, 10],
                "params": 320,
                "sparsity": 0.7,
                "target": 0.7,
            },
        ],
        "timings_s": {
            "load": 0.1,
            "baseline": 0.1,
            "prune": 0.03,
            "fine_tune": 1.3,
            "evaluate": 0.1,
            "save": 0.2,
            "total": 1.8,
        },
        "notes": [f"a note with {HOSTILE} & <b>markup</b>"],
        "versions": {"secateurs": "0.1.0", "tensorflow": "2.21.0"},
    }


def search_sweep_sensitivity_document() -> dict[str, Any]:
    """Every kind's section in one document, so one page shows every figure."""
    doc = copy.deepcopy(prune_document())
    doc["search"] = {
        "metric": "accuracy",
        "baseline": 0.95,
        "threshold": 0.94,
        "chosen": {"sparsity": 0.82, "metric": 0.945},
        "budget_exhausted": False,
        "trials": [
            {"sparsity": s, "metric": m, "passed": m >= 0.94, "seconds": 1.0, "phase": ph}
            for s, m, ph in [
                (0.3, 0.95, "probe"),
                (0.95, 0.4, "probe"),
                (0.8, 0.947, "fine_tune"),
                (0.9, 0.91, "fine_tune"),
                (0.85, 0.935, "fine_tune"),
                (0.82, 0.945, "fine_tune"),
            ]
        ],
    }
    doc["sweep"] = {
        "metric": "accuracy",
        "baseline": 0.95,
        "pareto_x": "zip_bytes",
        "points": [
            {"target": 0.5, "sparsity": 0.5, "metric": 0.951, "zip_bytes": 90000, "pareto": True},
            {"target": 0.7, "sparsity": 0.7, "metric": 0.93, "zip_bytes": 95000, "pareto": False},
            {"target": 0.8, "sparsity": 0.8, "metric": 0.94, "zip_bytes": 50000, "pareto": True},
            {"target": 0.9, "sparsity": 0.9, "metric": 0.9, "zip_bytes": 35000, "pareto": True},
        ],
    }
    names = [row["name"] for row in doc["layers"]]
    sparsities = [0.3, 0.6, 0.9]
    doc["sensitivity"] = {
        "metric": "accuracy",
        "baseline": 0.95,
        "sparsities": sparsities,
        "max_drop": 0.01,
        "variables": [
            {
                "name": name,
                "params": 100,
                "metrics": [0.95 - k * s * 0.1 for s in sparsities],
                "drops": [k * s * 0.1 for s in sparsities],
                "max_sparsity_within_drop": 0.3,
            }
            for k, name in enumerate(names, start=1)
        ],
        "layer_sparsity": {f"^{name}$": 0.3 for name in names},
    }
    return doc
