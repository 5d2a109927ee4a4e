"""One pruning job as a plain function: load, baseline, [cross-validation], prune (+ fine-tune), evaluate, save.

No Celery, no database: ``worker.tasks`` passes arrays, an output directory and a ``report(stage, progress)``
callback. ``report`` is called at every stage boundary, at every cross-validation fold and periodically while
fine-tuning; whatever it raises (cancellation) propagates untouched. User-actionable problems are
``PipelineError``; anything else is a bug.

Stages (API.md's names; ``progress`` is the whole job's, 0..1, and only grows):

- loading: audit, load, bind datasets, preprocessing (``worker.load_stage``).
- baseline: predictions on the reference data (the eval set, else a train sample), quality metrics per
  output, parameter counts and MACs (``worker.evaluate_stage``).
- with ``evaluation.cross_validation``: k folds, each reporting pruning / fine_tuning / evaluating through
  its slice of progress (``worker.crossval_run``).
- pruning, fine_tuning: the main run on the whole train set (``worker.prune_stage``): the artifact.
- evaluating: pruned predictions, metrics, fidelity, MACs; then latency of the original (reloaded from disk)
  and the pruned model, interleaved per batch size within a time budget (``worker.latency_run``).
- saving: SavedModel with the original signatures, reload check (exact zeros), ``pruned.zip``. The input's
  deflate size (baseline ``size_bytes.zip``) is computed meanwhile in a thread that writes no file
  (``worker.zip_size``): saving, checking and zipping leave a core idle, whereas next to fine-tuning it would
  steal one and next to latency it would be noise. On a 207 MB ResNet-50 this took the baseline stage from
  6.8 s to 0.1 s without lengthening saving (8.8 -> 8.2 s).

Memory: at most two models are held at once. The original reloaded for latency is released before the
artifact is reloaded for its check; both reloads are kept (latency compares against a fresh original, the
check proves the file on disk, not the object in memory). Measured (peak RSS, job time; default spec, no
data): ResNet-50 1741 MiB / 30.0 s, MobileNetV2 1390 MiB / 12.8 s; timing both models on the one pruned
handle instead would save 96 / 37 MiB and 1.6 / 1.3 s, but lose the interleaving. The peak is the two
models running batch 32 side by side, not the number of loads: the three loads never overlapped.
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from app.schemas.spec import Latency, PruneSpec
from worker.crossval_run import run_cross_validation
from worker.errors import PipelineError
from worker.evaluate_stage import Scores, Weights, delta, fidelity_section, reference_data, score
from worker.evaluation.size import dir_size, zip_dir
from worker.job import Job, Report, Window, predict
from worker.latency_run import measure_latency
from worker.load_stage import prepare, resolve_granularity, seed_everything
from worker.models import audit_saved_model, keras_to_saved_model, load_model
from worker.prune_stage import (
    GRADIENT_SAMPLES,
    INFERENCE_MODE_NOTE,
    TRAINING_MODE_NOTE,
    layer_rows,
    make_pruner,
    prune_and_fine_tune,
    select,
    unpaired_bias_notes,
)
from worker.pruning.granularity import Granularity
from worker.pruning.pruner import Pruner
from worker.zip_size import ZipSizeInBackground

__all__ = ["GRADIENT_SAMPLES", "INFERENCE_MODE_NOTE", "TRAINING_MODE_NOTE", "run_pipeline"]

# Overall progress at the start of each stage. Pruning and fine-tuning (and the cross-validation folds,
# which come first and take k/(k+1) of the span) fill PRUNING..EVALUATING.
LOADING, BASELINE, PRUNING, EVALUATING, SAVING = 0.0, 0.05, 0.15, 0.85, 0.93


def run_pipeline(
    model_dir: Path,
    spec: PruneSpec,
    train: dict[str, np.ndarray] | None,
    evaluation: dict[str, np.ndarray] | None,
    out_dir: Path,
    report: Report,
) -> dict[str, Any]:
    """Prune the SavedModel (or ``.keras`` file) at ``model_dir`` per ``spec``; write ``out_dir/saved_model``
    and ``out_dir/pruned.zip``; return the metrics document without ``job_id``/``model_id``."""
    started = time.perf_counter()
    seed_everything(spec.seed)
    granularity = resolve_granularity(spec)
    window = Window(report)

    window("loading", LOADING)
    tick = time.perf_counter()
    converted = None
    if model_dir.is_file():
        model_dir = keras_to_saved_model(model_dir, out_dir / "input_saved_model")
        converted = "a .keras input is converted to a SavedModel; baseline sizes are of that SavedModel"
    denied = audit_saved_model(model_dir)  # before loading: loading runs resource initialisers
    if denied:
        raise PipelineError(
            "unsafe_model",
            f"the model's graphs run operations that are not allowed here: {', '.join(denied)}",
        )
    job = prepare(load_model(model_dir), spec, train, evaluation)
    if converted:
        job.notes.append(converted)
    job.timings["load"] = time.perf_counter() - tick
    document = _run(job, model_dir, train, granularity, window, out_dir)
    job.timings["total"] = time.perf_counter() - started
    document["timings_s"] = {k: round(v, 4) for k, v in job.timings.items()}
    return _finite(document)


def _run(
    job: Job,
    model_dir: Path,
    train: Mapping[str, np.ndarray] | None,
    granularity: Granularity,
    window: Window,
    out_dir: Path,
) -> dict[str, Any]:
    """The stages after loading, in order; returns the document without ``timings_s``."""
    spec = job.spec
    window("baseline", BASELINE)
    tick = time.perf_counter()
    prunable, kinds = select(job)
    reference = reference_data(job)
    reference_outputs = predict(job, reference.data) if reference is not None else None
    before = score(job, reference.data if reference and reference.labelled else None, reference_outputs)
    weights = Weights(job, prunable)
    baseline = _side(job, before, weights.measure())
    job.timings["baseline"] = time.perf_counter() - tick

    folds = spec.evaluation.cross_validation if spec.evaluation is not None else None
    prune_from = PRUNING
    cross_validation = None
    if folds is not None:
        assert train is not None  # prepare() refuses cross-validation without labelled train data
        tick = time.perf_counter()
        prune_from = PRUNING + (EVALUATING - PRUNING) * folds.folds / (folds.folds + 1)
        cv_window = window.sub(PRUNING, prune_from)
        cross_validation = run_cross_validation(model_dir, job, train, granularity, cv_window)
        job.timings["cross_validation"] = time.perf_counter() - tick

    window("pruning", prune_from)
    tick = time.perf_counter()
    seed_everything(spec.seed)  # the artifact does not depend on whether cross-validation ran first
    pruner = make_pruner(job, prunable, kinds, granularity)
    job.timings["prune"] = time.perf_counter() - tick
    job.timings["fine_tune"] = 0.0
    prune_and_fine_tune(job, pruner, window.sub(prune_from, EVALUATING))

    window("evaluating", EVALUATING)
    tick = time.perf_counter()
    pruned_outputs = predict(job, reference.data) if reference is not None else None
    after = score(job, reference.data if reference and reference.labelled else None, pruned_outputs)
    pruned = _side(job, after, weights.measure())
    if reference_outputs is not None and pruned_outputs is not None:
        agreement = fidelity_section(job, reference_outputs, pruned_outputs, before.settings)
        pruned["fidelity"] = agreement.get(job.output)
        if len(job.sig.outputs) > 1:
            pruned["fidelity_by_output"] = agreement
    else:
        pruned["fidelity"] = None
    layers = layer_rows(prunable, pruner)
    macs = weights.layer_columns()
    for row in layers:
        row.update(macs.get(row["name"], {}))
    for line in pruner.notes():
        job.note(line)
    job.notes.extend(unpaired_bias_notes(pruner))
    latency = _latency(job, model_dir)
    baseline["latency_ms"], pruned["latency_ms"] = latency["baseline"], latency["pruned"]
    job.timings["evaluate"] = time.perf_counter() - tick

    window("saving", SAVING)
    tick = time.perf_counter()
    # The input's zip size, in a thread beside saving, checking and zipping the artifact: those leave a
    # core idle, while earlier stages would compete with it (fine-tuning, and latency would measure noise).
    baseline_zip = ZipSizeInBackground(model_dir)
    try:
        saved = job.handle.save(out_dir / "saved_model")
        _verify_artifact(job, saved, pruner)
        pruned["size_bytes"] = {"saved_model": dir_size(saved), "zip": zip_dir(saved, out_dir / "pruned.zip")}
        baseline["size_bytes"] = {"saved_model": dir_size(model_dir), "zip": baseline_zip.result()}
    finally:
        baseline_zip.cancel()  # no-op once collected; stops the thread when saving failed
    job.timings["save"] = time.perf_counter() - tick

    document: dict[str, Any] = {
        "spec": spec.model_dump(mode="json"),
        "baseline": baseline,
        "pruned": pruned,
        "delta": delta(before.flat, after.flat),
        "layers": layers,
        "notes": job.notes,
        "versions": {"secateurs": _version(), "tensorflow": tf.__version__},
    }
    if len(job.sig.outputs) > 1 and before.by_output:
        document["delta_by_output"] = {
            name: delta(metrics, after.by_output.get(name)) for name, metrics in before.by_output.items()
        }
    if cross_validation is not None:
        document["cross_validation"] = cross_validation
    if job.preprocessing is not None:
        document["preprocessing"] = job.preprocessing
    return document


def _side(job: Job, scores: Scores, weights: Mapping[str, Any]) -> dict[str, Any]:
    """One side of the document (sizes and latency are added later): API.md's keys first."""
    side: dict[str, Any] = {"metrics": scores.flat, **weights}
    if len(job.sig.outputs) > 1:
        side["metrics_by_output"] = scores.by_output or None
    return side


