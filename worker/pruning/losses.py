"""Loss functions for fine-tuning and gradient criteria, in plain TensorFlow ops (no Keras objects).

Each loss returns the mean over the batch as a float32 scalar. Labels are reshaped to the prediction's shape
when they hold the same number of values, so ``y`` of shape (N,) against outputs (N, 1) never broadcasts into
an (N, N) matrix -- the classic silent bug. Probabilities are clipped to [1e-7, 1 - 1e-7] like Keras does.

``distill_fn`` is the matching knowledge-distillation term (Hinton et al. 2015): how far the pruned model's
outputs are from the dense model's on the same inputs, in the task's own terms -- KL divergence between
temperature-softened distributions for the cross-entropies, the regression loss itself for mse/mae.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from worker.evaluation.metrics import looks_like_probabilities, target_kind

__all__ = ["LOSSES", "LossFn", "distill_fn", "infer_loss", "loss_fn"]

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
_EPS = 1e-7


def _like(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """``y_true`` as float32 shaped like ``y_pred`` when the element counts agree (avoids broadcasting)."""
    y = tf.cast(y_true, tf.float32)
    if y.shape.rank is not None and y_pred.shape.rank is not None and y.shape.rank != y_pred.shape.rank:
        y = tf.reshape(y, tf.shape(y_pred))
    return y


def _sparse_ce(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool) -> tf.Tensor:
    labels = tf.cast(tf.reshape(y_true, tf.shape(y_pred)[:-1]), tf.int32)
    if from_logits:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=y_pred)
    probs = y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True)
    picked = tf.reduce_sum(tf.one_hot(labels, tf.shape(y_pred)[-1]) * probs, axis=-1)
    return -tf.math.log(tf.clip_by_value(picked, _EPS, 1.0 - _EPS))


def _categorical_ce(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool) -> tf.Tensor:
    y = _like(y_true, y_pred)
    if from_logits:
        return tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=y_pred)
    probs = tf.clip_by_value(y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True), _EPS, 1.0 - _EPS)
    return -tf.reduce_sum(y * tf.math.log(probs), axis=-1)


def _binary_ce(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool) -> tf.Tensor:
    y = _like(y_true, y_pred)
    if from_logits:
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=y_pred)
    p = tf.clip_by_value(y_pred, _EPS, 1.0 - _EPS)
    return -(y * tf.math.log(p) + (1.0 - y) * tf.math.log(1.0 - p))


def _mse(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool) -> tf.Tensor:
    return tf.math.squared_difference(_like(y_true, y_pred), y_pred)


def _mae(y_true: tf.Tensor, y_pred: tf.Tensor, from_logits: bool) -> tf.Tensor:
    return tf.abs(_like(y_true, y_pred) - y_pred)


# name -> elementwise-or-per-sample loss; loss_fn averages whatever is left to one scalar.
LOSSES: dict[str, Callable[[tf.Tensor, tf.Tensor, bool], tf.Tensor]] = {
    "sparse_categorical_crossentropy": _sparse_ce,
    "categorical_crossentropy": _categorical_ce,
    "binary_crossentropy": _binary_ce,
    "mse": _mse,
    "mae": _mae,
}


def loss_fn(name: str, from_logits: bool) -> LossFn:
    """``(y_true, y_pred) -> scalar``: mean over the batch (and over output units for elementwise losses)."""
    try:
        per_item = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None

    def compute(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_pred = tf.cast(y_pred, tf.float32)
        return tf.reduce_mean(per_item(tf.convert_to_tensor(y_true), y_pred, from_logits))

    compute.__name__ = name
    return compute


def _log_probs(output: tf.Tensor, from_logits: bool) -> tf.Tensor:
    """Logits as they are; probabilities as clipped log-probabilities (the logits up to a per-row constant,
    which softmax ignores), so softened distributions can be formed from either kind of output."""
    if from_logits:
        return output
    probs = output / tf.reduce_sum(output, axis=-1, keepdims=True)
    return tf.math.log(tf.clip_by_value(probs, _EPS, 1.0))


def _softmax_kl(teacher: tf.Tensor, student: tf.Tensor, from_logits: bool, temperature: float) -> tf.Tensor:
    t = tf.nn.log_softmax(_log_probs(teacher, from_logits) / temperature, axis=-1)
    s = tf.nn.log_softmax(_log_probs(student, from_logits) / temperature, axis=-1)
    return tf.reduce_sum(tf.exp(t) * (t - s), axis=-1)


def _bernoulli_kl(teacher: tf.Tensor, student: tf.Tensor, from_logits: bool, temperature: float) -> tf.Tensor:
    """Every unit as a two-class softmax over logits ``[0, z]``: ``sigmoid(z / T)`` is its softened probability."""

    def logit(z: tf.Tensor) -> tf.Tensor:
        if from_logits:
            return z
        p = tf.clip_by_value(z, _EPS, 1.0 - _EPS)
        return tf.math.log(p) - tf.math.log(1.0 - p)

    pair = lambda z: tf.stack([tf.zeros_like(z), logit(z)], axis=-1)  # noqa: E731
    return _softmax_kl(pair(teacher), pair(student), True, temperature)


_DISTILL: dict[str, Callable[[tf.Tensor, tf.Tensor, bool, float], tf.Tensor]] = {
    "sparse_categorical_crossentropy": _softmax_kl,
    "categorical_crossentropy": _softmax_kl,
    "binary_crossentropy": _bernoulli_kl,
    "mse": lambda teacher, student, from_logits, temperature: tf.math.squared_difference(teacher, student),
    "mae": lambda teacher, student, from_logits, temperature: tf.abs(teacher - student),
}


def distill_fn(name: str, from_logits: bool, temperature: float) -> LossFn:
    """``(teacher_output, student_output) -> scalar``: the distillation term for task loss ``name``.

    Cross-entropies: ``T**2 * KL(softmax(t / T) || softmax(s / T))`` per sample (sigmoid units as two-class
    softmaxes), averaged -- the ``T**2`` keeps its gradients on the scale of the task loss as ``T`` grows, so
    one mixing weight serves every temperature. Regression losses ignore ``temperature`` and compare the
    outputs with the task loss itself (mse/mae to the dense model's predictions).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    try:
        per_item = _DISTILL[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None
    scale = 1.0 if name in ("mse", "mae") else temperature**2

    def compute(teacher: tf.Tensor, student: tf.Tensor) -> tf.Tensor:
        student = tf.cast(student, tf.float32)
        teacher = tf.reshape(tf.cast(teacher, tf.float32), tf.shape(student))
        return scale * tf.reduce_mean(per_item(teacher, student, from_logits, temperature))

    compute.__name__ = f"distill_{name}"
    return compute


_LOSS_FOR_KIND: dict[str, str] = {
    "sparse": "sparse_categorical_crossentropy",
    "onehot": "categorical_crossentropy",
    "binary": "binary_crossentropy",
    "multilabel": "binary_crossentropy",
    "regression": "mse",
}


def infer_loss(y: np.ndarray, output_sample: np.ndarray) -> tuple[str, bool]:
    """``(loss name, from_logits)`` guessed from the labels and a sample of model outputs.

    Integer labels with a multi-unit output -> sparse CE; one-hot ``y`` shaped like the output -> categorical
    CE; 0/1 targets with a single-unit output (or multi-hot rows) -> binary CE; anything else -> mse.
    ``from_logits`` is False only when outputs look like probabilities (all in [0, 1] and, for softmax-style
    losses, rows summing to ~1); it is always False for regression.
    """
    kind = target_kind(y, output_sample)
    name = _LOSS_FOR_KIND[kind]
    if kind == "regression":
        return name, False
    need_rows_sum_to_one = kind in ("sparse", "onehot")
    return name, not looks_like_probabilities(output_sample, rows_sum_to_one=need_rows_sum_to_one)
