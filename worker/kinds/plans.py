"""What a job that fans out into trials plans and what its aggregation returns (``worker.kinds.trial_rules``).

Apart from ``worker.kinds`` so that each kind's module can build them without importing the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Planned:
    """One trial to create: what it runs (``label``), its target if any, and its ``params`` (phase > 0)."""

    label: str
    target: float | None = None
    params: dict[str, Any] | None = None
    # Relative work: trials are sent heaviest first, so that the last one to start on a free worker is a short
    # one (K-fold's main run trains on the whole set, each fold on (k-1)/k of it).
    cost: float = 1.0


@dataclass(frozen=True)
class Aggregated:
    """The job's document from its trials; ``top``: the trial whose zip is the job's saved_model (None: the
    job keeps no model); ``top_listed``: that zip is also an artifact of its own name (a sweep's
    sparsity-0.90)."""

    document: dict[str, Any]
    top: int | None
    top_listed: bool = False


@dataclass(frozen=True)
class NextPhase:
    """The trials ended so far call for more (a sensitivity's suggestion run after its measurements)."""

    trials: list[Planned]
