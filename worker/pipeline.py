"""One pruning job as a plain function: load, baseline, [cross-validation], prune (+ fine-tune), evaluate, save.

No Celery, no database: ``worker.tasks`` passes arrays, an output directory and a ``report(stage, progress)``
callback. ``report`` is called at every stage boundary, at every cross-validation fold and periodically while
fine-tuning; whatever it raises (cancellation) propagates untouched. User-actionable problems are
``PipelineError``; anything else is a bug.

Stages (API.md's names; ``progress`` is the whole job's, 0..1, and only grows):

- loading: audit, load (the handle a validation just loaded in this process, if any), bind datasets,
  preprocessing (``worker.stages.load``).
- baseline: predictions on the reference data (the eval set, else a train sample), quality metrics per
  output, parameter counts and MACs (``worker.stages.evaluate``), latency of the unpruned model.
- with ``evaluation.cross_validation``: k folds, each reporting pruning / fine_tuning / evaluating through
  its slice of progress (``worker.stages.crossval``).
- pruning, fine_tuning: the main run on the whole train set (``worker.stages.prune``): the artifact.
- evaluating: pruned predictions, metrics, fidelity, MACs, latency of the pruned model (``_latency`` says
  why the two latencies are measured on the one handle rather than against a reloaded original). With
  ``compact`` (``worker.stages.compact``): the compact model is written as the artifact, checked against the
  masked model on the same data, and params / MACs / latency / sizes are measured on it (``structure``).
- saving: SavedModel with the original signatures, a check of the files (signature defs, every pruned value
  in the checkpoint bit for bit), ``pruned.zip``. The input's deflate size (baseline ``size_bytes.zip``) is
  computed in a thread that writes no file (``worker.evaluation.zip_size``), cached beside the model for its later jobs,
  started right after loading for one-shot jobs and at saving when fine-tuning runs, and paused while latency
  is measured (``_BaselineZip`` says why).

Memory and time: one model is loaded, once, per job (it used to be three loads: the job's, an original for
latency, the artifact for its check — 6 of the 24 s of a one-shot ResNet-50 job on a loaded machine).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from app.schemas.spec import Latency, PruneSpec
from worker.errors import PipelineError
from worker.evaluation.size import dir_size, zip_dir
from worker.evaluation.zip_size import ZipSizeInBackground, shared_zip_size
from worker.kinds import run_kind, run_trial
from worker.kinds.folds import fold_document
from worker.models import ModelHandle, audit_saved_model, keras_to_saved_model, load_model_once
from worker.pruning.granularity import Granularity
from worker.pruning.interface import PrunerLike
from worker.pruning.pruner import variable_view
from worker.stages.budget import budget_section, latency_budget, verify_latency
from worker.stages.compact import Compacted, check_shapes, compact_model, measure_compact
from worker.stages.crossval import run_cross_validation
from worker.stages.evaluate import Scores, Weights, delta, fidelity_section, reference_data, score
from worker.stages.export import run_exports
from worker.stages.feed import Streamed
from worker.stages.job import Job, Report, Window, predict
from worker.stages.latency import PairedLatency, measure_latency
from worker.stages.load import prepare, resolve_granularity, seed_everything
from worker.stages.memory import check_prune_memory
from worker.stages.prune import (
    GRADIENT_SAMPLES,
    INFERENCE_MODE_NOTE,
    TRAINING_MODE_NOTE,
    layer_rows,
    make_pruner,
    meet_latency_budget,
    prune_and_fine_tune,
    select,
)

__all__ = ["GRADIENT_SAMPLES", "INFERENCE_MODE_NOTE", "TRAINING_MODE_NOTE", "run_pipeline"]

# Overall progress at the start of each stage. Pruning and fine-tuning (and the cross-validation folds,
# which come first and take k/(k+1) of the span) fill PRUNING..EVALUATING.
LOADING, BASELINE, PRUNING, EVALUATING, SAVING = 0.0, 0.05, 0.15, 0.85, 0.93
EXPORTING = 0.95  # TFLite / ONNX conversions (spec.export) after saving, up to 0.98


def run_pipeline(
    model_dir: Path,
    spec: PruneSpec,
    train: dict[str, np.ndarray] | Streamed | None,
    evaluation: dict[str, np.ndarray] | Streamed | None,
    out_dir: Path,
    report: Report,
    calibration: dict[str, np.ndarray] | Streamed | None = None,
    trial: int | None = None,
    trial_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Prune the SavedModel (or ``.keras`` file) at ``model_dir`` per ``spec``; write ``out_dir/saved_model``
    and ``out_dir/pruned.zip``; return the metrics document without ``job_id``/``model_id``. ``calibration``:
    the ``calibration_dataset_id``'s arrays (inputs only are read). With ``trial``: only that trial of a
    fanned-out kind (``worker.kinds.run_trial``, with its record's ``trial_params``), its files in
    ``out_dir/artifacts``."""
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
    baseline_zip = _BaselineZip(model_dir, cache=converted is None, early=spec.fine_tune is None)
    try:
        job = prepare(load_model_once(model_dir), spec, train, evaluation, calibration)
        job.model_dir = model_dir
        if converted:
            job.notes.append(converted)
        job.timings["load"] = time.perf_counter() - tick
        if trial is None:  # the one dispatch point: prune, search, sweep or sensitivity (worker.kinds)
            document = run_kind(
                job,
                window,
                out_dir,
                lambda w, out: _run(job, model_dir, train, granularity, w, out, baseline_zip),
            )
        else:  # one trial of a job that fans out (worker.trial_tasks)
            document = run_trial(
                job,
                window,
                out_dir,
                lambda w, out: _run(job, model_dir, train, granularity, w, out, baseline_zip),
                trial,
                lambda w, i: fold_document(model_dir, job, train, granularity, w, i),
                trial_params,
            )
    finally:
        baseline_zip.cancel()  # no-op once collected; stops the thread when a stage failed
    _stream_notes(job, document)
    job.timings["total"] = time.perf_counter() - started
    document["timings_s"] = {k: round(v, 4) for k, v in job.timings.items()}
    return _finite(document)


