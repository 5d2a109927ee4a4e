"""One pruning job as a plain function: load, baseline, prune (+ fine-tune), evaluate, save, metrics.

No Celery, no database: ``worker.tasks`` passes arrays, an output directory and a ``report(stage, progress)``
callback. ``report`` is called at every stage boundary and periodically while fine-tuning; whatever it raises
(cancellation) propagates untouched. User-actionable problems are ``PipelineError``; anything else is a bug.

Stages (``progress`` is the whole job's, 0..1): loading (audit, load, bind datasets, preprocessing), baseline
(predictions, metrics, sizes), pruning, fine_tuning, evaluating (metrics; latency of the original and the
pruned model run interleaved so machine noise hits both alike), saving (SavedModel with the original
signatures, reload check, ``pruned.zip``).

How the spec reaches the pruning engine (``worker.pruning``):

- Variables: trainable floating rank >= 2 variables matching include/exclude, with a *kind* each
  (``granularity.infer_kinds``). Embedding tables are left out unless an ``include`` regex names them: their
  rows are vocabulary entries, and zeroing a row silently maps a token to the zero vector.
- Granularity: ``get_granularity`` (``block_shape`` for ``block``). Under ``channel``, the kernel(s) producing
  a signature output directly are left dense (``_output_heads``): their channels ARE the output's units, and
  removing one deletes a class or a regression target. Variables a granularity cannot handle (e.g. N:M on a
  depthwise kernel) are left dense by the pruner with the reason in ``notes`` and in ``layers``.
- Criterion hooks (``Criterion.needs_gradients`` / ``regularizer``), never special-cased by name:
  gradient statistics (``gradients.accumulate_gradients``) over train batches before every scheduled prune
  step; a regulariser fine-tunes with ``Pruner.penalty`` before pruning (one-shot: the first half of the
  fine-tuning epochs, or one default epoch without ``fine_tune``; polynomial: during the sparsity ramp).
- ``preprocessing`` rewrites the bound train/eval inputs once, before the baseline, and is reported as
  ``metrics["preprocessing"]``: the artifact does not contain it.
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

from app.schemas.spec import FineTune, Latency, PolynomialSchedule, Preprocessing, PruneSpec
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
from worker.pruning.criteria import GradientStats, get_criterion
from worker.pruning.finetune import TrainingDiverged, count_steps, fine_tune
from worker.pruning.gradients import accumulate_gradients
from worker.pruning.granularity import (
    Channel,
    Granularity,
    Kind,
    check_nm_target,
    get_granularity,
    infer_kinds,
    parse_nm,
)
from worker.pruning.losses import infer_loss
from worker.pruning.pruner import Pruner
from worker.pruning.schedules import Schedule, build_schedule
from worker.pruning.scope import resolve_targets

Report = Callable[[str, float], None]

PREDICT_BATCH = 256
# Gradient criteria: per-batch |g| statistics over at most GRADIENT_SAMPLES train samples in batches of
# GRADIENT_BATCH. Re-collected at every scheduled prune step of a gradual schedule, on at most as many samples
# as were trained on since the previous step, so the statistics at most double the fine-tuning work.
GRADIENT_SAMPLES = 1024
GRADIENT_BATCH = 64
# l1/l2 without fine_tune: one epoch of regularised training with these settings before pruning.
DEFAULT_REGULARIZATION = FineTune(epochs=1)
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
    preprocessing: dict[str, Any] | None = None
    loss: tuple[str, bool] | None = None  # inferred once, see _loss
    gradient_passes: list[int] = field(default_factory=list)  # samples per gradient-statistics pass

    def note(self, text: str) -> None:
        """Append a note once (phases that run twice must not repeat themselves)."""
        if text not in self.notes:
            self.notes.append(text)

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
    granularity = _granularity(spec)

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
    prunable, kinds = _select(job)
    baseline = _measure(job, prunable)
    baseline["size_bytes"] = _sizes(model_dir, out_dir / "baseline.zip", keep_zip=False)
    job.timings["baseline"] = time.perf_counter() - tick

    report("pruning", _PROGRESS["pruning"])
    tick = time.perf_counter()
    pruner = _make_pruner(job, prunable, kinds, granularity)
    job.timings["prune"] = time.perf_counter() - tick
    job.timings["fine_tune"] = 0.0
    _prune_and_fine_tune(job, pruner, report)

    report("evaluating", _PROGRESS["evaluating"])
    tick = time.perf_counter()
    pruned = _measure(job, prunable)
    layers = _layers(prunable, pruner)
    for line in pruner.notes():
        job.note(line)
    job.notes.extend(_unpaired_bias_notes(pruner))
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

    document: dict[str, Any] = {
        "spec": spec.model_dump(mode="json"),
        "baseline": baseline,
        "pruned": pruned,
        "delta": _delta(baseline["metrics"], pruned["metrics"]),
        "layers": layers,
        "timings_s": {k: round(v, 4) for k, v in job.timings.items()},
        "notes": job.notes,
        "versions": {"secateurs": _version(), "tensorflow": tf.__version__},
    }
    if job.preprocessing is not None:
        document["preprocessing"] = job.preprocessing
    return _finite(document)


# -- loading -------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def _refuse_unimplemented(spec: PruneSpec) -> None:
    """The API refuses these with 422 already; a job that slips through must fail, never ignore them."""
    problems = []
    if spec.evaluation is not None and spec.evaluation.cross_validation is not None:
        problems.append("evaluation.cross_validation")
    if problems:
        raise PipelineError("invalid_spec", f"not implemented by this worker: {', '.join(problems)}")


def _granularity(spec: PruneSpec) -> Granularity:
    """The spec's granularity object; an N:M target that is not 1 - N/M fails (the API refuses it already)."""
    try:
        nm = parse_nm(spec.granularity)
        if nm is not None:
            check_nm_target(spec.target_sparsity, *nm)
        block = spec.resolved_block_shape() if spec.granularity == "block" else None
        return get_granularity(spec.granularity, block_shape=block)
    except ValueError as exc:
        raise PipelineError("invalid_spec", str(exc)) from exc


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
    needs_labels = spec.fine_tune is not None or criterion.needs_train_data
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
    job.notes.append(_LATENCY_NOTES.get(spec.granularity, _LATENCY_NOTES["N:M"]))
    for pattern in spec.layer_sparsity:
        if not any(re.search(pattern, nv.name) for nv in handle.prunable(spec.include, spec.exclude)):
            job.notes.append(f"layer_sparsity pattern {pattern!r} matches no selected prunable variable")
    if spec.preprocessing is not None:
        job.preprocessing = _preprocess(job, spec.preprocessing)
    return job


