"""Fine-tuning plain ``tf.Variable``s through any forward function (e.g. a restored SavedModel signature).

Why not Keras ``fit``: a restored SavedModel gives plain variables and concrete functions, no Keras model and
no optimizer, so the optimizers are written here in a few TensorFlow ops (``OPTIMIZERS`` table):
- ``sgd``: ``w -= lr * g``
- ``momentum``: Keras-style heavy ball, ``v = 0.9 v - lr * g; w += v``
- ``adam``: Kingma & Ba with bias correction, beta1 0.9, beta2 0.999, epsilon 1e-7 (Keras' formulation).

The learning rate follows a cosine decay by default (``lr_k = lr * (1 + cos(pi * k / total)) / 2`` for
step ``k`` of ``total``): large steps first to move off the pruning damage, small ones at the end to settle
with the final masks. ``lr_decay="constant"`` keeps it flat.

Step counting: ``after_step(k)`` is called after the k-th optimizer step (k = 1, 2, ...), matching the
schedules' "steps already taken". The pipeline re-applies masks there; whatever it raises propagates
(cancellation). The full batches share one trace of the train step; a last partial batch costs one more.

``penalty`` (regularisation-driven criteria ``l1``/``l2``, see ``regularization.py``) is a zero-argument
callable traced into the same compiled step and added to the batch loss before differentiating; the returned
history is the data loss alone, so runs with and without a penalty compare on the task's loss.

``distill`` (``Distillation``): the dense model's outputs on every train sample, computed once before pruning,
become soft targets: the objective is ``(1 - alpha) * task + alpha * distill_fn(teacher, student)``
(``losses.distill_fn``). Why: a pruned network recovering on a small train set overfits the hard labels the
dense model already fits perfectly; the dense model's full output distribution carries more information per
sample ("dark knowledge") and pulls the pruned model back toward the function it replaces. Precomputed
outputs cost one inference pass and ``n x output size`` floats, and no second model in the training step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from worker.pruning.losses import distill_fn, loss_fn

__all__ = [
    "OPTIMIZERS",
    "Batches",
    "Distillation",
    "TrainingDiverged",
    "array_batches",
    "count_steps",
    "fine_tune",
    "learning_rate_at",
]

Forward = Callable[[dict[str, tf.Tensor], bool], tf.Tensor]
LrDecay = Literal["constant", "cosine"]


class TrainingDiverged(ArithmeticError):
    """Raised when a batch loss becomes NaN or infinite: the learning rate is too high for this model."""


@dataclass(frozen=True)
class Distillation:
    """Soft targets from the dense model: ``teacher[i]`` is its output for train sample ``i`` (in-memory
    train sets), or ``teacher_fn(x)`` its output on a batch, computed on the fly by a second, unpruned copy
    (streamed train sets: ``n x outputs`` precomputed floats would grow with the dataset).

    ``alpha`` weighs the distillation term against the task loss (0 = labels only, 1 = teacher only);
    ``temperature`` softens both distributions (classification losses only).
    """

    teacher: np.ndarray | None
    alpha: float = 0.5
    temperature: float = 2.0
    teacher_fn: Callable[[dict[str, Any]], tf.Tensor] | None = None


Batch = tuple[dict[str, Any], Any, Any]  # inputs, labels, teacher outputs (None: computed by teacher_fn)


@dataclass(frozen=True)
class Batches:
    """Where the training batches of each epoch come from: ``epoch(i)`` yields ``steps_per_epoch`` batches.

    ``array_batches`` shuffles in-memory arrays; a streamed train set (``worker.stages.feed``) reads shards
    through a bounded shuffle buffer. ``fine_tune`` treats both alike."""

    steps_per_epoch: int
    epoch: Callable[[int], Iterator[Batch]]


def array_batches(
    x: dict[str, np.ndarray],
    y: np.ndarray,
    batch_size: int,
    seed: int,
    teacher: np.ndarray | None = None,
    max_samples: int | None = None,
    steps_per_epoch: int | None = None,
) -> Batches:
    """Batches of a permutation of the arrays, reshuffled every epoch from ``seed``; ``max_samples`` (a
    different seeded subset each epoch) and ``steps_per_epoch`` cap an epoch (the permutation wraps around
    when more steps than batches are asked)."""
    n = len(y)
    lengths = {name: len(arr) for name, arr in x.items()}
    if any(length != n for length in lengths.values()):
        raise ValueError(f"inputs and labels differ in length: {lengths} vs {n} labels")
    if n == 0 or batch_size < 1:
        raise ValueError("need samples and batch_size >= 1")
    per_epoch = n if max_samples is None else min(n, max_samples)
    steps = steps_per_epoch or math.ceil(per_epoch / batch_size)
    rng = np.random.default_rng(seed)

    def epoch(_: int) -> Iterator[Batch]:
        order = rng.permutation(n)[:per_epoch]
        if steps * batch_size > len(order) and steps_per_epoch is not None:
            order = np.resize(order, steps * batch_size)  # wrap around: the asked number of steps
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            yield (
                {k: tf.constant(v[idx]) for k, v in x.items()},
                tf.constant(y[idx]),
                None if teacher is None else tf.constant(teacher[idx]),
            )

    return Batches(steps, epoch)


class _Optimizer(ABC):
    """Slots are created eagerly here, before the train step is traced (no variable creation in graphs)."""

    def __init__(self, variables: Sequence[tf.Variable]) -> None:
        self.variables = list(variables)

    def _slots(self) -> list[tf.Variable]:
        return [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]

    @abstractmethod
    def apply(self, grads: Sequence[tf.Tensor | None], lr: tf.Tensor) -> None:
        """One update of every variable that received a gradient (graph-mode safe)."""


class _SGD(_Optimizer):
    def apply(self, grads: Sequence[tf.Tensor | None], lr: tf.Tensor) -> None:
        for var, grad in zip(self.variables, grads, strict=True):
            if grad is not None:
                var.assign_sub(tf.cast(lr, var.dtype) * tf.cast(grad, var.dtype))


class _Momentum(_Optimizer):
    momentum = 0.9

    def __init__(self, variables: Sequence[tf.Variable]) -> None:
        super().__init__(variables)
        self.velocity = self._slots()

    def apply(self, grads: Sequence[tf.Tensor | None], lr: tf.Tensor) -> None:
        for var, vel, grad in zip(self.variables, self.velocity, grads, strict=True):
            if grad is not None:
                vel.assign(self.momentum * vel - tf.cast(lr, var.dtype) * tf.cast(grad, var.dtype))
                var.assign_add(vel)


class _Adam(_Optimizer):
    beta1, beta2, epsilon = 0.9, 0.999, 1e-7

    def __init__(self, variables: Sequence[tf.Variable]) -> None:
        super().__init__(variables)
        self.m = self._slots()
        self.v = self._slots()
        self.t = tf.Variable(0.0, dtype=tf.float32, trainable=False)

    def apply(self, grads: Sequence[tf.Tensor | None], lr: tf.Tensor) -> None:
        t = self.t.assign_add(1.0)
        # Bias correction folded into the step size, as Keras does: alpha = lr * sqrt(1 - b2^t) / (1 - b1^t).
        alpha = lr * tf.sqrt(1.0 - tf.pow(self.beta2, t)) / (1.0 - tf.pow(self.beta1, t))
        for var, m, v, grad in zip(self.variables, self.m, self.v, grads, strict=True):
            if grad is None:
                continue
            g = tf.cast(grad, var.dtype)
            m.assign_add((1.0 - self.beta1) * (g - m))
            v.assign_add((1.0 - self.beta2) * (tf.square(g) - v))
            var.assign_sub(tf.cast(alpha, var.dtype) * m / (tf.sqrt(v) + self.epsilon))


OPTIMIZERS: dict[str, type[_Optimizer]] = {"sgd": _SGD, "momentum": _Momentum, "adam": _Adam}


def count_steps(n_samples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps ``fine_tune`` will take (the last partial batch is kept): for building schedules."""
    return epochs * math.ceil(n_samples / batch_size)


