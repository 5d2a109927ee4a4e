"""One pruning job as a plain function: load, baseline, prune (+ fine-tune), evaluate, save, metrics.

No Celery, no database: ``worker.tasks`` passes arrays, an output directory and a ``report(stage, progress)``
callback. ``report`` is called at every stage boundary and periodically while fine-tuning; whatever it raises
(cancellation) propagates untouched. User-actionable problems are ``PipelineError``; anything else is a bug.

Stages (``progress`` is the whole job's, 0..1): loading (audit, load, bind datasets), baseline (predictions,
metrics, sizes), pruning, fine_tuning, evaluating (metrics; latency of the original and the pruned model run
interleaved so machine noise hits both alike), saving (SavedModel with the original signatures, reload check,
``pruned.zip``).
"""

from __future__ import annotations

import importlib.metadata
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from app.schemas.spec import Latency, PolynomialSchedule, PruneSpec
from worker.errors import PipelineError
from worker.evaluation.latency import interleaved_latency
from worker.evaluation.metrics import classification_metrics, infer_task, regression_metrics
from worker.evaluation.size import dir_size, zip_dir
from worker.models import (
    ModelHandle,
    NamedVariable,
    SignatureInfo,
    audit_saved_model,
    bind_inputs,
    keras_to_saved_model,
    label_key,
    load_model,
    select_output,
)
from worker.pruning.criteria import get_criterion
from worker.pruning.finetune import TrainingDiverged, count_steps, fine_tune
from worker.pruning.losses import infer_loss, loss_fn
from worker.pruning.pruner import Pruner
from worker.pruning.schedules import build_schedule
from worker.pruning.scope import resolve_targets

Report = Callable[[str, float], None]

PREDICT_BATCH = 256
GRADIENT_SAMPLES = 512  # train samples whose summed gradients feed gradient-based criteria
LATENCY_WARMUP = 2
INFERENCE_MODE_NOTE = "fine-tuned in inference mode: BatchNorm statistics frozen, dropout off"
TRAINING_MODE_NOTE = "fine-tuned in training mode (Keras __call__): BatchNorm statistics updated, dropout on"

# Overall progress at the start of each stage; fine-tuning fills the gap up to "evaluating".
_PROGRESS = {
    "loading": 0.0,
    "baseline": 0.05,
    "pruning": 0.15,
    "fine_tuning": 0.2,
    "evaluating": 0.85,
    "saving": 0.93,
}


@dataclass
class _Data:
    """A dataset bound to the signature: inputs by name, and labels for the selected output (or None)."""

    x: dict[str, np.ndarray]
    y: np.ndarray | None

    @property
    def n(self) -> int:
        return len(next(iter(self.x.values())))


@dataclass
class _Job:
    """What the stages share."""

    spec: PruneSpec
    handle: ModelHandle
    sig: SignatureInfo
    output: str
    train: _Data | None
    evaluation: _Data | None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def forward(self, x: Mapping[str, tf.Tensor], training: bool) -> tf.Tensor:
        return self.handle.call(self.spec.signature, x, training=training)[self.output]


