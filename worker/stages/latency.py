"""Latency of the original and the pruned model, interleaved per batch size and bounded by a time budget.

Why a budget: ``runs`` calls per model per batch size is cheap on a small model and ruinous on a big one (a
ResNet-50 at batch 32 takes ~1.4 s a call on 2 cores: the default 2 warm-up + 20 timed rounds of both models
took 75 of a 97 s job). Each batch size gets ``budget_s`` seconds of wall time for both models together,
warm-up included: rounds (one call of each model, alternately, so machine noise hits both alike) continue
until ``runs`` timed rounds are done or the budget is spent, but at least one warm-up round (the first call
traces and allocates) and ``MIN_RUNS`` timed rounds always run, so p50/p95 are never read off one sample.
Every row records the ``runs`` and ``warmup`` rounds actually done; ``notes`` say where the budget cut.

Both models run in this process and thread, so they share TensorFlow's thread pools: neither is favoured.
The statistics are those of ``worker.evaluation.latency.interleaved_latency`` (p50, p95, mean in ms;
``samples_per_s`` = batch / mean); that function has no budget, hence this loop.

``paired_latency`` is the side-by-side measurement a latency budget is judged by (``worker.stages.budget``):
two calls only, both warm, alternated in rounds whose order swaps every round (the second call of a round
runs on caches and a scheduler state the first left, so neither side always goes second), medians.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from app.schemas.spec import Latency
from worker.models import ModelHandle, SignatureInfo
from worker.stages.job import Data, fixed_batch

__all__ = ["MIN_RUNS", "PairedLatency", "budgeted_latency", "measure_latency", "paired_latency", "timed_call"]

MIN_RUNS = 3
PAIRED_WARMUP = 3  # untimed rounds: the first call of a loaded function runs graph optimisation, the next few
# still allocate; one warm-up round was not enough on ResNet-50 (its dense side was measured cold)
PAIRED_RUNS = 301  # timed rounds at most: a small model's calls are ~ms, its medians need many of them
PAIRED_MIN_RUNS = 7  # timed rounds whatever the time budget: a median of 3 moves with one noisy call
PAIRED_BUDGET_S = 3.0  # wall time of the timed rounds before stopping after PAIRED_MIN_RUNS (ResNet-50 b1:
# ~18 rounds); measured on a 2.5 ms MobileNet, 21 rounds put the same model at 1.02x-1.28x on a loaded machine


@dataclass(frozen=True)
class PairedLatency:
    """Median milliseconds of two models timed alternately, and the rounds that produced them."""

    dense_ms: float
    compact_ms: float
    runs: int
    warmup: int

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.compact_ms if self.compact_ms > 0 else float("inf")

    def as_dict(self) -> dict[str, float | int]:
        return {
            "dense_ms": self.dense_ms,
            "compact_ms": self.compact_ms,
            "speedup": self.speedup,
            "runs": self.runs,
            "warmup": self.warmup,
        }


def paired_latency(
    dense: Callable[[], object],
    compact: Callable[[], object],
    runs: int = PAIRED_RUNS,
    warmup: int = PAIRED_WARMUP,
    budget_s: float = PAIRED_BUDGET_S,
    min_runs: int = PAIRED_MIN_RUNS,
) -> PairedLatency:
    """``warmup`` untimed rounds of both, then up to ``runs`` timed rounds (at least ``min(runs, min_runs)``,
    more while ``budget_s`` lasts), dense first in even rounds and compact first in odd ones; medians."""
    if runs < 1 or warmup < 0 or min_runs < 1 or budget_s <= 0:
        raise ValueError(
            f"need runs, min_runs >= 1, warmup >= 0, budget_s > 0; got {runs}, {min_runs}, {warmup}"
        )
    for _ in range(warmup):
        dense()
        compact()
    dense_t: list[float] = []
    compact_t: list[float] = []
    start = time.perf_counter()
    for i in range(runs):
        if i >= min_runs and time.perf_counter() - start > budget_s:
            break
        pairs = ((dense, dense_t), (compact, compact_t))
        for fn, times in pairs if i % 2 == 0 else pairs[::-1]:
            tick = time.perf_counter()
            fn()
            times.append((time.perf_counter() - tick) * 1000.0)
    return PairedLatency(float(np.median(dense_t)), float(np.median(compact_t)), len(dense_t), warmup)


def budgeted_latency(
    fns: Mapping[str, Callable[[], object]], runs: int, warmup: int, budget_s: float, batch_size: int
) -> tuple[dict[str, dict[str, float]], int, int]:
    """``({name: {"p50", "p95", "mean", "samples_per_s", "runs", "warmup"}}, runs done, warm-up rounds done)``.

    Rounds call every function once, in order; the budget is checked before each round after the guaranteed
    ones (1 warm-up if ``warmup`` > 0, ``min(runs, MIN_RUNS)`` timed), so one round may end past it.
    """
    if runs < 1 or warmup < 0 or budget_s <= 0:
        raise ValueError(f"need runs >= 1, warmup >= 0, budget_s > 0; got {runs}, {warmup}, {budget_s}")
    start = time.perf_counter()

    def spent() -> bool:
        return time.perf_counter() - start > budget_s

    done_warmup = 0
    while done_warmup < warmup and not (done_warmup >= 1 and spent()):
        for fn in fns.values():
            fn()
        done_warmup += 1
    samples: dict[str, list[float]] = {name: [] for name in fns}
    done = 0
    while done < runs and not (done >= MIN_RUNS and spent()):
        for name, fn in fns.items():
            tick = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - tick) * 1000.0)
        done += 1
    stats = {}
    for name, times in samples.items():
        mean = float(np.mean(times))
        stats[name] = {
            "p50": float(np.percentile(times, 50)),
            "p95": float(np.percentile(times, 95)),
            "mean": mean,
            "samples_per_s": batch_size * 1000.0 / mean if mean > 0 else float("nan"),
            "runs": done,
            "warmup": done_warmup,
        }
    return stats, done, done_warmup


def timed_call(handle: ModelHandle, signature: str, inputs: dict[str, tf.Tensor]) -> Callable[[], object]:
    """A call that blocks until every output is computed (``.numpy()``), as latency must."""
    return lambda: [t.numpy() for t in handle.call(signature, inputs).values()]


def _inputs(sig: SignatureInfo, data: Data | None, batch: int) -> dict[str, tf.Tensor] | None:
    """``batch`` samples cycled from the dataset, else zeros shaped like the signature (None dims -> 1)."""
    if data is not None:
        idx = np.arange(batch) % data.n
        return {k: tf.constant(v[idx]) for k, v in data.x.items()}
    out: dict[str, tf.Tensor] = {}
    for name, spec in sig.inputs.items():
        if spec["shape"] is None:
            return None
        shape = [batch, *[1 if d is None else d for d in spec["shape"][1:]]]
        out[name] = tf.zeros(shape, dtype=tf.as_dtype(spec["dtype"]))
    return out


def measure_latency(
    candidates: Mapping[str, ModelHandle],
    sig: SignatureInfo,
    settings: Latency,
    source: Data | None,
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """``({candidate: {str(batch): stats}}, notes)`` for every batch size the signature accepts."""
    fixed = fixed_batch(sig)
    result: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in candidates}
    skipped: list[int] = []
    cut: list[str] = []
    for batch in settings.batch_sizes:
        inputs = None if fixed is not None and batch != fixed else _inputs(sig, source, batch)
        if inputs is None:
            skipped.append(batch)
            continue
        fns = {name: timed_call(handle, sig.name, inputs) for name, handle in candidates.items()}
        stats, runs, warmup = budgeted_latency(fns, settings.runs, settings.warmup, settings.budget_s, batch)
        for name, row in stats.items():
            result[name][str(batch)] = row
        if runs < settings.runs or warmup < settings.warmup:
            cut.append(
                f"batch {batch}: {runs} of {settings.runs} runs, {warmup} of {settings.warmup} warm-up"
            )
    notes = []
    if skipped:
        notes.append(f"latency not measured at batch sizes {skipped}: no inputs of that batch size fit")
    if cut:
        notes.append(
            f"latency measurement cut by its time budget of {settings.budget_s:g} s per batch size "
            f"(evaluation.latency.budget_s; at least {MIN_RUNS} runs each): {'; '.join(cut)}. "
            "latency_ms rows record the runs done; p95 of few runs is close to the maximum"
        )
    return result, notes
