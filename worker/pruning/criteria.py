"""Pruning criteria: how important each weight is (higher score = keep).

Like Torch-Pruning's "importance" classes, a criterion is a small object with one scoring method; the pruner
receives it and never special-cases a particular criterion. Hooks a criterion needs (gradients today) are
declared on the base class as class variables so the caller can prepare them generically.

Adding a criterion = one class decorated with ``@register`` (its ``name`` is the spec's ``criterion`` value).
No TensorFlow here: scores are computed from NumPy arrays.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, TypeVar

import numpy as np

__all__ = ["CRITERIA", "Criterion", "Magnitude", "get_criterion", "register"]


class Criterion(ABC):
    """Scores every entry of one weight array; the caller turns scores into masks."""

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        # Kept on every criterion so stochastic ones (e.g. random) are reproducible from the spec's seed.
        self.seed = seed

    @abstractmethod
    def score(self, weight: np.ndarray, grad: np.ndarray | None = None) -> np.ndarray:
        """Return an array of ``weight``'s shape; higher means more important (kept longer)."""

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


@register
class Magnitude(Criterion):
    """|w|: small weights contribute least to the output (Han et al., 2015; tfmot's default)."""

    name = "magnitude"

    def score(self, weight: np.ndarray, grad: np.ndarray | None = None) -> np.ndarray:
        return np.abs(np.asarray(weight))


def get_criterion(name: str, seed: int = 0) -> Criterion:
    """Instantiate the registered criterion ``name``; unknown names list the known ones."""
    try:
        cls = CRITERIA[name]
    except KeyError:
        known = ", ".join(sorted(CRITERIA))
        raise ValueError(f"unknown criterion {name!r}; known criteria: {known}") from None
    return cls(seed=seed)