def run_pipeline(
    model_dir: Path,
    spec: PruneSpec,
    train: dict[str, np.ndarray] | None,
    evaluation: dict[str, np.ndarray] | None,
    out_dir: Path,
    report: Report,
) -> dict[str, Any]:
    """Prune the SavedModel (or ``.keras`` file) at ``model_dir`` per ``spec``; write ``out_dir/saved_model``
    and ``out_dir/pruned.zip``; return API.md's metrics JSON without ``job_id``/``model_id``."""
    started = time.perf_counter()
    _seed_everything(spec.seed)
    _refuse_unimplemented(spec)

    report("loading", _PROGRESS["loading"])
    tick = time.perf_counter()
    if model_dir.is_file():
        model_dir = keras_to_saved_model(model_dir, out_dir / "input_saved_model")
        converted = "a .keras input is converted to a SavedModel; baseline sizes are of that SavedModel"
    else:
        converted = None
    denied = audit_saved_model(model_dir)  # before loading: loading runs resource initialisers
    if denied:
        raise PipelineError(
            "unsafe_model",
            f"the model's graphs run operations that are not allowed here: {', '.join(denied)}",
        )
    job = _prepare(load_model(model_dir), spec, train, evaluation)
    if converted:
        job.notes.append(converted)
    job.timings["load"] = time.perf_counter() - tick

    report("baseline", _PROGRESS["baseline"])
    tick = time.perf_counter()
    prunable = job.handle.prunable(spec.include, spec.exclude)
    if not prunable:
        raise PipelineError(
            "invalid_spec",
            f"no prunable variable matches include={spec.include} / exclude={spec.exclude}; prunable "
            f"variables (trainable, floating, rank >= 2): {[nv.name for nv in job.handle.prunable()]}",
        )
    baseline = _measure(job, prunable)
    baseline["size_bytes"] = _sizes(model_dir, out_dir / "baseline.zip", keep_zip=False)
    job.timings["baseline"] = time.perf_counter() - tick

    report("pruning", _PROGRESS["pruning"])
    tick = time.perf_counter()
    pruner = _make_pruner(job, prunable)
    total_steps = 0
    if spec.fine_tune is not None and job.train is not None:
        total_steps = count_steps(job.train.n, spec.fine_tune.batch_size, spec.fine_tune.epochs)
    schedule = build_schedule(spec.schedule.model_dump(), spec.target_sparsity, total_steps)
    if isinstance(spec.schedule, PolynomialSchedule):
        job.notes.append(f"polynomial schedule over {total_steps} fine-tuning steps: {schedule.get_config()}")

    def prune_at(step: int) -> None:
        should, sparsity = schedule(step)
        if should:
            pruner.prune(min(1.0, sparsity / spec.target_sparsity), _gradients(job, pruner))
        else:
            pruner.apply_masks()

    prune_at(0)
    job.timings["prune"] = time.perf_counter() - tick

    tick = time.perf_counter()
    if spec.fine_tune is not None:
        _fine_tune(job, prune_at, total_steps, report)
    job.timings["fine_tune"] = time.perf_counter() - tick

    report("evaluating", _PROGRESS["evaluating"])
    tick = time.perf_counter()
    pruned = _measure(job, prunable)
    layers = _layers(prunable, pruner)
    latency = _latency(job, model_dir)
    baseline["latency_ms"], pruned["latency_ms"] = latency["baseline"], latency["pruned"]
    job.timings["evaluate"] = time.perf_counter() - tick

    report("saving", _PROGRESS["saving"])
    tick = time.perf_counter()
    saved = job.handle.save(out_dir / "saved_model")
    _verify_artifact(job, saved, pruner)
    pruned["size_bytes"] = _sizes(saved, out_dir / "pruned.zip", keep_zip=True)
    job.timings["save"] = time.perf_counter() - tick
    job.timings["total"] = time.perf_counter() - started

    return _finite(
        {
            "spec": spec.model_dump(mode="json"),
            "baseline": baseline,
            "pruned": pruned,
            "delta": _delta(baseline["metrics"], pruned["metrics"]),
            "layers": layers,
            "timings_s": {k: round(v, 4) for k, v in job.timings.items()},
            "notes": job.notes,
            "versions": {"secateurs": _version(), "tensorflow": tf.__version__},
        }
    )


# -- loading -------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def _refuse_unimplemented(spec: PruneSpec) -> None:
    """The API refuses these with 422 already; a job that slips through must fail, never ignore them."""
    problems = []
    if spec.granularity != "unstructured":
        problems.append(f"granularity={spec.granularity!r}")
    if spec.normalization != "none":
        problems.append(f"normalization={spec.normalization!r}")
    if spec.preprocessing is not None:
        problems.append("preprocessing")
    if spec.evaluation is not None and spec.evaluation.cross_validation is not None:
        problems.append("evaluation.cross_validation")
    if problems:
        raise PipelineError("invalid_spec", f"not implemented by this worker: {', '.join(problems)}")


def _bind(sig: SignatureInfo, arrays: dict[str, np.ndarray] | None, output: str, role: str) -> _Data | None:
    if arrays is None:
        return None
    x = bind_inputs(sig, arrays)
    key = label_key(output, list(arrays))
    y = None if key is None else np.asarray(arrays[key])
    n = len(next(iter(x.values())))
    if n == 0:
        raise PipelineError("dataset_mismatch", f"the {role} dataset has no samples")
    if y is not None and (y.ndim == 0 or len(y) != n):
        raise PipelineError(
            "dataset_mismatch", f"the {role} dataset's {key!r} has {y.shape} labels for {n} input samples"
        )
    return _Data(x=x, y=y)