def _stream_notes(job: Job, document: dict[str, Any]) -> None:
    """Say which datasets were streamed, what the reader changed (resizes) and what it skipped."""
    notes = document.setdefault("notes", [])
    for role, data in (("train", job.train), ("eval", job.evaluation)):
        if data is None or data.stream is None:
            continue
        reader = data.stream.reader
        records = "an unknown number of" if reader.n is None else str(reader.n)
        line = (
            f"the {role} dataset ({records} records) was streamed, being larger than "
            f"SECATEURS_DATASET_MEMORY_BYTES: {data.n} records held for loss inference, gradient statistics and "
            "calibration; fine-tuning and evaluation read it batch by batch"
        )
        for text in [line, *reader.notes]:
            if text not in notes:
                notes.append(text)
        if reader.skipped:
            notes.append(
                f"on_bad_record=skip: {reader.skipped} {role} records could not be read and were left out"
            )


def _run(
    job: Job,
    model_dir: Path,
    train: Mapping[str, np.ndarray] | Streamed | None,
    granularity: Granularity,
    window: Window,
    out_dir: Path,
    baseline_zip: _BaselineZip,
) -> dict[str, Any]:
    """The stages after loading, in order; returns the document without ``timings_s``."""
    spec = job.spec
    window("baseline", BASELINE)
    tick = time.perf_counter()
    prunable, kinds = select(job)
    check_prune_memory(
        spec, prunable
    )  # a prune that cannot fit fails now, with what would (worker.stages.memory)
    reference = reference_data(job)
    reference_outputs = predict(job, reference.data) if reference is not None else None
    before = score(job, reference.data if reference and reference.labelled else None, reference_outputs)
    weights = Weights(job, prunable)
    baseline = _side(job, before, weights.measure())
    baseline["latency_ms"] = _latency(job, "baseline", baseline_zip)  # the same handle, before any pruning
    job.timings["baseline"] = time.perf_counter() - tick

    cv = spec.evaluation.cross_validation if spec.evaluation is not None else None
    prune_from = PRUNING
    cross_validation = None
    if cv is not None:
        assert train is not None  # prepare() refuses cross-validation without labelled train data
        tick = time.perf_counter()
        prune_from = PRUNING + (EVALUATING - PRUNING) * cv.folds / (cv.folds + 1)
        cv_window = window.sub(PRUNING, prune_from)
        cross_validation = run_cross_validation(model_dir, job, train, granularity, cv_window)
        job.timings["cross_validation"] = time.perf_counter() - tick

    window("pruning", prune_from)
    tick = time.perf_counter()
    seed_everything(spec.seed)  # the artifact does not depend on whether cross-validation ran first
    timed_budget = latency_budget(job) is not None  # its calibration and checks time models: zip held
    with baseline_zip.held(timed_budget):
        pruner = make_pruner(job, prunable, kinds, granularity)
    job.timings["prune"] = time.perf_counter() - tick
    job.timings["fine_tune"] = 0.0
    prune_and_fine_tune(job, pruner, window.sub(prune_from, EVALUATING))
    if timed_budget:  # the pruned model compacted and timed beside the upload; more removed while short
        tick = time.perf_counter()
        with baseline_zip.held():
            meet_latency_budget(job, pruner, prunable)
        job.timings["prune"] += time.perf_counter() - tick

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
    job.notes.extend(pruner.unpaired_bias_notes())
    # spec.compact: the removed channels physically gone, checked against the masked model (stages.compact)
    compaction = compact_model(job, pruner, reference, pruned_outputs, out_dir / "saved_model")
    job.notes.extend(compaction.notes)
    compacted = compaction.compacted
    if compacted is not None:
        measured, updates = measure_compact(job, weights, prunable, compacted)
        pruned.update(measured)
        for row in layers:
            row.update(updates.get(row["name"], {}))
    pruned["latency_ms"] = _latency(job, "pruned", baseline_zip, compacted.handle if compacted else None)
    verified = _verify_latency_budget(job, compacted, baseline_zip) if timed_budget else None
    job.timings["evaluate"] = time.perf_counter() - tick - job.timings.get("compact", 0.0)

    window("saving", SAVING)
    tick = time.perf_counter()
    baseline_zip.start()
    if compacted is not None:  # already written and checked by compact_model
        saved = compacted.path
        _verify_compact(saved, compacted, model_dir)
    else:
        saved = job.handle.save(out_dir / "saved_model")
        _verify_artifact(job, saved, pruner, model_dir)
    pruned["size_bytes"] = {"saved_model": dir_size(saved), "zip": zip_dir(saved, out_dir / "pruned.zip")}
    baseline["size_bytes"] = {"saved_model": dir_size(model_dir), "zip": baseline_zip.result()}
    job.timings["save"] = time.perf_counter() - tick
    exports = None
    if spec.export is not None:  # converts the directory saved above: the artifact as downloaded
        tick = time.perf_counter()
        stage = window.sub(EXPORTING, 0.98)
        stage("exporting", 0.0)
        exports = run_exports(
            job,
            spec.export,
            saved,
            out_dir,
            reference,
            pruned_outputs,
            after.settings,
            progress=lambda fraction: stage("exporting", fraction),
        )
        job.timings["export"] = time.perf_counter() - tick

    document: dict[str, Any] = {
        "spec": spec.model_dump(mode="json"),
        "baseline": baseline,
        "pruned": pruned,
        "delta": delta(before.flat, after.flat),
        "layers": layers,
        **({"structure": compaction.structure} if compaction.structure is not None else {}),
        "notes": job.notes,
        "versions": {"secateurs": _version(), "tensorflow": tf.__version__},
    }
    if len(job.sig.outputs) > 1 and before.by_output:
        document["delta_by_output"] = {
            name: delta(metrics, after.by_output.get(name)) for name, metrics in before.by_output.items()
        }
    if cross_validation is not None:
        document["cross_validation"] = cross_validation
    if spec.budget is not None:
        document["budget"] = budget_section(spec.budget, baseline, pruned, compacted is not None, verified)
    if exports is not None:
        document["exports"] = exports
    if job.preprocessing is not None:
        document["preprocessing"] = job.preprocessing
    if job.reconstruction is not None:
        document["reconstruction"] = job.reconstruction
    return document


