"""The pruning engine side by side: criteria, scopes and granularities on the digits CNN at 50/80/90%.

Run: ``.venv/bin/python -m bench.engine_table`` (about 1 minute on 2 cores). Writes
``bench/out/engine_table.{md,json}`` and prints the markdown table.

Model: ``tests.support.model_factory.build_keras3_export`` (Keras 3 CNN: Conv2D 8 + BatchNorm + Dense 32 + Dense 10)
trained ``BASELINE_EPOCHS`` epochs (seed 0; must reach ``BASELINE_MIN_ACCURACY`` test accuracy, checked).
Data: scikit-learn digits, ``model_factory.digits_datasets()`` (1347 train / 450 test, stratified, split 0).

Every configuration gets the same budget: ``{"schedule": {"kind": "polynomial"}, "fine_tune": {"epochs": 3}}``
(defaults: batch 32, Adam, learning rate 1e-3 constant; the sparsity ramps over the first 75% of the steps),
seed 0, layer scope unless the row says global. l1/l2 add their penalty during the ramp (strength 1e-3).
Jobs run in-process through ``worker.pipeline.run_pipeline`` -- the exact code path of a worker -- which
checks the artifact (reload, signatures, exact zeros) before returning. "zip" is the deflate-compressed
pruned SavedModel, the size a user downloads. A sanity gate fails the run when ``random`` is not worse than
``magnitude`` at every sparsity: a criterion that cannot beat chance means something is broken.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR
from bench.digits_quality import prepare

BASELINE_EPOCHS = 20
BASELINE_MIN_ACCURACY = 0.97
SPARSITIES = (0.5, 0.8, 0.9)
BUDGET: dict[str, Any] = {"schedule": {"kind": "polynomial"}, "fine_tune": {"epochs": 3}, "seed": 0}
FAST_LATENCY = {"latency": {"batch_sizes": [1], "runs": 3}}  # latency is not what this table compares

# row label -> spec fragment (and the sparsities it runs at; default SPARSITIES)
CONFIGS: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "magnitude, layer": ({}, SPARSITIES),
    "magnitude, global": ({"scope": "global"}, SPARSITIES),
    "magnitude, global + LAMP": ({"scope": "global", "normalization": "lamp"}, SPARSITIES),
    "gradient": ({"criterion": "gradient"}, SPARSITIES),
    "taylor": ({"criterion": "taylor"}, SPARSITIES),
    "l1": ({"criterion": "l1"}, SPARSITIES),
    "l2": ({"criterion": "l2"}, SPARSITIES),
    "random": ({"criterion": "random"}, SPARSITIES),
    "channel (magnitude)": ({"granularity": "channel"}, SPARSITIES),
    "2:4 (magnitude)": ({"granularity": "2:4"}, (0.5,)),
}


def _baseline(cache: Path) -> tuple[Path, tuple[dict[str, Any], dict[str, Any]], float, float]:
    """The trained CNN (bench.digits_quality's, cached), its datasets, its test accuracy and its training time."""
    import numpy as np

    from tests.support import model_factory
    from worker.models import load_model

    data = model_factory.digits_datasets()
    baseline = prepare(cache, BASELINE_EPOCHS)
    saved: Path = baseline["saved_model"]
    handle = load_model(saved)
    probs = handle.call("serving_default", {"image": data[1]["x"]})["output_0"].numpy()
    accuracy = float(np.mean(probs.argmax(axis=1) == data[1]["y"]))
    if accuracy < BASELINE_MIN_ACCURACY:
        raise SystemExit(f"baseline test accuracy {accuracy:.3f} < {BASELINE_MIN_ACCURACY}: train longer")
    return saved, data, accuracy, baseline["train_s"]


def run_all(work: Path) -> dict[str, Any]:
    """Every configuration at its sparsities; returns the results document."""
    from app.schemas.spec import PruneSpec
    from worker.pipeline import run_pipeline

    model, data, base_accuracy, trained = _baseline(OUT_DIR / "cache")
    rows: list[dict[str, Any]] = []
    baseline_zip = 0
    for label, (fragment, sparsities) in CONFIGS.items():
        for sparsity in sparsities:
            spec = PruneSpec.model_validate(
                {"target_sparsity": sparsity, **BUDGET, **fragment, "evaluation": FAST_LATENCY}
            )
            out = work / f"{len(rows):02d}"
            out.mkdir(parents=True)
            tick = time.perf_counter()
            metrics = run_pipeline(model, spec, data[0], data[1], out, lambda stage, progress: None)
            rows.append(
                {
                    "config": label,
                    "target_sparsity": sparsity,
                    "accuracy": metrics["pruned"]["metrics"]["accuracy"],
                    "sparsity": metrics["pruned"]["sparsity"],
                    "zip_bytes": metrics["pruned"]["size_bytes"]["zip"],
                    "seconds": round(time.perf_counter() - tick, 1),
                }
            )
            print(f"{label:28s} {sparsity:.0%}: {rows[-1]}", file=sys.stderr, flush=True)
            baseline_zip = metrics["baseline"]["size_bytes"]["zip"]
    return {
        "date": date.today().isoformat(),
        "baseline": {"accuracy": base_accuracy, "zip_bytes": baseline_zip, "train_s": round(trained, 1)},
        "budget": BUDGET,
        "rows": rows,
    }


def _cell(rows: list[dict[str, Any]], config: str, sparsity: float) -> str:
    row = next((r for r in rows if r["config"] == config and r["target_sparsity"] == sparsity), None)
    if row is None:
        return "—"
    achieved = "" if abs(row["sparsity"] - sparsity) < 0.005 else f" (at {row['sparsity']:.0%})"
    return f"{row['accuracy']:.3f} / {row['zip_bytes'] / 1024:.0f} KB{achieved}"


def markdown(doc: dict[str, Any]) -> str:
    base = doc["baseline"]
    lines = [
        f"Digits CNN ({BASELINE_EPOCHS} epochs; baseline test accuracy {base['accuracy']:.3f}, zip "
        f"{base['zip_bytes'] / 1024:.0f} KB), {doc['date']}. Each cell: test accuracy / pruned zip; same budget "
        "for all: polynomial schedule, 3 fine-tuning epochs (batch 32, Adam 1e-3), seed 0. '(at x%)' = the "
        "sparsity reached over all prunable weights when a variable is left dense (channel: the output layer).",
        "",
        "| configuration | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |",
        "|---|" + "---|" * len(SPARSITIES),
    ]
    for config in CONFIGS:
        lines.append(f"| {config} | " + " | ".join(_cell(doc["rows"], config, s) for s in SPARSITIES) + " |")
    return "\n".join(lines)


def sanity(doc: dict[str, Any]) -> list[str]:
    """Problems that mean the engine is broken (empty when fine)."""
    problems = []
    for sparsity in SPARSITIES:
        acc = {r["config"]: r["accuracy"] for r in doc["rows"] if r["target_sparsity"] == sparsity}
        if acc["random"] >= acc["magnitude, layer"]:
            problems.append(f"random ({acc['random']:.3f}) is not worse than magnitude at {sparsity:.0%}")
    return problems


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="engine-table-") as tmp:
        doc = run_all(Path(tmp))
    doc["problems"] = sanity(doc)
    table = markdown(doc)
    (OUT_DIR / "engine_table.json").write_text(json.dumps(doc, indent=2))
    (OUT_DIR / "engine_table.md").write_text(table + "\n")
    print(table)
    if doc["problems"]:
        print("\nBROKEN: " + "; ".join(doc["problems"]))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