def _prepare(
    handle: ModelHandle,
    spec: PruneSpec,
    train: dict[str, np.ndarray] | None,
    evaluation: dict[str, np.ndarray] | None,
) -> _Job:
    sig = handle.signature(spec.signature)
    label_keys = [
        k for arrays in (evaluation, train) if arrays for k in arrays if k == "y" or k.startswith("y.")
    ]
    output = select_output(sig, label_keys)
    job = _Job(
        spec=spec,
        handle=handle,
        sig=sig,
        output=output,
        train=_bind(sig, train, output, "train"),
        evaluation=_bind(sig, evaluation, output, "evaluation"),
    )
    if len(sig.outputs) > 1:
        job.notes.append(
            f"signature {sig.name!r} has outputs {sorted(sig.outputs)}; labels are compared with {output!r} "
            "(name another with a 'y.<output>' array)"
        )
    try:
        criterion = get_criterion(spec.criterion, spec.seed)
    except ValueError as exc:
        raise PipelineError("invalid_spec", str(exc)) from exc
    needs_labels = spec.fine_tune is not None or criterion.needs_gradients
    if needs_labels and (job.train is None or job.train.y is None):
        why = "fine_tune" if spec.fine_tune is not None else f"criterion {spec.criterion!r}"
        raise PipelineError(
            "dataset_mismatch",
            f"{why} needs a train dataset with labels: pass train_dataset_id with arrays 'x' and 'y'",
        )
    if evaluation is None:
        job.notes.append("no evaluation dataset: quality metrics are null")
    elif job.evaluation is not None and job.evaluation.y is None:
        job.notes.append(f"the evaluation dataset has no 'y' (or 'y.{output}'): quality metrics are null")
    job.notes.append(
        "prunable variables: trainable floating-point variables of rank >= 2 (kernels), "
        "filtered by include/exclude; biases and normalisation parameters are left dense"
    )
    if spec.granularity == "unstructured":
        job.notes.append(
            "unstructured zeros shrink the compressed artifact (see size_bytes.zip) but dense TensorFlow "
            "kernels do not run faster on them: expect pruned latency close to baseline"
        )
    for pattern in spec.layer_sparsity:
        if not any(re.search(pattern, nv.name) for nv in handle.prunable(spec.include, spec.exclude)):
            job.notes.append(f"layer_sparsity pattern {pattern!r} matches no selected prunable variable")
    return job


# -- measuring -----------------------------------------------------------------------------------------------


def _predict(job: _Job, data: _Data) -> np.ndarray:
    fixed = _fixed_batch(job.sig)
    batch = fixed or PREDICT_BATCH
    parts = []
    for start in range(0, data.n, batch):
        chunk = {k: v[start : start + batch] for k, v in data.x.items()}
        if fixed and len(next(iter(chunk.values()))) != fixed:
            break  # a signature with a fixed batch size cannot score the remainder
        parts.append(job.forward(chunk, False).numpy())
    if not parts:
        raise PipelineError(
            "dataset_mismatch", f"the signature needs batches of {fixed}; the dataset is smaller"
        )
    return np.concatenate(parts)


def _fixed_batch(sig: SignatureInfo) -> int | None:
    dims = {spec["shape"][0] for spec in sig.inputs.values() if spec["shape"]}
    fixed = [d for d in dims if d is not None]
    return int(fixed[0]) if fixed else None


def _quality(job: _Job) -> dict[str, Any] | None:
    data = job.evaluation
    if data is None or data.y is None:
        return None
    output = _predict(job, data)
    y = data.y[: len(output)]
    spec = job.spec
    task = spec.evaluation.task if spec.evaluation is not None else "auto"
    try:
        if task == "auto":
            task = infer_task(y, output)
        if task == "regression":
            return regression_metrics(y, output)
        from_logits = spec.from_logits
        if from_logits is None:
            from_logits = infer_loss(y, output)[1]
        return classification_metrics(y, output, from_logits)
    except ValueError as exc:
        raise PipelineError(
            "dataset_mismatch", f"labels do not fit output {job.output!r} ({task}): {exc}"
        ) from exc


