"""K-fold cross-validation of a pruning spec: k independent prune (+ fine-tune) runs, each scored on held-out data.

One held-out split says little on small datasets; k folds give every train sample one turn in a test fold
and a spread (mean +- std) to judge a pruning spec by. For fold i (``crossval.plan_folds``: stratified for
classification, plain shuffled K-fold otherwise, with the reason in ``note``; a streamed train set is cut by
shard or by record hash instead, ``_streamed_folds``, and each part streams like a whole set):

1. start again from the uploaded model: ``load_model(model_dir)``, a fresh handle (nothing of the main run
   or an earlier fold leaks in), with the seeds reset to the spec's;
2. ``prepare`` it with the other k-1 folds as train data and fold i as evaluation data, so preprocessing,
   checks and loss inference behave as in a normal job (``min_max`` is fitted on the k-1 folds);
3. score the unpruned model on fold i, prune (+ fine-tune) on the k-1 folds exactly as the main run does,
   score the pruned model on fold i, plus fidelity and sparsity.

The main run (the artifact, pruned on the whole train set) is separate and unaffected: seeds are reset before
it prunes. Progress: each fold reports API.md's stages (``pruning``, ``fine_tuning``, ``evaluating``) through
its own slice of the job's progress, so progress only grows; ``report`` raising (cancellation) stops the
loop at the next report, at the latest at the next fold's start.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.schemas.spec import PruneSpec
from worker.data.split import shard_folds
from worker.errors import PipelineError
from worker.evaluation.crossval import FoldPlan, cross_validation_report, plan_folds
from worker.evaluation.metrics import TaskChoice, infer_task
from worker.models import load_model
from worker.pruning.granularity import Granularity
from worker.stages.evaluate import fidelity_section, score
from worker.stages.feed import SAMPLE_RECORDS, Streamed
from worker.stages.job import Job, Window, predict
from worker.stages.load import prepare, seed_everything
from worker.stages.prune import make_pruner, prune_and_fine_tune, select

__all__ = [
    "FOLD_DETAIL_CLASSES",
    "FoldSource",
    "finish_cross_validation",
    "plan_cross_validation",
    "run_cross_validation",
    "run_fold",
]

# Per-fold metrics keep their confusion matrix and per-class report up to this many classes; beyond, the
# per-fold rows would dwarf the document (k matrices of classes^2 entries) and only the scores are kept.
FOLD_DETAIL_CLASSES = 32
# Where a fold's evaluation starts inside its slice of progress (pruning and fine-tuning fill the rest).
_FOLD_EVALUATING = 0.9

Arrays = dict[str, np.ndarray]


def _decide_task(job: Job) -> TaskChoice:
    """The task of the labelled output: the spec's, else inferred from labels and a sample of outputs."""
    assert job.train is not None and job.train.y is not None
    evaluation = job.spec.evaluation
    if evaluation is not None and evaluation.task != "auto":
        return evaluation.task
    sample = {k: v[:256] for k, v in job.train.x.items()}
    output = job.forward(sample, False).numpy()
    try:
        return infer_task(job.train.y[: len(output)], output)
    except ValueError as exc:
        raise PipelineError(
            "dataset_mismatch", f"train labels do not fit output {job.output!r}: {exc}"
        ) from exc


def _detailed(metrics: dict[str, Any] | None) -> bool:
    return metrics is None or len(metrics.get("confusion_matrix") or []) <= FOLD_DETAIL_CLASSES


def _compact(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Drop the per-class detail of a fold's metrics when there are more than ``FOLD_DETAIL_CLASSES``."""
    if _detailed(metrics):
        return metrics
    assert metrics is not None
    return {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "classification_report")}