def learning_rate_at(step: int, total_steps: int, base: float, decay: LrDecay = "cosine") -> float:
    """Learning rate for the optimizer step taken after ``step`` steps (0-based) out of ``total_steps``."""
    if decay == "constant" or total_steps <= 0:
        return base
    if decay == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    raise ValueError(f"unknown learning-rate decay {decay!r}; known: constant, cosine")


def fine_tune(
    forward: Forward,
    variables: list[tf.Variable],
    x: dict[str, np.ndarray] | None,
    y: np.ndarray | None,
    *,
    loss: str,
    from_logits: bool,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str,
    seed: int,
    training: bool = False,
    after_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    lr_decay: LrDecay = "cosine",
    penalty: Callable[[], tf.Tensor] | None = None,
    distill: Distillation | None = None,
    batches: Batches | None = None,
    augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[float]:
    """Train ``variables`` to lower ``loss(y, forward(x, training)) [+ penalty()]`` (mixed with the
    distillation term when ``distill`` is given); returns each epoch's mean batch task loss (labels only:
    without the penalty or the distillation term, so runs with and without them compare).

    ``x`` arrays must already have the dtypes ``forward`` expects. Batches are reshuffled every epoch from
    ``seed`` (and TensorFlow's global seed is set from it, so dropout in training mode is reproducible).
    ``on_epoch(epoch, mean_loss)`` receives the 0-based epoch index. ``batches`` replaces ``x``/``y`` (a
    streamed train set); ``augment`` maps each batch's inputs before the step (training batches only).
    """
    if batches is None:
        if x is None or y is None:
            raise ValueError("give x and y, or batches")
        teacher = None if distill is None else distill.teacher
        if teacher is not None and len(teacher) != len(y):
            raise ValueError(f"teacher outputs for {len(teacher)} samples, but {len(y)} train samples")
        batches = array_batches(x, y, batch_size, seed, teacher)
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError("need samples, epochs >= 1, batch_size >= 1 and learning_rate > 0")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    if not variables:
        raise ValueError("no variables to fine-tune")
    if distill is not None:
        if distill.teacher is None and distill.teacher_fn is None:
            raise ValueError("distillation needs teacher outputs or a teacher function")
        if not 0.0 <= distill.alpha <= 1.0:
            raise ValueError(f"distillation alpha must be within [0, 1], got {distill.alpha!r}")

    compute_loss = loss_fn(loss, from_logits)
    soft = None if distill is None else distill_fn(loss, from_logits, distill.temperature)
    alpha = 0.0 if distill is None else float(distill.alpha)
    opt = OPTIMIZERS[optimizer](variables)

    @tf.function
    def train_step(
        xb: dict[str, tf.Tensor], yb: tf.Tensor, tb: tf.Tensor, lr: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(variables)  # restored variables may be flagged non-trainable
            out = forward(xb, training)
            data = compute_loss(yb, out)
            objective = data if soft is None else (1.0 - alpha) * data + alpha * soft(tb, out)
            total = objective if penalty is None else objective + tf.cast(penalty(), objective.dtype)
        grads = tape.gradient(total, variables, unconnected_gradients=tf.UnconnectedGradients.NONE)
        if all(g is None for g in grads):
            raise ValueError("the loss does not depend on any of the variables being fine-tuned")
        opt.apply([None if g is None else tf.convert_to_tensor(g) for g in grads], lr)
        return data, total

    tf.random.set_seed(seed)
    total = epochs * batches.steps_per_epoch
    history: list[float] = []
    step = 0
    for epoch in range(epochs):
        loss_sum, seen = 0.0, 0
        for xb, yb, tb in batches.epoch(epoch):
            lr = tf.constant(learning_rate_at(step, total, learning_rate, lr_decay), tf.float32)
            if augment is not None:
                xb = augment(xb)
            if distill is not None and tb is None:
                assert distill.teacher_fn is not None
                tb = distill.teacher_fn(xb)
            data, total_loss = train_step(xb, yb, yb if tb is None else tb, lr)  # tb unused without distill
            value = float(data)
            if not (math.isfinite(value) and math.isfinite(float(total_loss))):
                raise TrainingDiverged(
                    f"fine-tuning diverged at step {step + 1} (loss {value}, with penalty "
                    f"{float(total_loss)}): lower the learning_rate"
                    + ("" if penalty is None else " or the regularization strength")
                )
            size = int(tf.shape(yb)[0])
            loss_sum += value * size
            seen += size
            step += 1
            if after_step is not None:
                after_step(step)
        history.append(loss_sum / max(1, seen))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history
