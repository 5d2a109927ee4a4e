"""Quality after pruning: the digits CNN pruned through the API at several sparsities and seeds.

Model: ``tests.support.model_factory.build_keras3_export`` (Keras 3 CNN, ``model.export``), trained for
``BASELINE_EPOCHS`` epochs (seed 0) so the baseline reaches >= 97% test accuracy (checked before the API run).
Data: ``model_factory.digits_datasets()`` -- scikit-learn's digits, split seed 0, stratified 75/25
(1347 train / 450 test); the train split is the fine-tuning set, the test split the evaluation set.

One embedded ``secateurs serve`` subprocess (fresh data directory); the model and both datasets are uploaded
once; one job per (sparsity, seed) with ``{"schedule": {"kind": "polynomial"}, "fine_tune": {"epochs": 3},
"seed": seed}``. Accuracies are the service's metrics JSON; every artifact is also downloaded and scored here
with TensorFlow on the same test split, so the table is checked against the model actually shipped.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    OUT_DIR,
    Api,
    BenchError,
    Server,
    md_table,
    mean_std,
    signature_names,
    unzip,
    verify_pruned,
)
from tests.support.model_cache import cached_model

BASELINE_EPOCHS = 20
BASELINE_MIN_ACCURACY = 0.97
SPARSITIES = (0.5, 0.8, 0.9)
SEEDS = (0, 1, 2)
FINE_TUNE_EPOCHS = 3
SMOKE = {"baseline_epochs": 3, "sparsities": (0.8,), "seeds": (0,), "fine_tune_epochs": 1}


def digits_cnn(root: Path, epochs: int) -> dict[str, Any]:
    """A ``cached_model`` builder: the CNN trained ``epochs`` epochs (seed 0) and exported, its zip, the
    train/test npz, and the test accuracy measured here."""
    from tests.support import model_factory

    tick = time.perf_counter()
    model_factory.build_keras3_export(root / "saved_model", epochs=epochs, seed=0)
    trained = time.perf_counter() - tick
    model_factory.zip_saved_model(root / "saved_model", root / "model.zip", top="digits_cnn")
    train, test = model_factory.digits_datasets()
    model_factory.write_npz(root / "train.npz", train)
    model_factory.write_npz(root / "test.npz", test)
    return {
        "epochs": epochs,
        "train_s": trained,
        "n_train": len(train["y"]),
        "n_test": len(test["y"]),
        "local_accuracy": local_accuracy(root / "saved_model"),
    }


def prepare(cache_dir: Path, epochs: int) -> dict[str, Any]:
    """The digits CNN of ``digits_cnn`` (cached), with the paths of its files."""
    root, meta = cached_model(digits_cnn, epochs, cache_dir=cache_dir)
    return {
        **meta,
        "saved_model": root / "saved_model",
        "zip": root / "model.zip",
        "train": root / "train.npz",
        "test": root / "test.npz",
    }


def local_accuracy(saved_model: Path) -> float:
    """Test-split accuracy of a SavedModel's ``serving_default``, computed here (not by the service)."""
    import numpy as np
    import tensorflow as tf

    from tests.support import model_factory

    _, test = model_factory.digits_datasets()
    fn = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    (name,) = fn.structured_input_signature[1]
    out = fn(**{name: tf.constant(test["x"])})
    probs = next(iter(out.values())).numpy()
    return float(np.mean(np.argmax(probs, axis=1) == test["y"]))