# What zeros buy at run time, per granularity: the tensors keep their shapes in the artifact.
_LATENCY_NOTES = {
    "unstructured": "unstructured zeros shrink the compressed artifact (see size_bytes.zip) but dense TensorFlow "
    "kernels do not run faster on them: expect pruned latency close to baseline",
    "channel": "channel pruning zeroes whole output channels but keeps every tensor's shape: latency stays close "
    "to baseline until the channels are physically removed; the compressed artifact shrinks",
    "block": "block sparsity needs block-sparse kernels to run faster; TensorFlow's dense kernels do not skip "
    "zero blocks: expect pruned latency close to baseline",
    "N:M": "N:M sparsity runs faster only on hardware/runtimes with N:M sparse kernels (e.g. 2:4 on NVIDIA "
    "Ampere+ via TensorRT); TensorFlow's dense kernels do not skip the zeros",
}


def _preprocess(job: _Job, pre: Preprocessing) -> dict[str, Any]:
    """Rewrite the bound train/eval inputs per ``pre``; return what was done, for ``metrics["preprocessing"]``.

    ``min_max`` statistics come from the train dataset (the eval dataset when there is none): fitting on the
    data being evaluated would leak it, but a job without a train set has nothing else. Per feature = per
    entry of the inputs' last axis, over every other axis (Keras ``Normalization``'s ``axis=-1``).
    """
    integer = {k: v["dtype"] for k, v in job.sig.inputs.items() if not tf.as_dtype(v["dtype"]).is_floating}
    if integer:
        raise PipelineError(
            "invalid_spec",
            f"preprocessing scales floating-point inputs, but signature {job.sig.name!r} has non-float inputs "
            f"{integer}: remove 'preprocessing' from the spec (token ids and other integers cannot be scaled)",
        )
    datasets = [d for d in (job.train, job.evaluation) if d is not None]
    applied_to = [role for role, d in (("train", job.train), ("eval", job.evaluation)) if d is not None]
    if pre.min_max is None:
        scale = 1.0 if pre.scale is None else pre.scale
        offset = 0.0 if pre.offset is None else pre.offset
        for data in datasets:
            data.x = {k: (v.astype(np.float64) * scale + offset).astype(v.dtype) for k, v in data.x.items()}
        job.notes.append(
            f"preprocessing: inputs x -> x * {scale:g} + {offset:g} on {applied_to or 'no'} data before the "
            "model; the artifact does not contain it: apply it when serving"
        )
        return {"kind": "scale_offset", "scale": scale, "offset": offset, "applied_to": applied_to}

    lo, hi = pre.min_max
    source = job.train or job.evaluation
    result: dict[str, Any] = {"kind": "min_max", "range": [lo, hi], "applied_to": applied_to}
    if source is None:
        job.notes.append("preprocessing: min_max has no dataset to fit on or apply to; nothing was changed")
        return {**result, "fitted_on": None, "features": {}}
    fitted_on = "train" if source is job.train else "eval"
    features: dict[str, dict[str, list[float]]] = {}
    for name, array in source.x.items():
        axes = tuple(range(array.ndim - 1)) if array.ndim > 1 else (0,)
        low = array.min(axis=axes).astype(np.float64)
        span = array.max(axis=axes).astype(np.float64) - low
        features[name] = {"min": low.tolist(), "max": (low + span).tolist()}
        factor = np.divide(hi - lo, span, out=np.zeros_like(span), where=span > 0)  # constant -> lo
        for data in datasets:
            x = data.x[name]
            data.x[name] = (lo + (x.astype(np.float64) - low) * factor).astype(x.dtype)
    job.notes.append(
        f"preprocessing: per-feature min-max onto [{lo:g}, {hi:g}] fitted on the {fitted_on} dataset "
        f"(last input axis; constant features -> {lo:g}), applied to {applied_to}; the artifact does not "
        "contain it: apply the same scaling (metrics 'preprocessing') when serving"
    )
    if fitted_on == "eval":
        job.notes.append("preprocessing: no train dataset, so min_max was fitted on the evaluation dataset")
    return {**result, "fitted_on": fitted_on, "features": features}


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


