"""Pruning schedules: pure callables ``step -> (should_prune, sparsity)`` whose config round-trips (tfmot).

``step`` counts optimizer steps already taken: 0 is "before fine-tuning starts", and ``fine_tune`` reports
step ``k`` to its ``after_step`` hook after the k-th optimizer step. A schedule holds no state, so the same
schedule can be asked about any step in any order, and ``Schedule.from_config(s.get_config())`` rebuilds
an equal one.

Sparsities are in whatever unit the schedule was built with; ``build_schedule`` builds them in absolute
sparsity (``final_sparsity == target_sparsity``), so the caller prunes at ``sparsity / target_sparsity`` of
each variable's target. Kinds are looked up in ``SCHEDULES`` (the spec's ``schedule.kind``), not in
isinstance chains.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

__all__ = [
    "AUTO_MASK_UPDATES",
    "SCHEDULES",
    "OneShot",
    "PolynomialDecay",
    "Schedule",
    "auto_frequency",
    "build_schedule",
]

# A polynomial schedule without a ``frequency`` updates the masks at most this many times over its ramp.
AUTO_MASK_UPDATES = 100


class Schedule(ABC):
    """Decides at which steps masks are recomputed and at which sparsity."""

    kind: ClassVar[str]

    @abstractmethod
    def __call__(self, step: int) -> tuple[bool, float]:
        """``(should_prune, sparsity)`` at ``step``; the sparsity is meaningful even when not pruning."""

    @abstractmethod
    def _params(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this schedule."""

    @classmethod
    @abstractmethod
    def from_spec(
        cls, spec_schedule: Mapping[str, Any], target_sparsity: float, total_steps: int
    ) -> Schedule:
        """Build from the spec's ``schedule`` object (see ``build_schedule``)."""

    def get_config(self) -> dict[str, Any]:
        """JSON-ready description: ``{"kind": ..., **constructor kwargs}``."""
        return {"kind": self.kind, **self._params()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        """Rebuild any registered schedule from ``get_config()`` output (dispatches on ``kind``)."""
        params = dict(config)
        kind = params.pop("kind", None)
        try:
            target = SCHEDULES[str(kind)]
        except KeyError:
            raise ValueError(
                f"unknown schedule kind {kind!r}; known kinds: {', '.join(sorted(SCHEDULES))}"
            ) from None
        if cls is not Schedule and not issubclass(target, cls):
            raise ValueError(f"config of kind {kind!r} does not describe a {cls.__name__}")
        return target(**params)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Schedule)
            and type(other) is type(self)
            and self.get_config() == other.get_config()
        )

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.get_config().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"


SCHEDULES: dict[str, type[Schedule]] = {}

_S = TypeVar("_S", bound=type[Schedule])


def register(cls: _S) -> _S:
    """Class decorator adding a schedule to ``SCHEDULES`` under its ``kind``."""
    if cls.kind in SCHEDULES:
        raise ValueError(f"schedule kind {cls.kind!r} is already registered")
    SCHEDULES[cls.kind] = cls
    return cls


@register
class OneShot(Schedule):
    """Prune once, at step 0, straight to the final sparsity (then fine-tuning only recovers accuracy).

    ``final_sparsity`` defaults to 1.0, which reads as "the whole target" when sparsities are expressed as a
    fraction of the target; ``build_schedule`` passes the absolute target instead.
    """

    kind = "one_shot"

    def __init__(self, final_sparsity: float = 1.0) -> None:
        _check_sparsity("final_sparsity", final_sparsity)
        self.final_sparsity = float(final_sparsity)

    def __call__(self, step: int) -> tuple[bool, float]:
        return step == 0, self.final_sparsity

    @classmethod
    def from_spec(cls, spec_schedule: Mapping[str, Any], target_sparsity: float, total_steps: int) -> OneShot:
        return cls(final_sparsity=target_sparsity)

    def _params(self) -> dict[str, Any]:
        return {"final_sparsity": self.final_sparsity}


