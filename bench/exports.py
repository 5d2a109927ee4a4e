"""Deployable exports: zipped bytes and accuracy of the dense SavedModel, the pruned one and every TFLite file.

Model and data: the digits CNN of ``bench/digits_quality.py`` (Keras 3 export, ``BASELINE_EPOCHS`` epochs, seed
0; scikit-learn digits, split seed 0: 1347 train / 450 test). One embedded ``secateurs serve`` subprocess; the
model and both datasets are uploaded once; jobs over HTTP:

- ``unstructured``: 80% sparsity with the recommended spec (``bench.tfmot_quality.RECOMMENDED``: global LAMP,
  polynomial schedule, 3 epochs of fine-tuning with distillation) and ``export.tflite`` = every format
  (int8 calibrated on 200 train samples, float I/O);
- ``channels``: the same spec with ``granularity: channel`` at 50% and compaction (the default for channel
  pruning): the artifact, and so every TFLite file, is the smaller model.

Per row: accuracy on the 450 test samples (the SavedModels scored by the service with TensorFlow, the TFLite
files by the LiteRT interpreter in the worker, one sample per call) and the zipped bytes (deflate level 6:
``size_bytes.zip`` of the two SavedModels, ``zip_bytes`` of each file) beside the dense SavedModel's zip.
Every file is downloaded through ``GET /v1/jobs/{id}/artifacts/{name}``, its SHA-256 checked against the
listing, and the int8 file scored again here with LiteRT (the number is of the file a user gets).

Goal (issue 13): pruned + int8 zipped <= ``GOAL_RATIO`` of the dense SavedModel zip, with accuracy within
``GOAL_POINTS`` of the pruned float model (tfmot's tutorial: 0.33 pruned, ~0.105 pruned + quantized).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any, get_args

from app.schemas.vocabulary import TFLiteFormat
from bench.common import OUT_DIR, Api, BenchError, Server, md_table

FORMATS = list(get_args(TFLiteFormat))
SPARSITY = 0.8
CHANNELS = 0.5
GOAL_RATIO = 0.10
GOAL_POINTS = 0.01
SMOKE = {"baseline_epochs": 3, "fine_tune_epochs": 1, "formats": ["float32", "int8"], "samples": 50}


def _spec(smoke: bool, **extra: Any) -> dict[str, Any]:
    from bench.tfmot_quality import RECOMMENDED

    spec: dict[str, Any] = {**RECOMMENDED, **extra}
    fine_tune = dict(spec.get("fine_tune") or {})
    fine_tune["epochs"] = SMOKE["fine_tune_epochs"] if smoke else 3
    spec["fine_tune"] = fine_tune
    spec["export"] = {
        "tflite": SMOKE["formats"] if smoke else FORMATS,
        "representative_samples": SMOKE["samples"] if smoke else 200,
    }
    spec["evaluation"] = {"latency": {"batch_sizes": [1], "runs": 5, "budget_s": 1.0}}
    return spec


def _local_accuracy(path: Path) -> float:
    """The downloaded .tflite scored here by LiteRT on the test split (same code as the worker's)."""
    import numpy as np

    from tests.support import model_factory
    from worker.export import TFLiteModel

    _, test = model_factory.digits_datasets()
    model = TFLiteModel(path.read_bytes())
    (name,) = model.inputs
    (probs,) = model.predict({name: test["x"]}).outputs.values()
    return float(np.mean(np.argmax(probs, axis=1) == test["y"]))


def _download_all(api: Api, job_id: str, dest: Path) -> dict[str, Path]:
    """Every listed file, streamed, its SHA-256 checked against the listing."""
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for item in api.get(f"/v1/jobs/{job_id}/artifacts")["items"]:
        path = dest / f"{item['name']}{'.zip' if item['name'] == 'saved_model' else '.tflite'}"
        digest = hashlib.sha256()
        with api.http.stream("GET", item["href"]) as response, path.open("wb") as fh:
            if response.status_code != 200:
                raise BenchError(f"{item['href']} -> {response.status_code}")
            for chunk in response.iter_bytes(1 << 20):
                fh.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != item["sha256"]:
            raise BenchError(f"{item['href']}: sha-256 {digest.hexdigest()} != listed {item['sha256']}")
        files[item["name"]] = path
    return files


def _rows(metrics: dict[str, Any], label: str, local_int8: float | None) -> list[dict[str, Any]]:
    dense_zip = metrics["baseline"]["size_bytes"]["zip"]
    rows = [
        {
            "model": "dense SavedModel",
            "accuracy": metrics["baseline"]["metrics"]["accuracy"],
            "bytes": metrics["baseline"]["size_bytes"]["saved_model"],
            "zip": dense_zip,
        },
        {
            "model": f"{label} SavedModel",
            "accuracy": metrics["pruned"]["metrics"]["accuracy"],
            "bytes": metrics["pruned"]["size_bytes"]["saved_model"],
            "zip": metrics["pruned"]["size_bytes"]["zip"],
        },
    ]
    for name, entry in metrics["exports"].items():
        if "error" in entry:
            rows.append({"model": f"{label} {name}", "error": entry["error"]})
            continue
        rows.append(
            {
                "model": f"{label} {name}",
                "accuracy": entry["metrics"]["accuracy"],
                "bytes": entry["size_bytes"],
                "zip": entry["zip_bytes"],
                "top1_agreement": entry["fidelity"]["top1_agreement"],
                "p50_ms": entry["latency_ms"]["1"]["p50"],
                "local_accuracy": local_int8 if name == "tflite_int8" else None,
            }
        )
    for row in rows:
        if "zip" in row:
            row["zip_ratio"] = row["zip"] / dense_zip
    return rows


def run_exports(
    smoke: bool = False, cache_dir: Path | None = None, work_dir: Path | None = None
) -> dict[str, Any]:
    """The two jobs, their files downloaded and checked; returns the rows, the goal check and markdown."""
    from bench.digits_quality import BASELINE_EPOCHS, prepare

    cache_dir = cache_dir or OUT_DIR / "cache"
    work_dir = work_dir or OUT_DIR / ("exports-smoke" if smoke else "exports")
    inputs = prepare(cache_dir, SMOKE["baseline_epochs"] if smoke else BASELINE_EPOCHS)
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    started = time.perf_counter()
    runs = {
        "unstructured": (f"pruned {SPARSITY:.0%}", _spec(smoke, target_sparsity=SPARSITY)),
        "channels": (
            f"{CHANNELS:.0%} channels",
            _spec(smoke, target_sparsity=CHANNELS, granularity="channel", compact=True),
        ),
    }
    result: dict[str, Any] = {"smoke": smoke, "runs": {}}
    with Server(work_dir / "server") as server, Api(server.base_url) as api:
        model = api.upload("/v1/models", inputs["zip"], name="digits-cnn")
        train = api.upload("/v1/datasets", inputs["train"])
        test = api.upload("/v1/datasets", inputs["test"])
        api.wait_model(model["id"])
        for key, (label, spec) in runs.items():
            payload = {
                "model_id": model["id"],
                "train_dataset_id": train["id"],
                "eval_dataset_id": test["id"],
                "spec": spec,
            }
            job, submitted = api.submit_job(payload)
            run = api.wait_job(job["id"], submitted)
            metrics = api.get(f"/v1/jobs/{job['id']}/metrics")
            files = _download_all(api, job["id"], work_dir / key)
            local = _local_accuracy(files["tflite_int8"]) if "tflite_int8" in files else None
            result["runs"][key] = {
                "job_id": job["id"],
                "spec": run.body["spec"],
                "sparsity": metrics["pruned"]["sparsity"],
                "params_dense": metrics["baseline"]["params"]["total"],
                "params_total": metrics["pruned"]["params"]["total"],
                "params_nonzero": metrics["pruned"]["params"]["nonzero"],
                "compact": (metrics.get("structure") or {}).get("compact"),
                "export_s": metrics["timings_s"].get("export"),
                "job_s": metrics["timings_s"]["total"],
                "rows": _rows(metrics, label, local),
            }
            print(f"[exports] {key}: {metrics['timings_s']['total']:.1f} s", file=sys.stderr, flush=True)
    result["wall_s"] = time.perf_counter() - started
    result["goal"] = _goal(result["runs"]["unstructured"]["rows"])
    result["markdown"] = render(result)
    return result


def _goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_model = {row["model"]: row for row in rows}
    pruned = next(
        row for name, row in by_model.items() if name.endswith("SavedModel") and "dense" not in name
    )
    int8 = next((row for name, row in by_model.items() if name.endswith("tflite_int8")), None)
    if int8 is None or "error" in int8:
        return {"met": False, "reason": "no int8 file"}
    drop = pruned["accuracy"] - int8["accuracy"]
    return {
        "zip_ratio": int8["zip_ratio"],
        "accuracy_drop": drop,
        "met": int8["zip_ratio"] <= GOAL_RATIO and drop <= GOAL_POINTS,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "### Exports: digits CNN, dense vs pruned vs TFLite (zipped bytes, accuracy)\n",
        "Digits CNN of the digits section (Keras 3 export), recommended spec (global LAMP, polynomial schedule, "
        "3 epochs of fine-tuning with distillation), `export.tflite` = "
        f"{', '.join(result['runs']['unstructured']['spec']['export']['tflite'])} (int8: "
        f"{result['runs']['unstructured']['spec']['export']['representative_samples']} calibration samples, "
        "float I/O); one job per row group, one run. Accuracy on the 450 test samples: SavedModels by the "
        "service (TensorFlow), TFLite files by the LiteRT interpreter in the worker, batch 1. Zip: deflate "
        "level 6 of the SavedModel directory / of the one file. Every file downloaded by name, SHA-256 checked; "
        "the int8 file also scored here after download (last column).\n",
    ]
    for key, run in result["runs"].items():
        rows = []
        for row in run["rows"]:
            if "error" in row:
                rows.append([row["model"], "—", "—", "—", "—", "—", "—", row["error"][:120]])
                continue
            rows.append(
                [
                    row["model"],
                    f"{row['accuracy']:.4f}",
                    f"{row['bytes']:,}",
                    f"{row['zip']:,}",
                    f"{row['zip_ratio']:.3f}",
                    "" if row.get("top1_agreement") is None else f"{row['top1_agreement']:.4f}",
                    "" if row.get("p50_ms") is None else f"{row['p50_ms']:.4f}",
                    "" if row.get("local_accuracy") is None else f"{row['local_accuracy']:.4f}",
                ]
            )
        compact = " (compacted)" if run["compact"] else ""
        lines.append(
            f"**{key}**{compact}: job `{run['job_id']}`, parameters {run['params_dense']:,} -> "
            f"{run['params_total']:,} ({run['params_nonzero']:,} nonzero; sparsity of what is left "
            f"{run['sparsity']:.3f}), job {run['job_s']:.1f} s of which exports "
            f"{(run['export_s'] or 0):.1f} s.\n"
        )
        lines.append(
            md_table(
                [
                    "model",
                    "accuracy",
                    "bytes",
                    "zip bytes",
                    "zip / dense zip",
                    "top-1 agreement with pruned",
                    "LiteRT p50 ms (batch 1)",
                    "int8 scored after download",
                ],
                rows,
            )
        )
    goal = result["goal"]
    if "zip_ratio" in goal:
        verdict = "met" if goal["met"] else "NOT met"
        lines.append(
            f"Goal (pruned + int8 zipped <= {GOAL_RATIO:.2f} of the dense zip, accuracy within "
            f"{GOAL_POINTS * 100:.0f} point of the pruned float model): **{verdict}**: "
            f"{goal['zip_ratio']:.3f} of the dense zip, accuracy {0.0 - goal['accuracy_drop'] * 100:+.2f} points "
            "vs the pruned SavedModel. Wall time "
            f"{result['wall_s']:.0f} s.\n"
        )
    else:
        lines.append(f"Goal not measured: {goal['reason']}.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run_exports(smoke="--smoke" in sys.argv)["markdown"])
