"""Loading stage: bind the datasets to the signature, check the spec against them, apply preprocessing.

``prepare`` turns a loaded ``ModelHandle`` and the raw ``.npz`` arrays into a ``Job``; the main run and every
cross-validation fold call it, so a fold sees exactly the checks, notes and preprocessing of the main run
(``min_max`` statistics are fitted on the fold's own train part: fitting on the held-out fold would leak it).
"""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np
import tensorflow as tf

from app.schemas.fit import loss_label_problem
from app.schemas.spec import Preprocessing, PruneSpec
from worker.errors import PipelineError
from worker.evaluation.metrics import labels_for_outputs
from worker.models import ModelHandle, SignatureInfo, bind_inputs, label_key, select_output
from worker.pruning.criteria import get_criterion
from worker.pruning.granularity import Granularity, check_nm_target, get_granularity, parse_nm
from worker.stages.feed import Streamed, bind_stream
from worker.stages.job import Data, Job


def seed_everything(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds from the spec: same seed, same masks and batches."""
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)


def resolve_granularity(spec: PruneSpec) -> Granularity:
    """The spec's granularity object; an N:M target that is not 1 - N/M fails (the API refuses it already)."""
    try:
        nm = parse_nm(spec.granularity)
        if nm is not None:
            check_nm_target(spec.target_sparsity, *nm)
        block = spec.resolved_block_shape() if spec.granularity == "block" else None
        return get_granularity(spec.granularity, block_shape=block)
    except ValueError as exc:
        raise PipelineError("invalid_spec", str(exc)) from exc


Arrays = dict[str, np.ndarray]


def _arrays(given: Arrays | Streamed | None) -> Arrays | None:
    return given.sample if isinstance(given, Streamed) else given


def _bind(
    sig: SignatureInfo, given: Arrays | Streamed | None, output: str, role: str, spec: PruneSpec
) -> Data | None:
    """Inputs by name and labels per output (API.md's ``y`` / ``y.<output>``), every array one row per sample;
    a streamed dataset binds its in-memory sample and carries its stream (``stages.feed``)."""
    arrays = _arrays(given)
    if arrays is None:
        return None
    x = bind_inputs(sig, arrays)
    n = len(next(iter(x.values())))
    if n == 0:
        raise PipelineError("dataset_mismatch", f"the {role} dataset has no samples")
    labels = labels_for_outputs(sig.outputs, arrays, selected=output)
    for name, y in labels.items():
        if y.ndim == 0 or len(y) != n:
            key = label_key(name, [k for k in arrays if k in (f"y.{name}", "y")])
            raise PipelineError(
                "dataset_mismatch", f"the {role} dataset's {key!r} has {y.shape} labels for {n} input samples"
            )
    data = Data(x=x, y=labels.get(output), labels=labels)
    if isinstance(given, Streamed):
        limit = spec.evaluation.max_samples if spec.evaluation is not None else None
        data.stream = bind_stream(given.reader, sig.inputs, output, limit)
    return data


def _bind_inputs(sig: SignatureInfo, given: Arrays | Streamed | None) -> Data | None:
    """A calibration dataset: its inputs only (labels, if any, are ignored; a streamed set: its sample)."""
    arrays = _arrays(given)
    if arrays is None:
        return None
    x = bind_inputs(sig, {k: v for k, v in arrays.items() if k == "x" or k.startswith("x.")})
    if len(next(iter(x.values()))) == 0:
        raise PipelineError("dataset_mismatch", "the calibration dataset has no samples")
    return Data(x=x, y=None)


def prepare(
    handle: ModelHandle,
    spec: PruneSpec,
    given_train: Arrays | Streamed | None,
    given_evaluation: Arrays | Streamed | None,
    given_calibration: Arrays | Streamed | None = None,
) -> Job:
    """A ``Job`` for ``handle``: datasets bound and checked, labels located, notes started, preprocessing applied.

    Fails with ``dataset_mismatch`` when the spec trains (fine_tune, a gradient or penalty criterion, or
    K-fold cross-validation, which prunes per fold) and the train dataset has no labels for the output.
    """
    sig = handle.signature(spec.signature)
    train, evaluation = _arrays(given_train), _arrays(given_evaluation)
    label_keys = [
        k for arrays in (evaluation, train) if arrays for k in arrays if k == "y" or k.startswith("y.")
    ]
    output = select_output(sig, label_keys)
    job = Job(
        spec=spec,
        handle=handle,
        sig=sig,
        output=output,
        train=_bind(sig, given_train, output, "train", spec),
        evaluation=_bind(sig, given_evaluation, output, "evaluation", spec),
        calibration=_bind_inputs(sig, given_calibration),
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
    folds = spec.evaluation.cross_validation if spec.evaluation is not None else None
    needs_labels = spec.fine_tune is not None or criterion.needs_train_data or folds is not None
    if needs_labels and (job.train is None or job.train.y is None):
        why = (
            "fine_tune"
            if spec.fine_tune is not None
            else f"criterion {spec.criterion!r}"
            if criterion.needs_train_data
            else "evaluation.cross_validation"
        )
        raise PipelineError(
            "dataset_mismatch",
            f"{why} needs a train dataset with labels: pass train_dataset_id with arrays 'x' and 'y'",
        )
    if spec.loss is not None and train is not None and job.train is not None and job.train.y is not None:
        # The signature's shapes (None = any size); stages.prune.loss_of checks again with the real output.
        problem = loss_label_problem(
            spec.loss,
            job.train.y.shape,
            sig.outputs[output]["shape"],
            labels=f"the train dataset's labels {label_key(output, train)!r}",
            output_name=output,
        )
        if problem:
            raise PipelineError("invalid_spec", problem)
    if evaluation is None:
        job.notes.append("no evaluation dataset: quality metrics are null")
    elif job.evaluation is not None and job.evaluation.y is None:
        job.notes.append(f"the evaluation dataset has no 'y' (or 'y.{output}'): quality metrics are null")
    job.notes.append(
        "prunable variables: trainable floating-point variables of rank >= 2 (kernels), "
        "filtered by include/exclude; biases and normalisation parameters are left dense"
    )
    if spec.compact and spec.granularity == "channel":
        job.notes.append(_COMPACT_NOTE)
    else:
        job.notes.append(_LATENCY_NOTES.get(spec.granularity, _LATENCY_NOTES["N:M"]))
    for pattern in spec.layer_sparsity:
        if not any(re.search(pattern, nv.name) for nv in handle.prunable(spec.include, spec.exclude)):
            job.notes.append(f"layer_sparsity pattern {pattern!r} matches no selected prunable variable")
    if spec.preprocessing is not None:
        job.preprocessing = _preprocess(job, spec.preprocessing)
    return job


# With compaction (spec.compact, worker.stages.compact) the pruned side is measured on the compact model.
_COMPACT_NOTE = (
    "channel pruning with compaction: removed channels are physically removed from the artifact (smaller "
    "variables, same signatures); pruned params, macs, size_bytes and latency_ms are the compact model's, "
    "and 'structure' lists the channel groups and the equivalence check"
)
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


def _preprocess(job: Job, pre: Preprocessing) -> dict[str, Any]:
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
    roles = (("train", job.train), ("eval", job.evaluation), ("calibration", job.calibration))
    datasets = [d for _, d in roles if d is not None]
    applied_to = [role for role, d in roles if d is not None]
    if pre.min_max is None:
        scale = 1.0 if pre.scale is None else pre.scale
        offset = 0.0 if pre.offset is None else pre.offset
        for data in datasets:
            data.x = {k: (v.astype(np.float64) * scale + offset).astype(v.dtype) for k, v in data.x.items()}
            if data.stream is not None:
                data.stream.affine = {k: (np.float64(scale), np.float64(offset)) for k in data.x}
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
    if source.stream is not None:
        job.note(
            f"preprocessing: min_max fitted on the first {source.n} records of the streamed {fitted_on} set"
        )
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
            if data.stream is not None:  # the same map per streamed batch: x * factor + (lo - low * factor)
                data.stream.affine[name] = (factor, lo - low * factor)
    job.notes.append(
        f"preprocessing: per-feature min-max onto [{lo:g}, {hi:g}] fitted on the {fitted_on} dataset "
        f"(last input axis; constant features -> {lo:g}), applied to {applied_to}; the artifact does not "
        "contain it: apply the same scaling (metrics 'preprocessing') when serving"
    )
    if fitted_on == "eval":
        job.notes.append("preprocessing: no train dataset, so min_max was fitted on the evaluation dataset")
    return {**result, "fitted_on": fitted_on, "features": features}


# -- measuring -----------------------------------------------------------------------------------------------