# Kinds left out of the prunable set unless an ``include`` regex names the variable, and why.
_EXCLUDED_BY_DEFAULT: dict[str, str] = {
    "embedding": "embedding tables (a row is one vocabulary entry, and a zeroed row silently maps its token "
    "to the zero vector)",
    "bias": "biases of rank 2 (e.g. a GRU's [2, 3 * units] bias; like every bias it is left dense)",
}


def _select(job: _Job) -> tuple[list[NamedVariable], dict[str, Kind]]:
    """The variables the spec prunes and their kinds; embedding tables and rank-2 biases only when an
    ``include`` regex names them (``_EXCLUDED_BY_DEFAULT``)."""
    spec = job.spec
    candidates = job.handle.prunable(spec.include, spec.exclude)
    shapes = {nv.name: nv.shape for nv in candidates}
    kinds = infer_kinds(shapes, {nv.name: nv.shape for nv in job.handle.variables()})
    prunable: list[NamedVariable] = []
    left_out: dict[str, list[str]] = {}
    for nv in candidates:
        kind = kinds[nv.name]
        if kind in _EXCLUDED_BY_DEFAULT and not any(re.search(p, nv.name) for p in spec.include):
            left_out.setdefault(kind, []).append(nv.name)
        else:
            prunable.append(nv)
    for kind, names in left_out.items():
        job.notes.append(
            f"left dense by default: {_EXCLUDED_BY_DEFAULT[kind]}: {names}; name them in 'include' to prune them"
        )
    if not prunable:
        hint = "".join(
            f"; {names} are pruned only when an include regex names them" for names in left_out.values()
        )
        raise PipelineError(
            "invalid_spec",
            f"no prunable variable matches include={spec.include} / exclude={spec.exclude}; prunable "
            f"variables (trainable, floating, rank >= 2): {[nv.name for nv in job.handle.prunable()]}{hint}",
        )
    return prunable, {nv.name: kinds[nv.name] for nv in prunable}


