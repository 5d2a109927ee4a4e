"""Pruning stage: choose the variables, build the pruner from the spec, prune per the schedule, fine-tune.

How the spec reaches the pruning engine (``worker.pruning``):

- Variables: trainable floating rank >= 2 variables matching include/exclude, with a *kind* each
  (``granularity.infer_kinds``). Embedding tables are left out unless an ``include`` regex names them: their
  rows are vocabulary entries, and zeroing a row silently maps a token to the zero vector.
- Granularity: ``get_granularity`` (``block_shape`` for ``block``). Under ``channel``, the signature's graph
  gives coupled channel groups (``worker.structure.find_groups``) and ``pruning.group_pruner.GroupPruner``
  ranks and zeroes them as one (a group reaching an output is left whole by the analysis). Without an
  analysis, each variable's channels are pruned alone and the kernel(s) producing a signature output directly
  are left dense (``_output_heads``): their channels ARE the output's units, and removing one deletes a class
  or a target.
  Variables a granularity cannot handle (e.g. N:M on a depthwise kernel) are left dense by the pruner with
  the reason in ``notes`` and in ``layers``.
- Criterion hooks (``Criterion.needs_gradients`` / ``regularizer``), never special-cased by name:
  gradient statistics (``gradients.accumulate_gradients``) over train batches before every scheduled prune
  step; a regulariser fine-tunes with ``Pruner.penalty`` before pruning (one-shot: the first half of the
  fine-tuning epochs, or one default epoch without ``fine_tune``; polynomial: during the sparsity ramp).
- ``Criterion.calibration`` (wanda, sparsegpt): statistics from the calibration inputs
  (``stages.calibration.calibrate``) before the (one-shot) prune; SparseGPT's weight updates are written
  then, and its masks hold through fine-tuning like any other.
- ``fine_tune.distill``: the unpruned model's outputs on the train set are computed before anything is pruned
  (``_distillation``) and become the soft targets of every training phase (``finetune.Distillation``).

Progress: ``prune_and_fine_tune`` reports through a ``Window`` (the main run's, or one fold's): ``pruning`` at
its start, then ``fine_tuning`` as optimizer steps of every training phase complete.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from app.schemas.fit import loss_label_problem
from app.schemas.spec import FineTune, PolynomialSchedule
from worker.errors import PipelineError
from worker.models import NamedVariable, load_model
from worker.pruning.criteria import Criterion, GradientStats, get_criterion
from worker.pruning.finetune import (
    Batches,
    Distillation,
    TrainingDiverged,
    array_batches,
    count_steps,
    fine_tune,
)
from worker.pruning.gradients import accumulate_gradients
from worker.pruning.granularity import Channel, Granularity, Kind, infer_kinds
from worker.pruning.group_pruner import GroupPruner
from worker.pruning.interface import PrunerLike
from worker.pruning.losses import infer_loss
from worker.pruning.pruner import Pruner
from worker.pruning.schedules import Schedule, build_schedule
from worker.pruning.scope import resolve_targets
from worker.stages.calibration import calibrate
from worker.stages.job import Job, Window, fixed_batch
from worker.stages.repair import dense_snapshot, repair_channels

PREDICT_SAMPLE = 256  # outputs computed to infer the loss
# Gradient criteria: per-batch |g| statistics over at most GRADIENT_SAMPLES train samples in batches of
# GRADIENT_BATCH. Re-collected at every scheduled prune step of a gradual schedule, on at most as many samples
# as were trained on since the previous step, so the statistics at most double the fine-tuning work.
GRADIENT_SAMPLES = 1024
GRADIENT_BATCH = 64
# l1/l2 without fine_tune: one epoch of regularised training with these settings before pruning.
DEFAULT_REGULARIZATION = FineTune(epochs=1)
INFERENCE_MODE_NOTE = "fine-tuned in inference mode: BatchNorm statistics frozen, dropout off"
TRAINING_MODE_NOTE = "fine-tuned in training mode (Keras __call__): BatchNorm statistics updated, dropout on"
# Where fine-tuning starts inside the pruning window (the one-shot prune before it is quick).
TUNE_START = 0.05


# Kinds left out of the prunable set unless an ``include`` regex names the variable, and why.
_EXCLUDED_BY_DEFAULT: dict[str, str] = {
    "embedding": "embedding tables (a row is one vocabulary entry, and a zeroed row silently maps its token "
    "to the zero vector)",
    "bias": "biases of rank 2 (e.g. a GRU's [2, 3 * units] bias; like every bias it is left dense)",
}


def select(job: Job) -> tuple[list[NamedVariable], dict[str, Kind]]:
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
    job: Job, prunable: list[NamedVariable], kinds: Mapping[str, Kind], granularity: Granularity
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


def make_pruner(
    job: Job, prunable: list[NamedVariable], kinds: dict[str, Kind], granularity: Granularity
) -> PrunerLike:
    """The pruner for the spec. Under ``channel`` it ranks the graph's coupled channel groups
    (``GroupPruner``); when the analysis is unavailable, per-variable channels as before (``Pruner``, with
    output heads left dense), and a note says the result cannot be compacted."""
    spec = job.spec
    names = [nv.name for nv in prunable]
    targets = resolve_targets(names, _final_target(spec), spec.layer_sparsity)
    criterion = get_criterion(spec.criterion, spec.seed)
    if spec.budget is not None:
        return _budget_pruner(job, prunable, kinds, granularity, targets, criterion)
    if isinstance(granularity, Channel):
        analysis, problem = job.channel_groups()
        if analysis is not None:
            return _group_pruner(job, prunable, kinds, targets, criterion, analysis)
        job.note(f"{problem}: channels are pruned per variable (masks only, nothing can be compacted)")
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


def _final_target(spec: Any) -> float:
    """``target_sparsity``; a budget job has none: its schedule ramps towards the budget (1.0 = all of it)."""
    return float(spec.target_sparsity) if spec.target_sparsity is not None else 1.0


def _budget_pruner(
    job: Job,
    prunable: list[NamedVariable],
    kinds: dict[str, Kind],
    granularity: Granularity,
    targets: dict[str, float],
    criterion: Criterion,
) -> GroupPruner:
    """``spec.budget``: the graph's channel groups, ranked as the spec says, removed until the budget is met
    (``worker.stages.budget``); a latency budget first calibrates its MACs fraction on compacted models."""
    from worker.stages.budget import budget_policy, calibrate_latency

    if not isinstance(granularity, Channel):  # the spec refuses it (422); a stored spec may predate that
        raise PipelineError("invalid_spec", 'a budget needs granularity "channel"')
    analysis, problem = job.channel_groups()
    if analysis is None:
        raise PipelineError(
            "budget_unreachable",
            f"{problem}: a budget removes channel groups read from the graph, and none could be read",
        )
    pruner = _group_pruner(
        job, prunable, kinds, targets, criterion, analysis, budget=budget_policy(job, prunable, 1.0)
    )
    assert job.spec.budget is not None
    if job.spec.budget.latency is not None:
        fraction = calibrate_latency(
            job, pruner, prunable, lambda: _gradients(job, pruner, 0, GRADIENT_SAMPLES)
        )
        pruner.budget = budget_policy(job, prunable, fraction)
    return pruner


def meet_latency_budget(job: Job, pruner: PrunerLike, prunable: list[NamedVariable]) -> None:
    """A latency budget's check after pruning: the compacted pruned model measured against the upload, more
    removed while short (``worker.stages.budget.meet_latency``); no-op for other jobs."""
    from worker.stages.budget import latency_budget, meet_latency

    if latency_budget(job) is None or not isinstance(pruner, GroupPruner):
        return
    meet_latency(job, pruner, prunable, lambda: _gradients(job, pruner, 0, GRADIENT_SAMPLES))


def _group_pruner(
    job: Job,
    prunable: list[NamedVariable],
    kinds: dict[str, Kind],
    targets: dict[str, float],
    criterion: Criterion,
    analysis: Any,
    budget: Any = None,
) -> GroupPruner:
    spec = job.spec
    variables = {nv.name: nv.var for nv in prunable}
    common: dict[str, Any] = {
        "normalization": spec.normalization,
        "kinds": kinds,
        "model_variables": {nv.name: nv.var for nv in job.handle.variables()},
    }
    if budget is not None:  # the spec's ranking; the budget says how far along it (every target is 1.0)
        pruner = GroupPruner(
            analysis.groups,
            variables,
            targets,
            spec.scope,
            criterion,
            global_target=1.0,
            budget=budget,
            **common,
        )
    elif spec.scope == "global":
        fixed = {n: targets[n] for n in variables if any(re.search(p, n) for p in spec.layer_sparsity)}
        pruner = GroupPruner(
            analysis.groups,
            variables,
            targets,
            "global",
            criterion,
            global_target=spec.target_sparsity,
            fixed=fixed,
            **common,
        )
    else:
        if spec.normalization != "none":
            job.notes.append(
                f"normalization {spec.normalization!r} changes how groups compare in a global ranking; with "
                "scope 'layer' every channel group is ranked on its own, so it has no effect"
            )
        pruner = GroupPruner(analysis.groups, variables, targets, "layer", criterion, **common)
    pruner.analysis = analysis
    return pruner


@dataclass
class _Progress:
    """Maps optimizer steps of all training phases (regularisation, fine-tuning) onto the pruning window."""

    window: Window
    total_steps: int
    done: int = 0

    def at(self, step: int) -> None:
        fraction = (self.done + step) / self.total_steps if self.total_steps else 1.0
        self.window("fine_tuning", TUNE_START + (1.0 - TUNE_START) * min(1.0, fraction))


def prune_and_fine_tune(job: Job, pruner: PrunerLike, window: Window) -> None:
    """Regularise (l1/l2), prune per the schedule (with fresh gradient statistics when the criterion needs
    them), fine-tune with masks re-applied after every step. Times go to ``timings_s`` prune / fine_tune.

    Reports ``fine_tuning`` through ``window`` (fractions ``TUNE_START``..1) while training; the caller reports
    ``pruning`` at the window's start."""
    spec, ft = job.spec, job.spec.fine_tune
    job.timings.setdefault("prune", 0.0)
    job.timings.setdefault("fine_tune", 0.0)
    regularizer = pruner.criterion.regularizer
    polynomial = isinstance(spec.schedule, PolynomialSchedule)

    # One-shot l1/l2: a regularised phase first (half the epochs, or one default epoch), pruning after it.
    regularize: FineTune | None = None
    reg_epochs = 0
    tune_epochs = ft.epochs if ft is not None else 0
    if regularizer is not None and not polynomial:
        regularize = ft or DEFAULT_REGULARIZATION
        reg_epochs = max(1, ft.epochs // 2) if ft is not None else DEFAULT_REGULARIZATION.epochs
        tune_epochs = ft.epochs - reg_epochs if ft is not None else 0
    reg_steps = reg_epochs * steps_per_epoch(job, regularize) if regularize else 0
    tune_steps = tune_epochs * steps_per_epoch(job, ft) if ft is not None and tune_epochs else 0
    progress = _Progress(window, reg_steps + tune_steps)
    final = _final_target(spec)
    schedule = build_schedule(spec.schedule.model_dump(), final, tune_steps)
    if polynomial:
        job.notes.append(f"polynomial schedule over {tune_steps} fine-tuning steps: {schedule.get_config()}")
    strength = spec.regularization_strength()
    distill = _distillation(job, ft)  # the dense model's outputs: before anything is pruned
    dense = None  # the weights the channel repair reproduces the op outputs of (stages.repair)
    if spec.reconstruct and polynomial:
        job.note(
            "reconstruct: skipped, a polynomial schedule removes channels during fine-tuning (the repair runs "
            "after a one-shot prune)"
        )
    elif spec.reconstruct:
        dense = dense_snapshot(job)

    last_prune = [0]

    def prune_at(step: int) -> None:
        should, sparsity = schedule(step)
        if should:
            tick = time.perf_counter()
            budget = GRADIENT_SAMPLES if step == 0 else (step - last_prune[0]) * (ft.batch_size if ft else 1)
            pruner.prune(
                min(1.0, sparsity / final),
                _gradients(job, pruner, step, budget),
                calibration=calibrate(job, pruner),
            )
            last_prune[0] = step
            if step == 0:  # later steps run inside fine-tuning and count as fine_tune time
                job.timings["prune"] += time.perf_counter() - tick
        else:
            pruner.apply_masks()

    if regularize is not None:
        penalty = pruner.penalty(strength)
        history = _train(job, regularize, reg_epochs, progress, None, penalty, distill)
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
    if dense is not None:  # least-squares refit of the consumers + BatchNorm statistics (stages.repair)
        repair_channels(job, pruner, dense)
    if ft is not None and tune_epochs:
        _fine_tune_pruned(job, pruner, ft, tune_epochs, progress, schedule, prune_at, distill)
    if job.gradient_passes:
        passes = job.gradient_passes
        job.notes.append(
            f"criterion {spec.criterion!r}: gradient statistics (inference mode, batches of {GRADIENT_BATCH}) "
            f"collected {len(passes)} time(s), before each prune step, over {sorted(set(passes))} train samples"
        )


def _fine_tune_pruned(
    job: Job,
    pruner: PrunerLike,
    ft: FineTune,
    epochs: int,
    progress: _Progress,
    schedule: Schedule,
    prune_at: Callable[[int], None],
    distill: Distillation | None,
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

    history = _train(job, ft, epochs, progress, after_step, penalty, distill)
    job.notes.append(f"fine-tuning loss per epoch: {[round(v, 5) for v in history]}")


def _distillation(job: Job, ft: FineTune | None) -> Distillation | None:
    """With ``fine_tune.distill``: the unpruned model's outputs on every train sample (inference mode, in
    batches), the soft targets of every training phase (``finetune.Distillation``)."""
    if ft is None or ft.distill is None:
        return None
    assert job.train is not None
    if job.train.stream is not None:
        return _streamed_distillation(job, ft.distill.alpha, ft.distill.temperature)
    x = job.train.x
    teacher = np.concatenate(
        [
            job.forward({k: v[i : i + PREDICT_SAMPLE] for k, v in x.items()}, False).numpy()
            for i in range(0, job.train.n, PREDICT_SAMPLE)
        ]
    )
    job.note(
        f"fine-tuning distils from the unpruned model: loss = {1 - ft.distill.alpha:g} x task loss + "
        f"{ft.distill.alpha:g} x distillation term (temperature {ft.distill.temperature:g}); the dense "
        "outputs on the train set were computed once before pruning"
    )
    return Distillation(teacher, ft.distill.alpha, ft.distill.temperature)


def _streamed_distillation(job: Job, alpha: float, temperature: float) -> Distillation:
    """A second, unpruned copy of the model computes the soft targets of each streamed batch: precomputing
    them would hold ``n x outputs`` floats for a train set that does not fit in memory."""
    if job.model_dir is None:
        raise PipelineError(
            "invalid_spec", "fine_tune.distill on a streamed train set needs the model's path"
        )
    teacher = load_model(job.model_dir)
    signature, output = job.spec.signature, job.output

    def teacher_fn(x: dict[str, Any]) -> tf.Tensor:
        return teacher.call(signature, x, training=False)[output]

    job.note(
        f"fine-tuning distils from the unpruned model: loss = {1 - alpha:g} x task loss + {alpha:g} x "
        f"distillation term (temperature {temperature:g}); the train set is streamed, so a second, unpruned "
        "copy of the model computes the soft targets of each batch (one more forward pass per step)"
    )
    return Distillation(None, alpha, temperature, teacher_fn=teacher_fn)


def steps_per_epoch(job: Job, settings: FineTune) -> int:
    """Optimizer steps of one epoch: ``steps_per_epoch``, else the train samples (capped by ``max_samples``)
    in batches; a streamed set counts its records from the manifest."""
    assert job.train is not None
    if job.train.stream is not None:
        return int(
            job.train.stream.train_steps(settings.batch_size, settings.steps_per_epoch, settings.max_samples)
        )
    if settings.steps_per_epoch is not None:
        return settings.steps_per_epoch
    n = job.train.n if settings.max_samples is None else min(job.train.n, settings.max_samples)
    return count_steps(n, settings.batch_size, 1)


def _batches(job: Job, settings: FineTune, seed: int, distill: Distillation | None) -> Batches:
    """The training batches of every epoch: the in-memory arrays shuffled, or the streamed set's shards."""
    train = job.train
    assert train is not None and train.y is not None
    if train.stream is None:
        return array_batches(
            train.x,
            train.y,
            settings.batch_size,
            seed,
            None if distill is None else distill.teacher,
            max_samples=settings.max_samples,
            steps_per_epoch=settings.steps_per_epoch,
        )
    stream = train.stream
    steps = steps_per_epoch(job, settings)

    def epoch(index: int) -> Iterator[tuple[dict[str, Any], Any, Any]]:
        for x, y in stream.train_epoch(settings.batch_size, steps, seed, index):
            yield x, y, None

    return Batches(steps, epoch)


def _augmenter(job: Job) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """``spec.augmentation`` as one callable on a training batch's inputs (``worker.data.augment``)."""
    items = job.spec.augmentation
    if not items:
        return None
    from worker.data.augment import build_augmenter

    try:
        augment = build_augmenter([item.model_dump(exclude_none=True) for item in items], job.spec.seed)
    except ValueError as exc:
        raise PipelineError("invalid_spec", str(exc)) from exc
    job.note(
        f"augmentation on training batches only: {[item.kind for item in items]} (seeded; evaluation and "
        "calibration data are not augmented)"
    )
    return augment


def _gated(gate: tf.Variable, penalty: Callable[[], tf.Tensor]) -> Callable[[], tf.Tensor]:
    """``gate * penalty()``: traced once into the train step, the gate variable switches it off later."""
    return lambda: gate * penalty()


def _penalty_name(pruner: PrunerLike) -> str:
    """How the criterion's penalty reads in notes (l2 is group lasso on channel/block groups)."""
    if pruner.criterion.regularizer == "l1":
        return "L1 (sum |w|)"
    grouped = any(
        pruner.granularities[n].penalty_layout(pruner.kinds[n], pruner.shapes[n]) for n in pruner.active
    )
    return "group-lasso (sum of group L2 norms)" if grouped else "L2 (sum w^2)"


def _gradients(job: Job, pruner: PrunerLike, step: int, budget: int) -> dict[str, GradientStats] | None:
    """Gradient statistics of the active variables over up to ``min(budget, GRADIENT_SAMPLES)`` train samples
    (a permutation seeded by ``seed + step``), for criteria with ``needs_gradients``; else None."""
    if not pruner.criterion.needs_gradients:
        return None
    assert job.train is not None and job.train.y is not None  # checked in _prepare
    loss_name, from_logits = loss_of(job)
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


def loss_of(job: Job) -> tuple[str, bool]:
    """Loss name and from_logits: the spec's, else inferred once from train labels and a sample of outputs.

    Either way the loss is checked once against the labels and the real output (the signature may leave
    sizes unknown, which stages.load could not check): a mismatch would otherwise surface as a reshape error
    deep inside training, reported as an internal error instead of the user's mistake.
    """
    assert job.train is not None and job.train.y is not None
    spec = job.spec
    if job.loss is None:
        fixed = fixed_batch(job.sig)
        if fixed is not None and job.train.n < fixed:
            raise PipelineError(
                "dataset_mismatch",
                f"the train dataset has {job.train.n} samples; signature {job.sig.name!r} takes batches of "
                f"exactly {fixed}",
            )
        sample = {k: v[: fixed or PREDICT_SAMPLE] for k, v in job.train.x.items()}
        output = job.forward(sample, False).numpy()
        if spec.loss is not None and spec.from_logits is not None:
            resolved = (spec.loss, spec.from_logits)
        else:
            try:
                inferred, logits = infer_loss(job.train.y[: len(output)], output)
            except ValueError as exc:
                raise PipelineError(
                    "dataset_mismatch", f"train labels do not fit output {job.output!r}: {exc}"
                ) from exc
            resolved = (spec.loss or inferred, logits if spec.from_logits is None else spec.from_logits)
            job.note(f"training loss: {resolved[0]} (from_logits={resolved[1]})")
        problem = loss_label_problem(
            resolved[0],
            job.train.y.shape,
            output.shape,
            labels="the train labels",
            output_name=job.output,
            inferred=spec.loss is None,
        )
        if problem:  # the user's loss is wrong, or (inferred) no loss fits these labels
            raise PipelineError("invalid_spec" if spec.loss is not None else "dataset_mismatch", problem)
        job.loss = resolved
    return job.loss


def _train(
    job: Job,
    settings: FineTune,
    epochs: int,
    progress: _Progress,
    after_step: Callable[[int], None] | None,
    penalty: Callable[[], tf.Tensor] | None,
    distill: Distillation | None = None,
) -> list[float]:
    """``epochs`` of training on the train set (a regularisation or a fine-tuning phase); loss per epoch."""
    spec = job.spec
    assert job.train is not None and job.train.y is not None
    tick = time.perf_counter()
    progress.at(0)
    training = job.handle.supports_training(spec.signature)
    job.note(TRAINING_MODE_NOTE if training else INFERENCE_MODE_NOTE)
    loss_name, from_logits = loss_of(job)
    steps = epochs * steps_per_epoch(job, settings)
    seed = spec.seed + progress.done  # a second phase reshuffles differently
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
            None,
            None,
            loss=loss_name,
            from_logits=from_logits,
            epochs=epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            optimizer=settings.optimizer,
            seed=seed,
            training=training,
            after_step=step_hook,
            on_epoch=lambda epoch, loss: progress.at(min(steps, (epoch + 1) * steps // epochs)),
            lr_decay=settings.lr_schedule,
            penalty=penalty,
            distill=distill,
            batches=_batches(job, settings, seed, distill),
            augment=_augmenter(job),
        )
    except TrainingDiverged as exc:
        raise PipelineError("training_diverged", str(exc)) from exc
    progress.done += steps
    job.timings["fine_tune"] += time.perf_counter() - tick
    return history


# -- results -------------------------------------------------------------------------------------------------


def layer_rows(prunable: list[NamedVariable], pruner: PrunerLike) -> list[dict[str, Any]]:
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
