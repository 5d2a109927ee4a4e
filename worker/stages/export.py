"""Exporting stage: the saved artifact converted to every file the spec asks for (TFLite formats, ONNX), each
file scored by its own runtime (LiteRT, ONNX Runtime) on the same data as the SavedModel (``worker.export``
does the converting and running; ``worker.export.targets.EXPORTS`` is the table of files).

- What is converted: the directory the pipeline saved as the artifact (``out_dir/saved_model``), so a
  compacted model is exported compacted; the job's ``signature`` only (a multi-signature model keeps one).
- int8 calibration: ``export.representative_samples`` train inputs (seeded choice, the job's preprocessing
  already applied by ``stages.load.prepare``), one sample per step.
- Evaluation: the reference data of the SavedModel's evaluation (the eval set, else a train sample), at most
  ``MAX_EVAL_SAMPLES`` of it (seeded), one sample per call. ``metrics`` come from ``stages.evaluate.score`` on
  the runtime's outputs (the same scikit-learn metrics, task and logits decision as the SavedModel), fidelity
  against the pruned SavedModel's outputs on the same samples, latency from the timed calls themselves.
- Files: ``out_dir/artifacts/<name><suffix>`` (``tflite_int8.tflite``, ``onnx.onnx``; ``worker.tasks`` records
  every file there as an artifact named by its stem).
- Failures: a file the converter refuses, or one its runtime cannot run, is an ``{"error"}`` entry and a
  note; the job and its SavedModel are unaffected. Anything else (a bug) propagates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from app.schemas.spec import Export
from worker.evaluation.metrics import TaskChoice
from worker.export import EXPORTS, ONNX, ExportError, Target, artifact_name, zip_size
from worker.stages.evaluate import Reference, fidelity_section, score
from worker.stages.job import Data, Job

__all__ = ["ARTIFACTS_DIR", "MAX_EVAL_SAMPLES", "requested", "run_exports"]

ARTIFACTS_DIR = "artifacts"
# Per-sample runtime calls over a large eval set would cost minutes per format on a big model: a seeded
# subset this large keeps metrics to about a point of accuracy (and is said in the notes when cut).
MAX_EVAL_SAMPLES = 5000
CONVERT_SHARE = 0.3  # of one format's slice of the stage's progress; evaluation fills the rest


def run_exports(
    job: Job,
    export: Export,
    saved: Path,
    out_dir: Path,
    reference: Reference | None,
    pruned_outputs: Mapping[str, np.ndarray] | None,
    settings: Mapping[str, tuple[TaskChoice, bool | None]],
    progress: Callable[[float], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """``metrics["exports"]``: artifact name -> ``{"size_bytes", "zip_bytes", "metrics", "fidelity",
    "latency_ms", ...}`` or ``{"error"}``. ``progress(fraction)`` is called after each conversion and during
    each evaluation (whatever it raises, e.g. cancellation, propagates)."""
    folder = out_dir / ARTIFACTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    data, outputs = _eval_subset(job, reference, pruned_outputs)
    targets = requested(export)
    section: dict[str, dict[str, Any]] = {}
    for done, target in enumerate(targets):
        name = target.name
        tick = time.perf_counter()
        try:
            options: dict[str, Any] = {}
            if name == artifact_name("int8"):  # no train dataset is an ExportError too: inside the try
                options = {"representative": _representative(job, export), "int8_io": export.int8_io}
            content = target.convert(saved, job.spec.signature, **options)
        except ExportError as exc:
            section[name] = {"error": str(exc)}
            job.note(
                f"{name} was not produced (the converter refused the model); the SavedModel is unaffected"
            )
        else:
            if progress is not None:
                progress((done + CONVERT_SHARE) / len(targets))

            def evaluated(fraction: float, done: int = done) -> None:
                if progress is not None:
                    share = CONVERT_SHARE + (1 - CONVERT_SHARE) * fraction
                    progress((done + share) / len(targets))

            entry = _evaluate(job, target, content, data, outputs, reference, settings, evaluated)
            if "error" not in entry:
                (folder / target.filename).write_bytes(content)
            section[name] = entry
        section[name]["seconds"] = round(time.perf_counter() - tick, 4)
        if progress is not None:
            progress((done + 1) / len(targets))
    return section


def requested(export: Export) -> list[Target]:
    """The files ``export`` asks for, in a fixed order: its TFLite formats as listed, then ONNX."""
    names = [artifact_name(fmt) for fmt in export.tflite] + ([ONNX] if export.onnx else [])
    return [EXPORTS[name] for name in names]


def _eval_subset(
    job: Job, reference: Reference | None, pruned_outputs: Mapping[str, np.ndarray] | None
) -> tuple[Data | None, dict[str, np.ndarray] | None]:
    """The reference data (and the pruned SavedModel's outputs on it), cut to ``MAX_EVAL_SAMPLES``."""
    if reference is None:
        job.note("exports: no dataset, so the files are converted but not evaluated")
        return None, None
    outputs = dict(pruned_outputs) if pruned_outputs is not None else None
    data = reference.data
    if data.stream is not None:  # a streamed set: its in-memory sample (its first records, in stream order)
        data = replace(data, stream=None)
        outputs = {k: v[: data.n] for k, v in outputs.items()} if outputs is not None else None
        if outputs is not None and min(len(v) for v in outputs.values()) < data.n:
            data = data.subset(np.arange(min(len(v) for v in outputs.values())))
    if outputs is not None:  # a fixed-batch signature scored whole batches only
        n = min(len(v) for v in outputs.values())
        if n < data.n:
            data = data.subset(np.arange(n))
    if data.n <= MAX_EVAL_SAMPLES:
        return data, outputs
    index = np.sort(np.random.default_rng(job.spec.seed).choice(data.n, MAX_EVAL_SAMPLES, replace=False))
    job.note(
        f"exported files are evaluated on {MAX_EVAL_SAMPLES} of the {data.n} reference samples (seeded "
        "choice, one runtime call each); their metrics are of that subset"
    )
    return data.subset(index), {k: v[index] for k, v in outputs.items()} if outputs is not None else None


def _representative(job: Job, export: Export) -> Any:
    """The calibration samples for int8: a generator factory of ``{input name: batch-1 array}``."""
    train = job.train
    if train is None:  # the API refuses int8 without a train dataset; a direct caller gets a clear error
        raise ExportError("no train dataset to calibrate on", "give train_dataset_id with int8 exports")
    count = min(export.representative_samples, train.n)
    if count < export.representative_samples:
        job.note(f"int8 calibration used all {train.n} train samples (fewer than representative_samples)")
    index = np.sort(np.random.default_rng(job.spec.seed).choice(train.n, count, replace=False))

    def samples() -> Iterator[dict[str, np.ndarray]]:
        for i in index:
            yield {name: array[i : i + 1] for name, array in train.x.items()}

    return samples


def _evaluate(
    job: Job,
    target: Target,
    content: bytes,
    data: Data | None,
    pruned_outputs: Mapping[str, np.ndarray] | None,
    reference: Reference | None,
    settings: Mapping[str, tuple[TaskChoice, bool | None]],
    on_progress: Callable[[float], None],
) -> dict[str, Any]:
    name = target.name
    entry: dict[str, Any] = {"size_bytes": len(content), "zip_bytes": zip_size(content, target.filename)}
    try:
        model = target.load(content, job.spec.signature)
        entry["io_types"] = model.io_types()
        entry["versions"] = target.versions()
        if data is None:
            return {**entry, "metrics": None, "fidelity": None, "latency_ms": {}}
        prediction = model.predict(data.x, on_progress=on_progress)
    except (RuntimeError, ValueError) as exc:  # the runtime refused the file or the inputs
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        job.note(
            f"{name}: the {target.runtime} runtime could not run the converted file; the SavedModel is unaffected"
        )
        return {
            "error": f"the {target.runtime} runtime could not run the file ({first}); use the SavedModel artifact"
        }
    missing = sorted(set(job.sig.outputs) - set(prediction.outputs))
    if missing:
        return {"error": f"the converted file lacks outputs {missing} of signature {job.spec.signature!r}"}
    labelled = reference is not None and reference.labelled
    entry["metrics"] = score(job, data if labelled else None, prediction.outputs).flat
    fidelity = None
    if pruned_outputs is not None:
        agreement = fidelity_section(job, pruned_outputs, prediction.outputs, settings)
        fidelity = agreement.get(job.output)
        if len(job.sig.outputs) > 1:
            entry["fidelity_by_output"] = agreement
    entry["fidelity"] = fidelity
    latency = prediction.latency()
    entry["latency_ms"] = {"1": latency} if latency is not None else {}
    entry["n_samples"] = data.n
    return entry
