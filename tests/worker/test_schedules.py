"""Schedules: values at specific steps (the cubic curve by hand), update steps, edges, config round-trips."""

from __future__ import annotations

import json

import pytest

from worker.pruning.schedules import (
    AUTO_MASK_UPDATES,
    OneShot,
    PolynomialDecay,
    Schedule,
    auto_frequency,
    build_schedule,
)


def test_one_shot_prunes_once_at_step_zero() -> None:
    s = OneShot(0.7)
    assert s(0) == (True, 0.7)
    assert s(1) == (False, 0.7)
    assert s(500) == (False, 0.7)
    assert OneShot()(0) == (True, 1.0)


def test_polynomial_cubic_values_by_hand() -> None:
    s = PolynomialDecay(initial_sparsity=0.0, final_sparsity=0.8, begin_step=0, end_step=100)
    assert (s.power, s.frequency) == (3.0, 10)
    assert s(0) == (True, 0.0)
    should, value = s(50)  # 0.8 - 0.8 * 0.5**3
    assert should and value == pytest.approx(0.7)
    should, value = s(30)  # 0.8 - 0.8 * 0.7**3
    assert should and value == pytest.approx(0.5256)
    should, value = s(25)  # off the frequency grid
    assert not should and value == pytest.approx(0.8 - 0.8 * 0.75**3)
    assert s(100) == (True, 0.8)
    assert s(101) == (False, 0.8)
    assert s(10_000) == (False, 0.8)


def test_polynomial_with_initial_sparsity_begin_step_and_power_one() -> None:
    s = PolynomialDecay(0.2, 0.6, begin_step=10, end_step=30, power=1, frequency=5)
    assert s(0) == (False, 0.2)  # before begin: no update, initial sparsity
    assert s(10) == (True, 0.2)
    should, value = s(20)
    assert should and value == pytest.approx(0.4)  # linear midway
    should, value = s(23)
    assert not should and value == pytest.approx(0.2 + 0.4 * 13 / 20)
    assert s(30) == (True, 0.6)


def test_polynomial_prunes_at_end_step_off_the_grid() -> None:
    s = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=25, frequency=10)
    assert [step for step in range(40) if s(step)[0]] == [0, 10, 20, 25]


def test_fewer_steps_than_frequency_still_reaches_final() -> None:
    s = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=3, frequency=10)
    assert [step for step in range(10) if s(step)[0]] == [0, 3]
    assert s(3) == (True, 0.5)
    zero_length = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=0)
    assert zero_length(0) == (True, 0.5)


def test_polynomial_is_non_decreasing() -> None:
    s = PolynomialDecay(0.1, 0.9, begin_step=3, end_step=57, power=3, frequency=7)
    values = [s(step)[1] for step in range(70)]
    assert values == sorted(values)
    assert values[0] == 0.1 and values[-1] == 0.9


def test_config_round_trips_through_json_and_registry() -> None:
    schedules: list[Schedule] = [
        OneShot(0.4),
        PolynomialDecay(0.1, 0.9, begin_step=2, end_step=40, power=2.5, frequency=3),
    ]
    for s in schedules:
        config = json.loads(json.dumps(s.get_config()))
        rebuilt = Schedule.from_config(config)
        assert type(rebuilt) is type(s) and rebuilt == s
        assert [rebuilt(i) for i in range(50)] == [s(i) for i in range(50)]
        assert type(s).from_config(config) == s
    assert OneShot(0.4).get_config() == {"kind": "one_shot", "final_sparsity": 0.4}


def test_from_config_refuses_unknown_or_mismatched_kinds() -> None:
    with pytest.raises(ValueError, match="one_shot"):
        Schedule.from_config({"kind": "exponential"})
    with pytest.raises(ValueError, match="PolynomialDecay"):
        PolynomialDecay.from_config(OneShot(0.5).get_config())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_sparsity": 0.6, "final_sparsity": 0.5, "begin_step": 0, "end_step": 10},
        {"initial_sparsity": 0.0, "final_sparsity": 1.5, "begin_step": 0, "end_step": 10},
        {"initial_sparsity": 0.0, "final_sparsity": 0.5, "begin_step": 5, "end_step": 4},
        {"initial_sparsity": 0.0, "final_sparsity": 0.5, "begin_step": 0, "end_step": 4, "frequency": 0},
        {"initial_sparsity": 0.0, "final_sparsity": 0.5, "begin_step": 0, "end_step": 4, "power": 0},
    ],
)
def test_polynomial_validates_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PolynomialDecay(**kwargs)


def test_build_schedule_from_spec_dicts() -> None:
    assert build_schedule({"kind": "one_shot"}, 0.8, total_steps=0) == OneShot(0.8)
    s = build_schedule(
        {"kind": "polynomial", "initial_sparsity": 0.1, "power": 2.0, "frequency": 5, "end_fraction": 0.75},
        0.8,
        total_steps=100,
    )
    assert s == PolynomialDecay(0.1, 0.8, begin_step=0, end_step=75, power=2.0, frequency=5)
    # Defaults match the spec's: cubic, final at 75% of the steps, masks updated every step on a short ramp.
    assert build_schedule({"kind": "polynomial"}, 0.5, total_steps=40) == PolynomialDecay(
        0.0, 0.5, 0, 30, frequency=1
    )
    # The spec's null frequency is the default, not an error.
    assert build_schedule({"kind": "polynomial", "frequency": None}, 0.5, 40) == build_schedule(
        {"kind": "polynomial"}, 0.5, 40
    )
    with pytest.raises(ValueError, match="unknown schedule kind"):
        build_schedule({"kind": "cosine"}, 0.5, total_steps=10)


@pytest.mark.parametrize("total_steps", [1, 2, 3, 7, 12])
def test_build_schedule_reaches_final_within_short_runs(total_steps: int) -> None:
    s = build_schedule({"kind": "polynomial", "frequency": 100}, 0.6, total_steps=total_steps)
    prune_steps = [step for step in range(total_steps + 1) if s(step)[0]]
    assert prune_steps[0] == 0
    assert s(prune_steps[-1]) == (True, 0.6)
    assert prune_steps[-1] <= total_steps


@pytest.mark.parametrize(
    ("ramp_steps", "frequency"), [(0, 1), (1, 1), (97, 1), (100, 1), (101, 2), (323, 4), (7500, 75)]
)
def test_auto_frequency_spreads_at_most_a_hundred_updates_over_the_ramp(
    ramp_steps: int, frequency: int
) -> None:
    assert AUTO_MASK_UPDATES == 100
    assert auto_frequency(ramp_steps) == frequency
    updates = len(range(0, ramp_steps + 1, frequency))
    if ramp_steps <= AUTO_MASK_UPDATES:
        assert updates == ramp_steps + 1  # every step
    else:
        assert AUTO_MASK_UPDATES // 2 < updates <= AUTO_MASK_UPDATES + 1


def test_default_schedule_of_the_benchmark_budgets() -> None:
    """The digits benchmark's budgets (1347 samples, batch 32): 3 epochs = 129 steps, 10 epochs = 430."""
    short = build_schedule({"kind": "polynomial"}, 0.9, total_steps=129)
    long = build_schedule({"kind": "polynomial"}, 0.9, total_steps=430)
    assert (short.end_step, short.frequency) == (97, 1)  # type: ignore[attr-defined]
    assert (long.end_step, long.frequency) == (323, 4)  # type: ignore[attr-defined]
    assert [step for step in range(431) if long(step)[0]][-2:] == [320, 323]  # the end step off the grid too
    assert long(323) == (True, 0.9)