def _measure(job: _Job, prunable: list[NamedVariable]) -> dict[str, Any]:
    every = job.handle.variables()
    zeros = sum(nv.size - int(np.count_nonzero(nv.var.numpy())) for nv in prunable)
    size = sum(nv.size for nv in prunable)
    return {
        "metrics": _quality(job),
        "params": {
            "total": sum(nv.size for nv in every),
            "prunable": size,
            "nonzero": sum(int(np.count_nonzero(nv.var.numpy())) for nv in every),
        },
        "sparsity": zeros / size if size else 0.0,
    }


def _sizes(saved_model: Path, zip_path: Path, keep_zip: bool) -> dict[str, int]:
    sizes = {"saved_model": dir_size(saved_model), "zip": zip_dir(saved_model, zip_path)}
    if not keep_zip:
        zip_path.unlink()
    return sizes


def _latency(job: _Job, model_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Original (reloaded from disk) and pruned model, called alternately at each batch size."""
    settings = (job.spec.evaluation.latency if job.spec.evaluation else None) or Latency()
    original = load_model(model_dir)
    source = job.evaluation or job.train
    fixed = _fixed_batch(job.sig)
    result: dict[str, dict[str, dict[str, float]]] = {"baseline": {}, "pruned": {}}
    skipped = []
    for batch in settings.batch_sizes:
        if fixed is not None and batch != fixed:
            skipped.append(batch)
            continue
        inputs = _latency_inputs(job.sig, source, batch)
        if inputs is None:
            skipped.append(batch)
            continue
        fns = {
            "baseline": _timed_call(original, job.spec.signature, inputs),
            "pruned": _timed_call(job.handle, job.spec.signature, inputs),
        }
        for which, stats in interleaved_latency(fns, runs=settings.runs, warmup=LATENCY_WARMUP).items():
            result[which][str(batch)] = stats
    if skipped:
        job.notes.append(f"latency not measured at batch sizes {skipped}: no inputs of that batch size fit")
    return result


def _timed_call(handle: ModelHandle, signature: str, inputs: dict[str, tf.Tensor]) -> Callable[[], object]:
    """A call that blocks until every output is computed (``.numpy()``), as latency must."""
    return lambda: [t.numpy() for t in handle.call(signature, inputs).values()]


def _latency_inputs(sig: SignatureInfo, data: _Data | None, batch: int) -> dict[str, tf.Tensor] | None:
    """``batch`` samples cycled from the dataset, else zeros shaped like the signature (None dims -> 1)."""
    if data is not None:
        idx = np.arange(batch) % data.n
        return {k: tf.constant(v[idx]) for k, v in data.x.items()}
    out: dict[str, tf.Tensor] = {}
    for name, spec in sig.inputs.items():
        if spec["shape"] is None:
            return None
        shape = [batch, *[1 if d is None else d for d in spec["shape"][1:]]]
        out[name] = tf.zeros(shape, dtype=tf.as_dtype(spec["dtype"]))
    return out


# -- pruning and fine-tuning ---------------------------------------------------------------------------------


def _make_pruner(job: _Job, prunable: list[NamedVariable]) -> Pruner:
    spec = job.spec
    names = [nv.name for nv in prunable]
    targets = resolve_targets(names, spec.target_sparsity, spec.layer_sparsity)
    criterion = get_criterion(spec.criterion, spec.seed)
    variables = {nv.name: nv.var for nv in prunable}
    if spec.scope == "global":
        fixed = {n: targets[n] for n in names if any(re.search(p, n) for p in spec.layer_sparsity)}
        return Pruner(
            variables, targets, "global", criterion, global_target=spec.target_sparsity, fixed=fixed
        )
    return Pruner(variables, targets, "layer", criterion)


def _gradients(job: _Job, pruner: Pruner) -> dict[str, np.ndarray] | None:
    """Summed gradients of the loss over up to ``GRADIENT_SAMPLES`` train samples, for gradient criteria."""
    if not pruner.criterion.needs_gradients:
        return None
    assert job.train is not None and job.train.y is not None  # checked in _prepare
    loss_name, from_logits = _loss(job)
    compute = loss_fn(loss_name, from_logits)
    names = list(pruner.variables)
    variables = [pruner.variables[n] for n in names]
    total = [np.zeros(v.shape, dtype=np.float64) for v in variables]
    n = min(job.train.n, GRADIENT_SAMPLES)
    for start in range(0, n, PREDICT_BATCH):
        stop = min(n, start + PREDICT_BATCH)
        with tf.GradientTape() as tape:
            out = job.forward({k: v[start:stop] for k, v in job.train.x.items()}, False)
            value = compute(job.train.y[start:stop], out) * (stop - start)
        for acc, grad in zip(total, tape.gradient(value, variables), strict=True):
            if grad is not None:
                acc += grad.numpy()
    return {name: acc / n for name, acc in zip(names, total, strict=True)}


def _loss(job: _Job) -> tuple[str, bool]:
    """Loss name and from_logits: the spec's, else inferred from train labels and a sample of outputs."""
    assert job.train is not None and job.train.y is not None
    spec = job.spec
    if spec.loss is not None and spec.from_logits is not None:
        return spec.loss, spec.from_logits
    sample = {k: v[:PREDICT_BATCH] for k, v in job.train.x.items()}
    output = job.forward(sample, False).numpy()
    try:
        inferred, logits = infer_loss(job.train.y[: len(output)], output)
    except ValueError as exc:
        raise PipelineError(
            "dataset_mismatch", f"train labels do not fit output {job.output!r}: {exc}"
        ) from exc
    return spec.loss or inferred, logits if spec.from_logits is None else spec.from_logits


def _fine_tune(job: _Job, prune_at: Callable[[int], None], total: int, report: Report) -> None:
    spec, ft = job.spec, job.spec.fine_tune
    assert ft is not None and job.train is not None and job.train.y is not None
    report("fine_tuning", _PROGRESS["fine_tuning"])
    training = job.handle.supports_training(spec.signature)
    job.notes.append(TRAINING_MODE_NOTE if training else INFERENCE_MODE_NOTE)
    loss_name, from_logits = _loss(job)
    if spec.loss is None or spec.from_logits is None:
        job.notes.append(f"fine-tuning loss: {loss_name} (from_logits={from_logits})")
    span = _PROGRESS["evaluating"] - _PROGRESS["fine_tuning"]
    every = max(1, total // 50)

    def after_step(step: int) -> None:
        prune_at(step)  # recomputes masks when the schedule says so; always re-applies them
        if step % every == 0:
            report("fine_tuning", _PROGRESS["fine_tuning"] + span * step / total)

    def on_epoch(epoch: int, loss: float) -> None:
        report("fine_tuning", _PROGRESS["fine_tuning"] + span * (epoch + 1) / ft.epochs)

    variables = [nv.var for nv in job.handle.variables() if nv.var.trainable]
    try:
        history = fine_tune(
            job.forward,
            variables,
            job.train.x,
            job.train.y,
            loss=loss_name,
            from_logits=from_logits,
            epochs=ft.epochs,
            batch_size=ft.batch_size,
            learning_rate=ft.learning_rate,
            optimizer=ft.optimizer,
            seed=spec.seed,
            training=training,
            after_step=after_step,
            on_epoch=on_epoch,
            lr_decay=ft.lr_schedule,
        )
    except TrainingDiverged as exc:
        raise PipelineError("training_diverged", str(exc)) from exc
    job.notes.append(f"fine-tuning loss per epoch: {[round(v, 5) for v in history]}")


# -- results -------------------------------------------------------------------------------------------------


def _layers(prunable: list[NamedVariable], pruner: Pruner) -> list[dict[str, Any]]:
    sparsity = pruner.sparsity()
    return [
        {
            "name": nv.name,
            "shape": nv.shape,
            "params": nv.size,
            "sparsity": sparsity[nv.name],
            "target": pruner.targets[nv.name],
        }
        for nv in prunable
    ]


def _verify_artifact(job: _Job, saved: Path, pruner: Pruner) -> None:
    """The artifact must load with the same signatures and hold exact zeros wherever a mask prunes."""
    reloaded = load_model(saved)
    if reloaded.signatures != job.handle.signatures:
        raise RuntimeError("the saved model's signatures differ from the input's")
    values = {nv.name: nv.var.numpy() for nv in reloaded.variables()}
    for name, mask in pruner.masks.items():
        if name not in values or np.any(values[name][~mask] != 0):
            raise RuntimeError(f"pruned variable {name} is not exactly zero where masked in the saved model")


def _delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, float]:
    if before is None or after is None:
        return {}
    return {
        k: float(after[k]) - float(before[k])
        for k in before
        if isinstance(before[k], int | float) and isinstance(after.get(k), int | float)
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
