"""Wall-clock latency of several callables measured side by side.

The callables are run alternately (a, b, a, b, ...) so that machine noise -- another process, frequency
scaling, a cache flush -- hits every candidate alike and their ratio stays meaningful on a busy worker.
Each callable must block until its result is ready (e.g. call ``.numpy()`` on a TensorFlow result).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

__all__ = ["interleaved_latency"]


def interleaved_latency(
    fns: dict[str, Callable[[], object]], runs: int = 20, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """``{name: {"p50", "p95", "mean"}}`` in ms over ``runs`` timed calls after ``warmup`` untimed ones."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):  # first calls trace functions and fill caches: not what users will see
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return {
        name: {
            "p50": float(np.percentile(times, 50)),
            "p95": float(np.percentile(times, 95)),
            "mean": float(np.mean(times)),
        }
        for name, times in samples.items()
    }