class _BaselineZip:
    """The input's deflate size (~7 s of CPU for a 207 MB ResNet-50 at level 6, the same level as the artifact
    so the two sizes compare), in a thread (zlib and reads release the GIL), cached beside the model so a
    model's later jobs read it. For an upload it is the process's shared computation, which the model's
    validation already started (``worker.tasks``). One-shot jobs are short and this would be their longest
    part, so it runs on the core that loading, pruning and saving leave idle (``early``); with fine-tuning it
    is held until saving, so it steals no core from training; it is always held while latency is measured."""

    def __init__(self, model_dir: Path, *, cache: bool, early: bool) -> None:
        self.model_dir, self.shared, self.early = model_dir, cache, early
        self.thread: ZipSizeInBackground | None = None
        if cache:
            self.thread = shared_zip_size(model_dir)
            if early:
                self.thread.resume()
            else:
                self.thread.pause()
        elif early:
            self.thread = ZipSizeInBackground(model_dir)

    def start(self) -> None:
        """Saving begins: run now, whatever the job kind."""
        self.early = True
        if self.thread is None:
            self.thread = ZipSizeInBackground(self.model_dir)
        self.thread.resume()

    def pause(self) -> None:
        if self.thread is not None:
            self.thread.pause()

    @contextmanager
    def held(self, hold: bool = True) -> Iterator[None]:
        """Paused for the block (when ``hold``): timing models beside a zip thread on 2 cores times the zip."""
        if hold:
            self.pause()
        try:
            yield
        finally:
            if hold:
                self.resume()

    def resume(self) -> None:
        """After a latency measurement: back to what the job kind allows."""
        if self.thread is not None and self.early:
            self.thread.resume()

    def result(self) -> int:
        self.start()
        assert self.thread is not None
        return self.thread.result()

    def cancel(self) -> None:
        """On failure: stop a private thread; a shared one goes on (the model's next job reads it)."""
        if self.thread is None:
            return
        if self.shared:
            self.thread.resume()
        else:
            self.thread.cancel()


