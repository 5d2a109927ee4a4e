"""Pruning criteria: how important each weight is (higher score = keep).

Like Torch-Pruning's "importance" classes, a criterion is a small object with one scoring method; the pruner
receives it and never special-cases a particular criterion. What a criterion needs from the caller is declared
on the base class as class variables, so the caller prepares it generically:

- ``needs_gradients``: pass ``grads`` to ``Pruner.prune`` -- a ``GradientStats`` per variable, computed by
  ``gradients.accumulate_gradients`` over train batches (a plain gradient array is accepted too and read as
  one batch's gradient).
- ``regularizer``: ``"l1"`` or ``"l2"``: fine-tune with ``Pruner.penalty(strength)`` added to the loss before
  pruning (regularisation-driven pruning); the scores themselves are magnitudes.
- ``uses_name``: ``score`` is called with ``name=<variable name>`` (random streams per variable). Off by
  default, so criteria written against ``score(weight, grad)`` keep working unchanged.
- ``calibration``: ``"input_norms"`` or ``"hessian"``: scored from the inputs each weight's op receives on
  calibration samples (``worker.pruning.calibration``; the stage ``worker.stages.calibration`` collects them
  and passes them as ``Pruner.prune(calibration=...)``, one statistics object per variable). A variable
  without statistics (its op has no calibration rule) is scored by magnitude and reported so.
- ``layer_scores``: how scores are compared inside one variable when it is ranked alone (layer scope, fixed
  targets, N:M): identity by default; Wanda compares within each output unit.
- ``group_reduce``: how element scores of one coupled channel (all its members' slices, ``groups.py``)
  combine into the channel's score: ``"l2"`` (root of the summed squares: the L2 norm of the channel's
  weights, for magnitude-like criteria), ``"sum"`` (additive estimates: Taylor's loss change of removing
  every weight of the channel, summed gradients) or ``"mean"`` (random: stays uniform whatever the size).

Registered criteria (the spec's ``criterion``):

- ``magnitude``: ``|w|``.
- ``gradient``: mean over batches of ``|dL/dw|`` -- how strongly the loss reacts to the weight.
- ``taylor``: mean over batches of ``|w * dL/dw|``, the first-order Taylor estimate of the loss change when
  ``w`` is set to zero (Molchanov et al. 2017; SNIP's connection sensitivity, Lee et al. 2019).
- ``random``: uniform scores from ``(seed, variable name)``: the baseline a real criterion must beat.
- ``l1`` / ``l2``: magnitude after an L1 (``sum |w|``) or L2 fine-tuning phase; for structured granularities
  L2 becomes group lasso (``regularization.py``).
- ``wanda``: ``|w| * ||x||`` with ``x`` the input feature the weight multiplies, compared within each output
  unit (Sun et al. 2024; ``calibration/wanda.py``).
- ``sparsegpt``: the mask SparseGPT chose while updating the remaining weights (Frantar & Alistarh 2023;
  ``calibration/sparsegpt.py``): kept weights score above every removed one, so the pruner's mask is its.

Adding a criterion = one class decorated with ``@register`` (its ``name`` is the spec's ``criterion`` value)
and its row in ``app.schemas.vocabulary.CRITERIA`` (``tests/test_vocabularies.py`` checks both agree).
No TensorFlow here: scores are computed from NumPy arrays (the calibration statistics arrive computed).
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

import numpy as np

from worker.pruning.calibration.sparsegpt import ObsResult
from worker.pruning.calibration.wanda import InputNorms, per_output_ranks, wanda_scores

__all__ = [
    "CRITERIA",
    "L1",
    "L2",
    "Calibration",
    "Criterion",
    "Gradient",
    "GradientStats",
    "GroupReduce",
    "Magnitude",
    "Random",
    "Regularizer",
    "SparseGPT",
    "Taylor",
    "Wanda",
    "get_criterion",
    "register",
]

Regularizer = Literal["l1", "l2"]
Calibration = Literal["input_norms", "hessian"]
GroupReduce = Literal["l2", "sum", "mean"]


@dataclass(frozen=True)
class GradientStats:
    """Per-variable gradient statistics over train batches (same shape as the variable).

    ``abs_grad`` = mean of ``|dL/dw|`` and ``abs_taylor`` = mean of ``|w * dL/dw|``, each batch weighted by its
    number of samples (``L`` is the batch's mean loss). ``connected`` is False when the loss does not depend on
    the variable at all (e.g. the head of another output): its scores are then all zero and meaningless.
    """

    abs_grad: np.ndarray
    abs_taylor: np.ndarray
    batches: int
    samples: int
    connected: bool = True


GradInput = GradientStats | np.ndarray


class Criterion(ABC):
    """Scores every entry of one weight array; the caller turns scores into masks."""

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False
    regularizer: ClassVar[Regularizer | None] = None
    uses_name: ClassVar[bool] = False
    group_reduce: ClassVar[GroupReduce] = "sum"
    calibration: ClassVar[Calibration | None] = None
    # True when the criterion's statistics already fix each variable's mask at a per-variable target (SparseGPT:
    # the mask comes with the weight updates). Global scope then allocates the per-variable targets from the
    # magnitude ranking (``Pruner.layer_targets``) and prunes each variable at its own, instead of pooling
    # these scores (which only say kept / removed).
    per_layer_masks: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        # Kept on every criterion so stochastic ones (e.g. random) are reproducible from the spec's seed.
        self.seed = seed

    @property
    def needs_train_data(self) -> bool:
        """Whether the criterion cannot run without a labelled train dataset."""
        return self.needs_gradients or self.regularizer is not None

    @property
    def needs_calibration(self) -> bool:
        """Whether ``score`` reads calibration statistics (``calibration``) instead of gradients."""
        return self.calibration is not None

    def layer_scores(self, score: np.ndarray, stats: object | None) -> np.ndarray:
        """``score`` as compared within one variable ranked alone; ``stats`` = what ``score`` was given."""
        return score

    @abstractmethod
    def score(self, weight: np.ndarray, grad: GradInput | None = None, *, name: str = "") -> np.ndarray:
        """Return an array of ``weight``'s shape; higher means more important (kept longer).

        ``name`` (passed only when ``uses_name``) is the variable's name: criteria that draw random numbers
        derive their stream from it, so a variable's scores do not depend on which others are pruned with it.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


CRITERIA: dict[str, type[Criterion]] = {}

_C = TypeVar("_C", bound=type[Criterion])


def register(cls: _C) -> _C:
    """Class decorator adding a criterion to ``CRITERIA`` under its ``name`` (names must be unique)."""
    if cls.name in CRITERIA:
        raise ValueError(f"criterion {cls.name!r} is already registered by {CRITERIA[cls.name].__name__}")
    CRITERIA[cls.name] = cls
    return cls


def _require(grad: GradInput | None, criterion: str) -> GradInput:
    if grad is None:
        raise ValueError(f"criterion {criterion!r} needs gradients (gradients.accumulate_gradients)")
    return grad


@register
class Magnitude(Criterion):
    """|w|: small weights contribute least to the output (Han et al., 2015; tfmot's default)."""

    name = "magnitude"
    group_reduce = "l2"

    def score(self, weight: np.ndarray, grad: GradInput | None = None, *, name: str = "") -> np.ndarray:
        return np.abs(np.asarray(weight))


@register
class Gradient(Criterion):
    """Mean |dL/dw| over batches: weights the loss is insensitive to go first, whatever their size."""

    name = "gradient"
    needs_gradients = True

    def score(self, weight: np.ndarray, grad: GradInput | None = None, *, name: str = "") -> np.ndarray:
        grad = _require(grad, self.name)
        if isinstance(grad, GradientStats):
            return np.asarray(grad.abs_grad)
        return np.abs(np.asarray(grad))


@register
class Taylor(Criterion):
    """Mean |w * dL/dw| over batches: first-order estimate of the loss change caused by zeroing w."""

    name = "taylor"
    needs_gradients = True

    def score(self, weight: np.ndarray, grad: GradInput | None = None, *, name: str = "") -> np.ndarray:
        grad = _require(grad, self.name)
        if isinstance(grad, GradientStats):
            return np.asarray(grad.abs_taylor)
        return np.abs(np.asarray(weight) * np.asarray(grad))


@register
class Random(Criterion):
    """Uniform [0, 1) scores from ``(seed, crc32(name))``: reproducible across processes (no salted hash)."""

    name = "random"
    uses_name = True
    group_reduce = "mean"

    def score(self, weight: np.ndarray, grad: GradInput | None = None, *, name: str = "") -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode("utf-8"))])
        return rng.random(np.shape(weight))