def _output_heads(
    job: _Job, prunable: list[NamedVariable], kinds: Mapping[str, Kind], granularity: Granularity
) -> dict[str, str]:
    """Under ``channel``: the kernel(s) whose channels are a signature output's units, with the skip reason.

    Rule (simple, documented, conservative): for every output of the signature whose last dimension is
    known, the LAST prunable variable in the handle's order whose channel count equals that dimension. The
    handle's order is the order the signature captures variables, which is the call order (checked on
    Sequential, functional multi-output and subclassed Keras 3 models, and on tf_keras): the head comes last
    even when a subclass creates it first. Zeroing one of its channels zeroes an output unit (a class, a
    target) for every input, which no accuracy number would excuse.

    Limits, all on the safe side (a variable left dense, with a note, never one pruned wrongly): a hidden
    layer exactly as wide as an output and captured after the real head would be kept instead of it; an
    output not computed by a kernel (e.g. pooled features) keeps the last kernel of that width.
    """
    if not isinstance(granularity, Channel):
        return {}
    channels: dict[str, int] = {}
    for nv in prunable:
        kind = kinds[nv.name]
        if granularity.skip_reason(kind, nv.shape) is None:
            channels[nv.name] = granularity.layout(kind, nv.shape).n_groups
    heads: dict[str, list[str]] = {}
    for output, info in sorted(job.sig.outputs.items()):
        shape = info["shape"]
        units = shape[-1] if shape else None
        if units is None:
            continue
        matching = [name for name, n in channels.items() if n == units]
        if matching:
            heads.setdefault(matching[-1], []).append(output)
    return {
        name: f"its channels are the units of output(s) {outputs} of signature {job.sig.name!r}: removing "
        "one would delete an output unit (a class or a target) for every input"
        for name, outputs in heads.items()
    }


def _make_pruner(
    job: _Job, prunable: list[NamedVariable], kinds: dict[str, Kind], granularity: Granularity
) -> Pruner:
    spec = job.spec
    names = [nv.name for nv in prunable]
    targets = resolve_targets(names, spec.target_sparsity, spec.layer_sparsity)
    criterion = get_criterion(spec.criterion, spec.seed)
    common: dict[str, Any] = {
        "granularity": granularity,
        "normalization": spec.normalization,
        "kinds": kinds,
        "model_variables": {nv.name: nv.var for nv in job.handle.variables()},
        "skip": _output_heads(job, prunable, kinds, granularity),
    }
    variables = {nv.name: nv.var for nv in prunable}
    if spec.scope == "global":
        fixed = {n: targets[n] for n in names if any(re.search(p, n) for p in spec.layer_sparsity)}
        return Pruner(
            variables, targets, "global", criterion, global_target=spec.target_sparsity, fixed=fixed, **common
        )
    if spec.normalization != "none":
        job.notes.append(
            f"normalization {spec.normalization!r} changes how layers compare in a global ranking; with scope "
            "'layer' every variable is ranked on its own, so it has no effect"
        )
    return Pruner(variables, targets, "layer", criterion, **common)