def _side(job: Job, scores: Scores, weights: Mapping[str, Any]) -> dict[str, Any]:
    """One side of the document (sizes and latency are added later): API.md's keys first."""
    side: dict[str, Any] = {"metrics": scores.flat, **weights}
    if len(job.sig.outputs) > 1:
        side["metrics_by_output"] = scores.by_output or None
    return side


def _latency(
    job: Job, side: str, background: _BaselineZip, handle: ModelHandle | None = None
) -> dict[str, dict[str, Any]]:
    """Latency of the loaded model as it is now: called at the baseline stage (before pruning) and after
    evaluation, on the same handle, inputs and threads, each with half of ``budget_s`` so a job spends what
    the spec allows. The background zip is paused meanwhile, so both sides see an equally idle machine.

    Why not the original reloaded from disk and interleaved with the pruned model: that is a second full
    model load (~2 s and ~200 MB on a ResNet-50, the longest part of a one-shot job after saving), and
    the two sides run the same kernels on the same shapes anyway (zeros are not skipped; the notes say so)."""
    settings = (job.spec.evaluation.latency if job.spec.evaluation else None) or Latency()
    budget = job.spec.budget.latency if job.spec.budget is not None else None
    if budget is not None and budget.batch_size not in settings.batch_sizes:  # shown beside metrics.budget
        settings = settings.model_copy(update={"batch_sizes": [*settings.batch_sizes, budget.batch_size]})
    half = settings.model_copy(update={"budget_s": settings.budget_s / 2})
    with background.held():
        result, notes = measure_latency(
            {side: handle or job.handle}, job.sig, half, job.evaluation or job.train
        )
    job.notes.extend(f"{side} model: {note}" for note in notes)
    return result[side]