@register
class PolynomialDecay(Schedule):
    """Zhu & Gupta (2017) gradual pruning: ``s_t = s_f + (s_i - s_f) * (1 - p) ** power``, p in [0, 1].

    Masks are updated at ``begin_step``, every ``frequency`` steps after it, and at ``end_step`` itself even
    when it is not on the frequency grid -- so a run shorter than ``frequency`` still reaches the final
    sparsity (tfmot only prunes on the grid and can stop short). Before ``begin_step`` the sparsity reads
    ``initial_sparsity``; after ``end_step`` it reads ``final_sparsity`` and no more updates are asked for.
    ``power=3`` prunes fast while the network has redundancy and slowly near the end.
    """

    kind = "polynomial"

    def __init__(
        self,
        initial_sparsity: float,
        final_sparsity: float,
        begin_step: int,
        end_step: int,
        power: float = 3,
        frequency: int = 10,
    ) -> None:
        _check_sparsity("initial_sparsity", initial_sparsity)
        _check_sparsity("final_sparsity", final_sparsity)
        if initial_sparsity > final_sparsity:
            raise ValueError("initial_sparsity must not exceed final_sparsity")
        if begin_step < 0 or end_step < begin_step:
            raise ValueError(f"need 0 <= begin_step <= end_step, got {begin_step} and {end_step}")
        if not power > 0:
            raise ValueError(f"power must be positive, got {power!r}")
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency!r}")
        self.initial_sparsity = float(initial_sparsity)
        self.final_sparsity = float(final_sparsity)
        self.begin_step = int(begin_step)
        self.end_step = int(end_step)
        self.power = float(power)
        self.frequency = int(frequency)

    def __call__(self, step: int) -> tuple[bool, float]:
        in_range = self.begin_step <= step <= self.end_step
        on_grid = (step - self.begin_step) % self.frequency == 0 or step == self.end_step
        return in_range and on_grid, self.sparsity_at(step)

    def sparsity_at(self, step: int) -> float:
        """The curve itself, without the update-frequency logic."""
        if step >= self.end_step:
            return self.final_sparsity
        if step <= self.begin_step:
            return self.initial_sparsity
        progress = (step - self.begin_step) / (self.end_step - self.begin_step)
        return (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.power
        )

    @classmethod
    def from_spec(
        cls, spec_schedule: Mapping[str, Any], target_sparsity: float, total_steps: int
    ) -> PolynomialDecay:
        """Ramp from step 0 to ``ceil(end_fraction * total_steps)`` (clamped to [1, total_steps]); the
        remaining steps recover accuracy at the final sparsity. No ``frequency`` (or null): ``auto_frequency``."""
        end_fraction = float(spec_schedule.get("end_fraction", 0.75))
        end_step = min(total_steps, max(1, math.ceil(end_fraction * total_steps)))
        frequency = spec_schedule.get("frequency")
        return cls(
            initial_sparsity=float(spec_schedule.get("initial_sparsity", 0.0)),
            final_sparsity=target_sparsity,
            begin_step=0,
            end_step=end_step,
            power=float(spec_schedule.get("power", 3.0)),
            frequency=auto_frequency(end_step) if frequency is None else int(frequency),
        )

    def _params(self) -> dict[str, Any]:
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
            "frequency": self.frequency,
        }


def auto_frequency(ramp_steps: int) -> int:
    """Steps between mask updates giving at most ``AUTO_MASK_UPDATES`` (and more than half as many) updates
    over a ramp of ``ramp_steps``: every step when the ramp is that short.

    Why not a fixed count of steps: a short fine-tuning run (3 epochs of 1347 samples: a 97-step ramp) pruned
    every 10 steps removes a tenth of the remaining weights at a time, too abruptly to recover from (digits CNN,
    layer scope, 90%, 3 epochs: 0.63 -> 0.78 test accuracy with every step; see README), while a long run
    updated every step would re-rank all weights thousands of times for no gain. About 100 smooth steps are
    what the ramp needs, whatever its length.
    """
    return max(1, math.ceil(ramp_steps / AUTO_MASK_UPDATES))


def build_schedule(spec_schedule: Mapping[str, Any], target_sparsity: float, total_steps: int) -> Schedule:
    """The schedule for a spec's ``schedule`` (``PruneSpec.schedule.model_dump()``), in absolute sparsity.

    ``total_steps`` is the number of optimizer steps fine-tuning will take (0 without fine-tuning).
    """
    kind = spec_schedule.get("kind", "one_shot")
    try:
        cls = SCHEDULES[str(kind)]
    except KeyError:
        raise ValueError(
            f"unknown schedule kind {kind!r}; known kinds: {', '.join(sorted(SCHEDULES))}"
        ) from None
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    return cls.from_spec(spec_schedule, target_sparsity, total_steps)


def _check_sparsity(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value!r}")
