"""The side-by-side timing a latency budget is judged by: warm-up rounds first, then alternate calls whose
order swaps each round, medians; a fake clock makes every duration exact (no assertion on real time)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from worker.stages import latency

pytestmark = pytest.mark.tf


class FakeClock:
    """``perf_counter`` that only moves when a fake model runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _model(clock: FakeClock, name: str, seconds: list[float], calls: list[str]) -> Callable[[], None]:
    """Each call takes the next of ``seconds`` (the last one repeats)."""

    def fn() -> None:
        calls.append(name)
        clock.now += seconds[min(len([c for c in calls if c == name]) - 1, len(seconds) - 1)]

    return fn


def test_alternate_rounds_after_warmup_give_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    calls: list[str] = []
    # Cold first calls (graph optimisation) must not reach the medians: warm-up rounds take them.
    dense = _model(clock, "d", [2.0, 0.5, 0.010], calls)
    compact = _model(clock, "c", [1.0, 0.004], calls)
    measured = latency.paired_latency(dense, compact, runs=5, warmup=2, budget_s=100.0, min_runs=1)
    assert calls[:4] == ["d", "c", "d", "c"]  # warm-up: both, in turn
    assert calls[4:] == ["d", "c", "c", "d", "d", "c", "c", "d", "d", "c"]  # order swaps every round
    assert (measured.runs, measured.warmup) == (5, 2)
    assert measured.dense_ms == pytest.approx(10.0) and measured.compact_ms == pytest.approx(4.0)
    assert measured.speedup == pytest.approx(2.5)
    assert measured.as_dict()["speedup"] == pytest.approx(2.5)


def test_time_budget_stops_after_the_minimum_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    calls: list[str] = []
    dense, compact = _model(clock, "d", [1.0], calls), _model(clock, "c", [1.0], calls)
    measured = latency.paired_latency(dense, compact, runs=21, warmup=1, budget_s=0.5, min_runs=7)
    assert measured.runs == 7  # every round is past the budget, the minimum still runs
    measured = latency.paired_latency(dense, compact, runs=21, warmup=0, budget_s=1e6, min_runs=7)
    assert measured.runs == 21
    with pytest.raises(ValueError):
        latency.paired_latency(dense, compact, runs=0)
