"""bench/trials.py's report (no server): the goal rows of the sweep, K-fold and search, and what is compared."""

from __future__ import annotations

from typing import Any

from bench.trials import DEFAULTS, SMOKE, Specs, _without_seconds, markdown


def _result(**wall: float) -> dict[str, Any]:
    walls = {
        "sweep_one": 60.0,
        "sweep_two": 32.0,
        "folds_one": 50.0,
        "folds_two": 30.0,
        "search_one": 40.0,
        "search_two": 36.0,
        **wall,
    }
    trials = {"sweep": 6, "folds": 6, "search": 6}
    return {
        "config": DEFAULTS,
        "model": {"params": 56714, "n_train": 12000, "epochs": 3, "test_accuracy": 0.83},
        "targets": DEFAULTS["targets"],
        "fine_tune": DEFAULTS["fine_tune"],
        "wall_s": walls,
        "trials": {f"{k}_{n}": {"trials": trials[k]} for k in trials for n in ("one", "two")},
        "single_job_s": [10.0, 11.0, 12.0],
        "one_target_sweep_s": [11.0, 11.5, 13.0],
        "killed": {"trial": "sparsity-0.50", "attempts": 2, "s": 45.0},
        "points_equal_one_vs_two": True,
        "points_equal_killed_vs_two": True,
        "folds_equal_one_vs_two": True,
        "search_equal_one_vs_two": False,
        "folds_accuracy": {"mean": 0.81, "std": 0.01},
        "search_chosen": {"sparsity": 0.8688, "metric": 0.815},
        "search_counts": {"probes": 4, "trials": 3},
    }


def _row(text: str, starts: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {starts}")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_goal_rows_for_sweep_folds_search_overhead_and_kill() -> None:
    text = markdown(_result())
    sweep = _row(text, "(a) 6-target sweep")
    assert sweep[1].startswith("**1.88x**") and sweep[2] == ">= 1.8x" and sweep[3] == "met"
    folds = _row(text, "(a) 5-fold cross-validation")
    assert folds[1].startswith("**1.67x**") and folds[2] == ">= 1.8x" and folds[3] == "**missed**"
    search = _row(text, "(a) search")
    assert search[1].startswith("**1.11x**") and search[2] == "reported" and search[3] == "—"
    overhead = _row(text, "(b) one-target sweep")
    assert overhead[1].startswith("**1.05x**") and overhead[3] == "met"
    assert _row(text, "(c) a worker SIGKILLed")[3] == "met"
    assert _row(text, "5-fold cross-validation: the same results")[3] == "met"
    assert _row(text, "search: the same results")[3] == "**missed**"
    # the wall-time table: 1 and 2 workers for each kind, then the killed run
    assert _row(text, "5-fold cross-validation | 2")[3] == "1.67x"
    assert "5 one-shot probes side by side" in text and "chose 0.8688" in text


def test_seconds_are_left_out_at_any_depth_and_nothing_else() -> None:
    section = {"seconds": 1.0, "chosen": {"sparsity": 0.8}, "trials": [{"sparsity": 0.3, "seconds": 2.0}]}
    assert _without_seconds(section) == {"chosen": {"sparsity": 0.8}, "trials": [{"sparsity": 0.3}]}


def test_specs_are_the_same_jobs_at_both_sizes() -> None:
    for cfg in (DEFAULTS, SMOKE):
        specs = Specs(cfg)
        assert specs.folds()["evaluation"] == {"cross_validation": {"folds": cfg["folds"]}}
        assert specs.search()["search"]["budget_s"] >= 3600  # never stopped by the clock
        assert specs.sweep()["sweep"]["targets"] == cfg["targets"]
        assert specs.single(0.8)["fine_tune"] == specs.sweep([0.8])["fine_tune"]
    assert DEFAULTS["folds"] == 5 and len(DEFAULTS["targets"]) == 6