def _latency(job: Job, model_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The original (reloaded from disk) and the pruned model, interleaved per batch size."""
    settings = (job.spec.evaluation.latency if job.spec.evaluation else None) or Latency()
    result, notes = _against_original(job, model_dir, settings)
    gc.collect()  # the reloaded original is unreachable now: free it before saving reloads the artifact
    job.notes.extend(notes)
    return result


def _against_original(
    job: Job, model_dir: Path, settings: Latency
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """Kept apart so that the only references to the reloaded original die with this frame."""
    original = load_model(model_dir)
    return measure_latency(
        {"baseline": original, "pruned": job.handle}, job.sig, settings, job.evaluation or job.train
    )


def _verify_artifact(job: Job, saved: Path, pruner: Pruner) -> None:
    """The artifact must load with the same signatures and hold exact zeros wherever a mask prunes (kernels
    and the biases of removed channels)."""
    reloaded = load_model(saved)
    if reloaded.signatures != job.handle.signatures:
        raise RuntimeError("the saved model's signatures differ from the input's")
    values = {nv.name: nv.var for nv in reloaded.variables()}
    for name, mask in [*pruner.masks.items(), *pruner.bias_masks.items()]:
        if name not in values or np.any(values[name].numpy()[~mask] != 0):
            raise RuntimeError(f"pruned variable {name} is not exactly zero where masked in the saved model")


def _finite(value: Any) -> Any:
    """NaN/inf become None: the metrics document is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("secateurs")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"