@dataclass
class _Progress:
    """Maps optimizer steps of all training phases (regularisation, fine-tuning) onto the job's progress."""

    report: Report
    total_steps: int
    done: int = 0

    def at(self, step: int) -> None:
        span = _PROGRESS["evaluating"] - _PROGRESS["fine_tuning"]
        fraction = (self.done + step) / self.total_steps if self.total_steps else 1.0
        self.report("fine_tuning", _PROGRESS["fine_tuning"] + span * min(1.0, fraction))


def _prune_and_fine_tune(job: _Job, pruner: Pruner, report: Report) -> None:
    """Regularise (l1/l2), prune per the schedule (with fresh gradient statistics when the criterion needs
    them), fine-tune with masks re-applied after every step. Times go to ``timings_s`` prune / fine_tune."""
    spec, ft = job.spec, job.spec.fine_tune
    regularizer = pruner.criterion.regularizer
    polynomial = isinstance(spec.schedule, PolynomialSchedule)
    n_train = job.train.n if job.train is not None else 0

    # One-shot l1/l2: a regularised phase first (half the epochs, or one default epoch), pruning after it.
    regularize: FineTune | None = None
    reg_epochs = 0
    tune_epochs = ft.epochs if ft is not None else 0
    if regularizer is not None and not polynomial:
        regularize = ft or DEFAULT_REGULARIZATION
        reg_epochs = max(1, ft.epochs // 2) if ft is not None else DEFAULT_REGULARIZATION.epochs
        tune_epochs = ft.epochs - reg_epochs if ft is not None else 0
    reg_steps = count_steps(n_train, regularize.batch_size, reg_epochs) if regularize else 0
    tune_steps = count_steps(n_train, ft.batch_size, tune_epochs) if ft is not None and tune_epochs else 0
    progress = _Progress(report, reg_steps + tune_steps)
    schedule = build_schedule(spec.schedule.model_dump(), spec.target_sparsity, tune_steps)
    if polynomial:
        job.notes.append(f"polynomial schedule over {tune_steps} fine-tuning steps: {schedule.get_config()}")
    strength = spec.regularization_strength()

    last_prune = [0]

    def prune_at(step: int) -> None:
        should, sparsity = schedule(step)
        if should:
            tick = time.perf_counter()
            budget = GRADIENT_SAMPLES if step == 0 else (step - last_prune[0]) * (ft.batch_size if ft else 1)
            pruner.prune(min(1.0, sparsity / spec.target_sparsity), _gradients(job, pruner, step, budget))
            last_prune[0] = step
            if step == 0:  # later steps run inside fine-tuning and count as fine_tune time
                job.timings["prune"] += time.perf_counter() - tick
        else:
            pruner.apply_masks()

    if regularize is not None:
        penalty = pruner.penalty(strength)
        history = _train(job, regularize, reg_epochs, progress, after_step=None, penalty=penalty)
        job.notes.append(
            f"criterion {spec.criterion!r}: {reg_epochs} epoch(s) of fine-tuning with the {_penalty_name(pruner)} "
            f"penalty (strength {strength:g}) before pruning by magnitude, then {tune_epochs} recovery epoch(s) "
            f"with the masks fixed; regularised data loss per epoch: {[round(v, 5) for v in history]}"
            + (
                ""
                if ft is not None
                else " (no fine_tune in the spec: default regularisation phase of 1 epoch)"
            )
        )
    prune_at(0)
    if ft is not None and tune_epochs:
        _fine_tune_pruned(job, pruner, ft, tune_epochs, progress, schedule, prune_at)
    if job.gradient_passes:
        passes = job.gradient_passes
        job.notes.append(
            f"criterion {spec.criterion!r}: gradient statistics (inference mode, batches of {GRADIENT_BATCH}) "
            f"collected {len(passes)} time(s), before each prune step, over {sorted(set(passes))} train samples"
        )


def _fine_tune_pruned(
    job: _Job,
    pruner: Pruner,
    ft: FineTune,
    epochs: int,
    progress: _Progress,
    schedule: Schedule,
    prune_at: Callable[[int], None],
) -> None:
    """Fine-tuning after (one-shot) or while (polynomial) pruning; l1/l2 penalise during a polynomial ramp
    (after a one-shot prune, these epochs only recover: the penalised phase came before pruning)."""
    spec = job.spec
    strength = spec.regularization_strength()

    penalty: Callable[[], tf.Tensor] | None = None
    gate: tf.Variable | None = None
    end = getattr(schedule, "end_step", 0)
    ramp = isinstance(spec.schedule, PolynomialSchedule)
    if pruner.criterion.regularizer is not None and ramp:  # pull weights down while the sparsity ramps up
        gate = tf.Variable(1.0, trainable=False, dtype=tf.float32)
        base = pruner.penalty(strength)
        assert base is not None
        penalty = _gated(gate, base)
        job.notes.append(
            f"criterion {spec.criterion!r}: the {_penalty_name(pruner)} penalty (strength {strength:g}) is added "
            f"to the loss during the sparsity ramp (steps 1..{end}), not during the recovery steps after it"
        )

    def after_step(step: int) -> None:
        if gate is not None and step >= end:
            gate.assign(0.0)
        prune_at(step)  # recomputes masks when the schedule says so; always re-applies them

    history = _train(job, ft, epochs, progress, after_step=after_step, penalty=penalty)
    job.notes.append(f"fine-tuning loss per epoch: {[round(v, 5) for v in history]}")


def _gated(gate: tf.Variable, penalty: Callable[[], tf.Tensor]) -> Callable[[], tf.Tensor]:
    """``gate * penalty()``: traced once into the train step, the gate variable switches it off later."""
    return lambda: gate * penalty()


def _penalty_name(pruner: Pruner) -> str:
    """How the criterion's penalty reads in notes (l2 is group lasso on channel/block groups)."""
    if pruner.criterion.regularizer == "l1":
        return "L1 (sum |w|)"
    grouped = any(
        pruner.granularities[n].penalty_layout(pruner.kinds[n], pruner.shapes[n]) for n in pruner.active
    )
    return "group-lasso (sum of group L2 norms)" if grouped else "L2 (sum w^2)"


def _gradients(job: _Job, pruner: Pruner, step: int, budget: int) -> dict[str, GradientStats] | None:
    """Gradient statistics of the active variables over up to ``min(budget, GRADIENT_SAMPLES)`` train samples
    (a permutation seeded by ``seed + step``), for criteria with ``needs_gradients``; else None."""
    if not pruner.criterion.needs_gradients:
        return None
    assert job.train is not None and job.train.y is not None  # checked in _prepare
    loss_name, from_logits = _loss(job)
    samples = max(GRADIENT_BATCH, min(budget, GRADIENT_SAMPLES, job.train.n))
    stats = accumulate_gradients(
        job.forward,
        {name: pruner.variables[name] for name in pruner.active},
        job.train.x,
        job.train.y,
        loss=loss_name,
        from_logits=from_logits,
        batch_size=GRADIENT_BATCH,
        max_batches=math.ceil(samples / GRADIENT_BATCH),
        seed=job.spec.seed + step,
    )
    first = next(iter(stats.values()), None)
    if first is not None:
        job.gradient_passes.append(first.samples)
    return stats


def _loss(job: _Job) -> tuple[str, bool]:
    """Loss name and from_logits: the spec's, else inferred once from train labels and a sample of outputs."""
    assert job.train is not None and job.train.y is not None
    spec = job.spec
    if spec.loss is not None and spec.from_logits is not None:
        return spec.loss, spec.from_logits
    if job.loss is None:
        sample = {k: v[:PREDICT_BATCH] for k, v in job.train.x.items()}
        output = job.forward(sample, False).numpy()
        try:
            inferred, logits = infer_loss(job.train.y[: len(output)], output)
        except ValueError as exc:
            raise PipelineError(
                "dataset_mismatch", f"train labels do not fit output {job.output!r}: {exc}"
            ) from exc
        job.loss = (spec.loss or inferred, logits if spec.from_logits is None else spec.from_logits)
        job.note(f"training loss: {job.loss[0]} (from_logits={job.loss[1]})")
    return job.loss


def _train(
    job: _Job,
    settings: FineTune,
    epochs: int,
    progress: _Progress,
    after_step: Callable[[int], None] | None,
    penalty: Callable[[], tf.Tensor] | None,
) -> list[float]:
    """``epochs`` of training on the train set (a regularisation or a fine-tuning phase); loss per epoch."""
    spec = job.spec
    assert job.train is not None and job.train.y is not None
    tick = time.perf_counter()
    progress.at(0)
    training = job.handle.supports_training(spec.signature)
    job.note(TRAINING_MODE_NOTE if training else INFERENCE_MODE_NOTE)
    loss_name, from_logits = _loss(job)
    steps = count_steps(job.train.n, settings.batch_size, epochs)
    every = max(1, progress.total_steps // 50)

    def step_hook(step: int) -> None:
        if after_step is not None:
            after_step(step)
        if step % every == 0:
            progress.at(step)

    variables = [nv.var for nv in job.handle.variables() if nv.var.trainable]
    try:
        history = fine_tune(
            job.forward,
            variables,
            job.train.x,
            job.train.y,
            loss=loss_name,
            from_logits=from_logits,
            epochs=epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            optimizer=settings.optimizer,
            seed=spec.seed + progress.done,  # a second phase reshuffles differently
            training=training,
            after_step=step_hook,
            on_epoch=lambda epoch, loss: progress.at(min(steps, (epoch + 1) * steps // epochs)),
            lr_decay=settings.lr_schedule,
            penalty=penalty,
        )
    except TrainingDiverged as exc:
        raise PipelineError("training_diverged", str(exc)) from exc
    progress.done += steps
    job.timings["fine_tune"] += time.perf_counter() - tick
    return history


# -- results -------------------------------------------------------------------------------------------------


def _layers(prunable: list[NamedVariable], pruner: Pruner) -> list[dict[str, Any]]:
    """API.md's per-variable rows plus the pruner's report: kind, granularity, channels/blocks removed,
    the bias zeroed with removed channels, and why a variable was left dense (``skipped``)."""
    reports = {r.name: r.to_dict() for r in pruner.report()}
    rows = []
    for nv in prunable:
        row: dict[str, Any] = {
            "name": nv.name,
            "shape": nv.shape,
            "params": nv.size,
            "sparsity": reports[nv.name]["sparsity"],
            "target": pruner.targets[nv.name],
        }
        row.update({k: v for k, v in reports[nv.name].items() if k not in row})
        rows.append(row)
    return rows


def _unpaired_bias_notes(pruner: Pruner) -> list[str]:
    """Channel-pruned kernels whose bias naming is unknown: a bias there would still output act(bias)."""
    notes = []
    for name in pruner.active:
        gran, kind = pruner.granularities[name], pruner.kinds[name]
        leaf = name.rpartition("/")[2].split(":")[0]
        if gran.zeroes_bias(kind) and name not in pruner.biases and not leaf.endswith("kernel"):
            notes.append(
                f"{name}: no bias is paired with it by name (Keras '<layer>/kernel' + '<layer>/bias'); if its "
                "layer adds a bias, each removed channel still outputs the constant act(bias)"
            )
    return notes


def _verify_artifact(job: _Job, saved: Path, pruner: Pruner) -> None:
    """The artifact must load with the same signatures and hold exact zeros wherever a mask prunes (kernels
    and the biases of removed channels)."""
    reloaded = load_model(saved)
    if reloaded.signatures != job.handle.signatures:
        raise RuntimeError("the saved model's signatures differ from the input's")
    values = {nv.name: nv.var.numpy() for nv in reloaded.variables()}
    for name, mask in [*pruner.masks.items(), *pruner.bias_masks.items()]:
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