def _verify_latency_budget(
    job: Job, compacted: Compacted | None, background: _BaselineZip
) -> PairedLatency | None:
    """``metrics.budget.achieved`` of a latency budget: the artifact as written, timed alternately with the
    upload (``worker.stages.budget.verify_latency``); None, with a note, when nothing was compacted."""
    budget = latency_budget(job)
    assert budget is not None
    if compacted is None:
        job.note(
            "latency budget: the artifact is not compacted (see metrics.structure), so it runs no faster than "
            "the upload; metrics.budget.achieved is not measured"
        )
        return None
    with background.held():
        measured = verify_latency(job, compacted.path)
    if measured.speedup < budget.speedup:
        job.note(
            f"latency budget {budget.speedup:g}x at batch {budget.batch_size} not met by the artifact: "
            f"{measured.dense_ms:.2f} ms (upload) / {measured.compact_ms:.2f} ms (artifact) = "
            f"{measured.speedup:.2f}x, medians of {measured.runs} alternate rounds"
        )
    return measured


def _verify_compact(saved: Path, compacted: Compacted, model_dir: Path) -> None:
    """A compact artifact has other shapes than the masked variables, so instead of their values: the
    input's signature defs, and a checkpoint tensor of every new shape (read from the files)."""
    if _signature_defs(saved) != _signature_defs(model_dir):
        raise RuntimeError("the compact model's signatures differ from the input's")
    problem = check_shapes(saved, compacted.shapes)
    if problem is not None:
        raise RuntimeError(problem)


def _verify_artifact(job: Job, saved: Path, pruner: PrunerLike, model_dir: Path) -> None:
    """The artifact must declare the input's signatures and hold, bit for bit, the pruned values: exact zeros
    wherever a mask prunes (kernels, and the biases of removed channels).

    Read from the files (the signature defs in saved_model.pb and the variables checkpoint), not by loading
    the SavedModel again: that load cost ~2 s of a one-shot ResNet-50 job and proves nothing more about the
    bytes on disk. Every pruned value must be found in the checkpoint under the same shape (matched by
    digest: checkpoint keys are object-graph paths, not our variable names)."""
    if _signature_defs(saved) != _signature_defs(model_dir):
        raise RuntimeError("the saved model's signatures differ from the input's")
    values = {nv.name: nv.var for nv in job.handle.variables()}
    expected: dict[str, tuple[tuple[int, ...], bytes]] = {}
    for name, mask in [*pruner.masks.items(), *pruner.bias_masks.items()]:
        value = variable_view(values[name])  # views, not copies: this runs beside the whole loaded model
        if np.any(value, where=~mask):
            raise RuntimeError(f"pruned variable {name} is not exactly zero where masked")
        expected[name] = (value.shape, _digest(value))
    reader = tf.train.load_checkpoint(str(saved / "variables" / "variables"))
    shapes = {shape for shape, _ in expected.values()}
    on_disk = {
        (tuple(shape), _digest(reader.get_tensor(key)))  # one checkpoint tensor in memory at a time
        for key, shape in reader.get_variable_to_shape_map().items()
        if tuple(shape) in shapes
    }
    missing = sorted(name for name, found in expected.items() if found not in on_disk)
    if missing:
        raise RuntimeError(
            f"the saved checkpoint does not hold the pruned values of {', '.join(missing[:5])}"
        )


def _digest(value: np.ndarray) -> bytes:
    """Of the dtype and the bytes, hashed from the array's buffer (``tobytes`` would copy it first)."""
    digest = hashlib.blake2b(value.dtype.str.encode(), digest_size=16)
    digest.update(np.ascontiguousarray(value).data)
    return digest.digest()


def _signature_defs(saved_model: Path) -> dict[str, Any]:
    """Names, method and per-key dtype/shape of every signature, as serving sees them (no loading)."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model / "saved_model.pb").read_bytes())

    def tensors(infos: Any) -> dict[str, Any]:
        return {
            key: (info.dtype, info.tensor_shape.unknown_rank, [d.size for d in info.tensor_shape.dim])
            for key, info in infos.items()
        }

    return {
        name: (sig.method_name, tensors(sig.inputs), tensors(sig.outputs))
        for name, sig in proto.meta_graphs[0].signature_def.items()
        if not name.startswith("__saved_model")  # the init op TF adds on every save
    }


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