def _fold_arrays(arrays: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The dataset arrays (``x``/``x.*``/``y``/``y.*``) restricted to the samples at ``index``."""
    keys = [k for k in arrays if k in ("x", "y") or k.startswith(("x.", "y."))]
    return {k: np.asarray(arrays[k])[index] for k in keys}


def _one_fold(
    model_dir: Path,
    spec: PruneSpec,
    train: Arrays | Streamed,
    test: Arrays | Streamed,
    granularity: Granularity,
    window: Window,
) -> tuple[dict[str, Any], bool]:
    """One fold's row (see the module docstring) and whether per-class detail was dropped from it."""
    tick = time.perf_counter()
    seed_everything(spec.seed)
    job = prepare(load_model(model_dir), spec, train, test)
    job.model_dir = model_dir  # a streamed fold that distils loads its teacher from here
    assert job.evaluation is not None
    prunable, kinds = select(job)
    baseline_outputs = predict(job, job.evaluation)
    baseline = score(job, job.evaluation, baseline_outputs)
    pruner = make_pruner(job, prunable, kinds, granularity)
    prune_and_fine_tune(job, pruner, window.sub(0.0, _FOLD_EVALUATING))
    window("evaluating", _FOLD_EVALUATING)
    pruned_outputs = predict(job, job.evaluation)
    pruned = score(job, job.evaluation, pruned_outputs)
    agreement = fidelity_section(job, baseline_outputs, pruned_outputs, baseline.settings)
    zeros = sum(nv.size - int(np.count_nonzero(nv.var.numpy())) for nv in prunable)
    row: dict[str, Any] = {
        "baseline": _compact(baseline.flat),
        "pruned": _compact(pruned.flat),
        "fidelity": agreement.get(job.output),
        "sparsity": zeros / sum(nv.size for nv in prunable),
    }
    if len(job.sig.outputs) > 1:
        row["baseline_by_output"] = {k: _compact(v) for k, v in baseline.by_output.items()}
        row["pruned_by_output"] = {k: _compact(v) for k, v in pruned.by_output.items()}
    row["seconds"] = time.perf_counter() - tick
    dropped = not all(_detailed(m) for m in (*baseline.by_output.values(), *pruned.by_output.values()))
    return row, dropped


@dataclass(frozen=True)
class FoldSource:
    """The folds of one cross-validation: the plan, the task, ``(n_train, n_test)`` per fold, and how to cut
    fold ``i``'s parts (arrays, or streamed parts) when its run starts, one fold at a time."""

    plan: FoldPlan
    task: TaskChoice
    sizes: list[tuple[int, int]]
    parts: Callable[[int], tuple[Arrays | Streamed, Arrays | Streamed]]


def _in_memory_folds(job: Job, train_arrays: Mapping[str, np.ndarray], k: int, task: TaskChoice) -> FoldSource:
    """Index folds of an in-memory train set (``plan_folds``: stratified for classification)."""
    assert job.train is not None
    try:
        plan = plan_folds(job.train.y, job.train.n, k, task, job.spec.seed)
    except ValueError as exc:
        raise PipelineError("dataset_mismatch", f"evaluation.cross_validation: {exc}") from exc
    sizes = [(len(train), len(test)) for train, test in plan.folds]

    def parts(i: int) -> tuple[Arrays, Arrays]:
        train, test = plan.folds[i]
        return _fold_arrays(train_arrays, train), _fold_arrays(train_arrays, test)

    return FoldSource(plan, task, sizes, parts)


def _streamed_folds(job: Job, streamed: Streamed, k: int, task: TaskChoice) -> FoldSource:
    """Folds of a streamed train set without holding it (``worker.data.split.shard_folds``): whole shards
    when there are at least k (a fold's pass never fetches the shards it does not read), else a record hash
    seeded by the spec's seed. Each part streams through the reader like a whole set, with its own sample of
    ``SAMPLE_RECORDS`` records; the sizes are counted exactly first (from the manifest for whole shards it
    counted, else one pass over the record ids, nothing parsed)."""
    reader = streamed.reader
    n_shards = len(reader.shards)
    folds = shard_folds(n_shards, k, seed=job.spec.seed)
    counts = reader.count([subset for pair in folds for subset in pair])
    sizes = list(zip(counts[::2], counts[1::2], strict=True))
    for i, (n_train, n_test) in enumerate(sizes):
        if n_train == 0 or n_test == 0:
            raise PipelineError(
                "dataset_mismatch",
                f"evaluation.cross_validation: fold {i} of {k} would {'test' if n_test == 0 else 'train'} on "
                f"no records ({sum(sizes[0])} records in {n_shards} shards)",
            )
    by_shard = n_shards >= k
    how = (
        f"by shard: the {n_shards} shards dealt to {k} folds after a seeded permutation, so a fold's records "
        "never share a shard with its training records"
        if by_shard
        else f"by record hash: {n_shards} shards are fewer than {k} folds, so each record goes to the fold of "
        "a seeded hash of (shard, record index)"
    )
    plan = FoldPlan(
        folds=[], stratified=False, note=f"the train set is streamed: folds are cut {how}; not stratified"
    )

    def parts(i: int) -> tuple[Streamed, Streamed]:
        (fit, held), (n_train, n_test) = folds[i], sizes[i]
        train_part, test_part = reader.part(fit, n_train), reader.part(held, n_test)
        return (
            Streamed(train_part.take(SAMPLE_RECORDS), train_part),
            Streamed(test_part.take(SAMPLE_RECORDS), test_part),
        )

    return FoldSource(plan, task, sizes, parts)


def run_cross_validation(
    model_dir: Path,
    job: Job,
    train_arrays: Mapping[str, np.ndarray] | Streamed,
    granularity: Granularity,
    window: Window,
) -> dict[str, Any]:
    """The metrics document's ``cross_validation`` section for ``job.spec`` over ``train_arrays``.

    ``job`` is the main run's (bound train labels decide stratification and the task); ``train_arrays`` the
    raw train dataset every fold is cut from: arrays (index folds, stratified for classification) or a
    ``Streamed`` set (shard or record-hash folds, ``_streamed_folds``). Notes go to ``job``. The three steps
    (``plan_cross_validation``, ``run_fold``, ``finish_cross_validation``) are also run apart, one fold per
    task (``worker.kinds.folds``).
    """
    source = plan_cross_validation(job, train_arrays)
    k = len(source.sizes)
    per_fold = []
    compacted = False
    for i in range(k):
        row, dropped = run_fold(model_dir, job.spec, source, i, granularity, window.sub(i / k, (i + 1) / k))
        per_fold.append(row)
        compacted = compacted or dropped
        gc.collect()  # the fold's model handle and pruner go before the next fold loads another
    report, notes = finish_cross_validation(job.spec, source.plan, source.task, per_fold, compacted, source.sizes)
    for text in notes:
        job.note(text)
    return report


def plan_cross_validation(job: Job, train_arrays: Mapping[str, np.ndarray] | Streamed) -> FoldSource:
    """The folds of ``job.spec``'s cross-validation over the job's raw train set, and the task deciding them."""
    spec = job.spec
    assert spec.evaluation is not None and spec.evaluation.cross_validation is not None
    if job.train is None or job.train.y is None:  # prepare() refuses this already
        raise PipelineError("dataset_mismatch", "cross-validation needs a train dataset with labels")
    k = spec.evaluation.cross_validation.folds
    task = _decide_task(job)
    if isinstance(train_arrays, Streamed):
        return _streamed_folds(job, train_arrays, k, task)
    return _in_memory_folds(job, train_arrays, k, task)


def run_fold(
    model_dir: Path,
    spec: PruneSpec,
    source: FoldSource,
    i: int,
    granularity: Granularity,
    fold_window: Window,
) -> tuple[dict[str, Any], bool]:
    """Fold ``i``'s row and whether per-class detail was dropped from it (``_one_fold``)."""
    fold_window("pruning", 0.0)  # a cancellation point between folds
    fold_train, fold_test = source.parts(i)
    return _one_fold(model_dir, spec, fold_train, fold_test, granularity, fold_window)


def finish_cross_validation(
    spec: PruneSpec,
    plan: FoldPlan,
    task: TaskChoice,
    per_fold: list[dict[str, Any]],
    compacted: bool,
    sizes: list[tuple[int, int]],
) -> tuple[dict[str, Any], list[str]]:
    """The section from the folds' rows, and the notes that say how it was measured."""
    k = len(sizes)
    report = cross_validation_report(plan, per_fold, sizes)
    report["task"] = task
    total = sum(sizes[0])  # every train sample is in fold 0's train part or its held-out part
    notes = [
        f"cross-validation: {k} folds of the {total} train samples "
        f"({'stratified' if plan.stratified else 'not stratified'}, seed {spec.seed}); every fold restarts "
        "from the uploaded model, prunes (and fine-tunes) on the other folds and scores baseline and pruned "
        "on its held-out fold. summary = mean and population std (ddof=0) over folds; the artifact and the "
        "top-level metrics are of the model pruned on the whole train set",
        "cross-validation: held-out folds are unseen by the pruning and fine-tuning of their fold, not "
        "necessarily by the uploaded model: if it was trained on this train dataset, the baseline fold scores "
        "are training scores (optimistic) and baseline - pruned overstates the loss pruning causes",
    ]
    if plan.note:
        notes.append(plan.note)
    if compacted:
        notes.append(
            "cross-validation: per-fold metrics omit confusion matrices and per-class reports of outputs "
            f"with more than {FOLD_DETAIL_CLASSES} classes"
        )
    return report, notes