def run_digits(
    smoke: bool = False, cache_dir: Path | None = None, work_dir: Path | None = None
) -> dict[str, Any]:
    """Upload once, one job per (sparsity, seed), verify every artifact; returns per-cell results + markdown."""
    cache_dir = cache_dir or OUT_DIR / "cache"
    work_dir = work_dir or OUT_DIR / ("digits-smoke" if smoke else "digits")
    epochs = SMOKE["baseline_epochs"] if smoke else BASELINE_EPOCHS
    sparsities = SMOKE["sparsities"] if smoke else SPARSITIES
    seeds = SMOKE["seeds"] if smoke else SEEDS
    ft_epochs = SMOKE["fine_tune_epochs"] if smoke else FINE_TUNE_EPOCHS

    inputs = prepare(cache_dir, epochs)
    if not smoke and inputs["local_accuracy"] < BASELINE_MIN_ACCURACY:
        raise BenchError(
            f"baseline test accuracy {inputs['local_accuracy']:.4f} < {BASELINE_MIN_ACCURACY}: "
            "train longer (BASELINE_EPOCHS)"
        )
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    started = time.perf_counter()
    cells: list[dict[str, Any]] = []
    with Server(work_dir / "server") as server, Api(server.base_url) as api:
        model = api.upload("/v1/models", inputs["zip"], name="digits-cnn")
        train = api.upload("/v1/datasets", inputs["train"])
        test = api.upload("/v1/datasets", inputs["test"])
        api.wait_model(model["id"])
        for sparsity in sparsities:
            for seed in seeds:
                spec = {
                    "target_sparsity": sparsity,
                    "schedule": {"kind": "polynomial"},
                    "fine_tune": {"epochs": ft_epochs},
                    "seed": seed,
                }
                job, submitted = api.submit_job(
                    {
                        "model_id": model["id"],
                        "train_dataset_id": train["id"],
                        "eval_dataset_id": test["id"],
                        "spec": spec,
                    }
                )
                cells.append(
                    {"sparsity": sparsity, "seed": seed, "job_id": job["id"], "submitted": submitted}
                )
        print(f"[digits] {len(cells)} job(s) queued", file=sys.stderr, flush=True)
        for cell in cells:  # the one worker runs them in order; wait for each in turn
            run = api.wait_job(cell.pop("job_id"), cell.pop("submitted"))
            metrics = api.get(f"/v1/jobs/{run.body['id']}/metrics")
            artifact = work_dir / f"s{cell['sparsity']}_seed{cell['seed']}.zip"
            api.download(run.body["id"], artifact)
            cell.update(
                job_id=run.body["id"],
                baseline_accuracy=metrics["baseline"]["metrics"]["accuracy"],
                accuracy=metrics["pruned"]["metrics"]["accuracy"],
                sparsity_measured=metrics["pruned"]["sparsity"],
                job_s=metrics["timings_s"]["total"],
                fine_tune_s=metrics["timings_s"]["fine_tune"],
                artifact=artifact,
            )
            print(
                f"[digits]   sparsity {cell['sparsity']} seed {cell['seed']}: accuracy {cell['accuracy']:.4f}",
                file=sys.stderr,
                flush=True,
            )
    wall = time.perf_counter() - started

    expected = signature_names(inputs["saved_model"])
    for cell in cells:
        unzipped = unzip(cell.pop("artifact"), work_dir / f"s{cell['sparsity']}_seed{cell['seed']}")
        check = verify_pruned(unzipped, expected, cell["sparsity"])
        cell["verified"] = check["ok"]
        cell["local_accuracy"] = local_accuracy(unzipped)
        if not check["ok"]:
            raise BenchError(f"artifact of {cell['job_id']} failed verification: {check}")

    baselines = {round(c["baseline_accuracy"], 6) for c in cells}
    summary = []
    for sparsity in sparsities:
        row = [c for c in cells if c["sparsity"] == sparsity]
        mean, std = mean_std([c["accuracy"] for c in row])
        summary.append(
            {
                "sparsity": sparsity,
                "n": len(row),
                "accuracy_mean": mean,
                "accuracy_std": std,
                "accuracies": [c["accuracy"] for c in row],
                "local_accuracies": [c["local_accuracy"] for c in row],
                "sparsity_measured": [c["sparsity_measured"] for c in row],
                "job_s_mean": mean_std([c["job_s"] for c in row])[0],
            }
        )
    result = {
        "smoke": smoke,
        "baseline": {
            "epochs": epochs,
            "accuracy_api": cells[0]["baseline_accuracy"],
            "accuracy_local": inputs["local_accuracy"],
            "consistent_across_jobs": len(baselines) == 1,
            "n_train": inputs["n_train"],
            "n_test": inputs["n_test"],
        },
        "fine_tune_epochs": ft_epochs,
        "cells": cells,
        "summary": summary,
        "wall_s": wall,
    }
    result["markdown"] = render(result)
    return result


def render(result: dict[str, Any]) -> str:
    base = result["baseline"]
    rows = []
    for s in result["summary"]:
        rows.append(
            [
                f"{s['sparsity']:.1f}",
                f"{base['accuracy_api']:.4f}",
                f"{s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f}",
                f"{s['accuracy_mean'] - base['accuracy_api']:+.4f}",
                ", ".join(f"{a:.4f}" for a in s["accuracies"]),
                ", ".join(f"{a:.4f}" for a in s["local_accuracies"]),
                ", ".join(f"{m:.3f}" for m in s["sparsity_measured"]),
                f"{s['job_s_mean']:.1f}",
            ]
        )
    seeds = sorted({c["seed"] for c in result["cells"]})
    return "\n".join(
        [
            "### Accuracy after pruning: digits CNN through the API\n",
            f"Baseline: Keras 3 CNN from `tests.support.model_factory.build_keras3_export`, {base['epochs']} epochs, seed 0; "
            f"data `model_factory.digits_datasets()` (split seed 0, stratified 75/25: {base['n_train']} train / "
            f"{base['n_test']} test). Baseline test accuracy {base['accuracy_api']:.4f} (service) / "
            f"{base['accuracy_local']:.4f} (computed here). Each cell: one job, "
            f'`{{"target_sparsity": s, "schedule": {{"kind": "polynomial"}}, "fine_tune": {{"epochs": '
            f'{result["fine_tune_epochs"]}}}, "seed": seed}}`, seeds {seeds}; mean ± sample std over seeds.\n',
            md_table(
                [
                    "sparsity",
                    "baseline acc",
                    "pruned acc mean ± std",
                    "Δ mean",
                    "per seed (service)",
                    "per seed (artifact, scored here)",
                    "measured sparsity",
                    "job s (timings_s.total)",
                ],
                rows,
            ),
            f"All {len(result['cells'])} artifacts verified (same signatures, sparsity ± 0.01 overall and per "
            f"variable). Wall time of the API part (upload, {len(result['cells'])} jobs, downloads): "
            f"{result['wall_s']:.0f} s.\n",
        ]
    )


if __name__ == "__main__":
    print(run_digits(smoke="--smoke" in sys.argv)["markdown"])
