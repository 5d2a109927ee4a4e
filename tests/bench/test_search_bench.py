"""bench/search.py's arithmetic (no server): the grid's answer per drop and the goal check."""

from __future__ import annotations

import itertools

from bench.search import _goal, best_passing, grid_targets


def test_grid_is_five_percent_steps_over_the_range() -> None:
    targets = grid_targets(smoke=False)
    assert targets[0] == 0.3 and targets[-1] == 0.95 and len(targets) == 14
    assert all(abs(b - a - 0.05) < 1e-9 for a, b in itertools.pairwise(targets))


def test_best_passing_and_goal() -> None:
    grid = [
        {"target": 0.5, "accuracy": 0.97},
        {"target": 0.8, "accuracy": 0.962},
        {"target": 0.9, "accuracy": 0.94},
    ]
    assert best_passing(grid, 0.97, 0.005) == 0.5
    assert best_passing(grid, 0.97, 0.01) == 0.8
    assert best_passing(grid, 0.99, 0.001) is None
    result = {
        "grid": grid,
        "baseline": 0.97,
        "grid_wall_s": 100.0,
        "searches": {"0.005": {"chosen": 0.6, "wall_s": 40.0}, "0.01": {"chosen": 0.79, "wall_s": 30.0}},
    }
    goal = _goal(result)
    assert goal["by_drop"]["0.005"]["at_least_grid"] and not goal["by_drop"]["0.01"]["at_least_grid"]
    assert not goal["met"]
    result["searches"]["0.01"]["chosen"] = 0.85
    assert _goal(result)["met"]
    result["searches"]["0.01"]["wall_s"] = 60.0  # more than half the grid's time
    assert not _goal(result)["met"]
