"""Wall-clock latency of several callables measured side by side.

The callables are run alternately (a, b, a, b, ...) so that machine noise -- another process, frequency
scaling, a cache flush -- hits every candidate alike and their ratio stays meaningful on a busy worker.
Each callable must block until its result is ready (e.g. call ``.numpy()`` on a TensorFlow result).
All callables run in this one process and thread, so they share whatever thread settings the process has
(e.g. TensorFlow's intra/inter-op pools): this module cannot change them, and so cannot favour one candidate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["interleaved_latency", "latency_table"]


def interleaved_latency(
    fns: Mapping[str, Callable[[], object]], runs: int = 20, warmup: int = 2, batch_size: int | None = None
) -> dict[str, dict[str, float]]:
    """``{name: {"p50", "p95", "mean"}}`` in ms over ``runs`` timed calls after ``warmup`` untimed ones.

    With ``batch_size`` (samples per call) each entry also has ``samples_per_s`` = batch_size / mean latency:
    the throughput of back-to-back calls, i.e. total samples over total time (not 1 / p50, which would
    overstate it whenever slow calls occur).
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for _ in range(warmup):  # first calls trace functions and fill caches: not what users will see
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    result: dict[str, dict[str, float]] = {}
    for name, times in samples.items():
        mean = float(np.mean(times))
        stats = {
            "p50": float(np.percentile(times, 50)),
            "p95": float(np.percentile(times, 95)),
            "mean": mean,
        }
        if batch_size is not None:
            # A timer can read 0 for a trivial callable; infinite throughput is not a number JSON can hold.
            stats["samples_per_s"] = batch_size * 1000.0 / mean if mean > 0 else float("nan")
        result[name] = stats
    return result


def latency_table(
    fns_by_batch: Mapping[int, Mapping[str, Callable[[], object]]], runs: int = 20, warmup: int = 2
) -> dict[str, dict[str, dict[str, float]]]:
    """``{name: {str(batch): {"p50", "p95", "mean", "samples_per_s"}}}``: one interleaved run per batch size.

    ``fns_by_batch[batch]`` maps each candidate (e.g. ``"baseline"``, ``"pruned"``) to a call on ``batch``
    samples; candidates of one batch size are interleaved with each other. Batch sizes run in ascending order.
    The table is keyed by candidate first because the metrics document is (``baseline.latency_ms["32"]``).
    A candidate missing at some batch size simply has no entry for it. ``samples_per_s`` is NaN only if a mean
    latency reads 0 ms; ``json_safe`` turns that into null.
    """
    table: dict[str, dict[str, dict[str, float]]] = {}
    for batch in sorted(fns_by_batch):
        stats = interleaved_latency(fns_by_batch[batch], runs=runs, warmup=warmup, batch_size=batch)
        for name, row in stats.items():
            table.setdefault(name, {})[str(batch)] = row
    return table