@register
class L1(Magnitude):
    """Magnitude after fine-tuning with ``strength * sum |w|``: L1 drives unneeded weights to zero first."""

    name = "l1"
    regularizer = "l1"


@register
class L2(Magnitude):
    """Magnitude after fine-tuning with an L2 penalty (group lasso for channel/block granularities)."""

    name = "l2"
    regularizer = "l2"


@register
class Wanda(Criterion):
    """|w| * ||x||: weights on inputs that are large on real data matter more (``calibration/wanda.py``)."""

    name = "wanda"
    calibration = "input_norms"
    group_reduce = "l2"

    def score(self, weight: np.ndarray, grad: object | None = None, *, name: str = "") -> np.ndarray:
        if isinstance(grad, InputNorms):
            return wanda_scores(weight, grad)
        return np.abs(np.asarray(weight))  # no statistics for this variable: magnitude (reported)

    def layer_scores(self, score: np.ndarray, stats: object | None) -> np.ndarray:
        return per_output_ranks(score, stats.row_axes) if isinstance(stats, InputNorms) else score


@register
class SparseGPT(Criterion):
    """The keep-mask SparseGPT chose (``calibration/sparsegpt.py``; the stage already wrote its updated
    weights): kept entries score ``1 + |w|``, removed ones 0, so every granularity mask reproduces it."""

    name = "sparsegpt"
    calibration = "hessian"
    per_layer_masks = True
    group_reduce = "l2"

    def score(self, weight: np.ndarray, grad: object | None = None, *, name: str = "") -> np.ndarray:
        magnitude = np.abs(np.asarray(weight))
        if not isinstance(grad, ObsResult):
            return magnitude  # SparseGPT could not handle this variable: magnitude (reported)
        return np.where(grad.keep, 1.0 + magnitude.astype(np.float64), 0.0)


def get_criterion(name: str, seed: int = 0) -> Criterion:
    """Instantiate the registered criterion ``name``; unknown names list the known ones."""
    try:
        cls = CRITERIA[name]
    except KeyError:
        known = ", ".join(sorted(CRITERIA))
        raise ValueError(f"unknown criterion {name!r}; known criteria: {known}") from None
    return cls(seed=seed)
