"""Accuracy-budget search on the digits CNN: the artifact, re-evaluated here, is within the drop; the trial
log, the failure code when nothing passes, lower-is-better metrics and the budget (with an injected clock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.schemas.metrics import MetricsDocument
from app.schemas.presets import resolve
from app.schemas.spec import PruneSpec, Search
from worker.errors import PipelineError
from worker.kinds.search import Judge
from worker.models import load_model
from worker.pipeline import run_pipeline

pytestmark = pytest.mark.tf


class Progress:
    def __init__(self) -> None:
        self.values: list[float] = []

    def __call__(self, stage: str, progress: float) -> None:
        self.values.append(progress)


def _run(
    model: Path, spec: dict[str, Any], data: Any, out: Path, report: Progress | None = None
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    train, test = data
    resolved = resolve(PruneSpec.model_validate(spec), has_train=True)  # what the API stores (presets)
    return run_pipeline(model, resolved, train, test, out, report or Progress())


def _accuracy(saved_model: Path, test: dict[str, np.ndarray]) -> float:
    handle = load_model(saved_model)
    outputs = handle.call("serving_default", {"image": test["x"]})
    probs = next(iter(outputs.values())).numpy()
    return float(np.mean(probs.argmax(axis=1) == test["y"]))


def test_search_finds_a_sparsity_within_the_drop(
    keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path
) -> None:
    spec = {  # the recommended preset (global LAMP, polynomial, distillation), 2 epochs per trial
        "search": {"metric": "accuracy", "max_drop": 0.01, "budget_s": 300, "resolution": 0.1},
        "fine_tune": {"epochs": 2},
        "preset": "recommended",
    }
    progress = Progress()
    doc = _run(keras3_export_dir, spec, digits_cnn, tmp_path, progress)
    MetricsDocument.model_validate({"job_id": "j", "model_id": "m", **doc})
    search = doc["search"]
    chosen = search["chosen"]["sparsity"]
    assert 0.3 <= chosen <= 0.95
    assert abs(doc["pruned"]["sparsity"] - chosen) < 0.01
    assert doc["spec"]["search"]["max_drop"] == 0.01 and doc["spec"]["target_sparsity"] is None
    trials = search["trials"]
    assert {"sparsity", "metric", "passed", "seconds"} <= set(trials[0])
    assert any(t["phase"] == "probe" for t in trials) and any(t["phase"] == "trial" for t in trials)
    passing = [t["sparsity"] for t in trials if t["passed"] and t["phase"] == "trial"]
    assert chosen == max(passing)
    assert all(t["sparsity"] > chosen for t in trials if t["phase"] == "trial" and not t["passed"])
    # the artifact, evaluated here from its files, keeps accuracy within the budget of the baseline
    baseline = doc["baseline"]["metrics"]["accuracy"]
    assert _accuracy(tmp_path / "saved_model", digits_cnn[1]) >= baseline - 0.01 - 1e-9
    assert progress.values == sorted(progress.values)  # progress only grows across trials
    assert any("search:" in n for n in doc["notes"])


def test_no_passing_trial_fails_with_the_trials(
    keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path
) -> None:
    spec = {"search": {"max_drop": 0.0, "min_sparsity": 0.9, "max_sparsity": 0.99}, "preset": "fast"}
    with pytest.raises(PipelineError) as caught:
        _run(keras3_export_dir, spec, digits_cnn, tmp_path)
    assert caught.value.code == "no_sparsity_within_budget"
    assert "0.9*" in caught.value.message  # the probe is listed


def test_validation_split_keeps_the_eval_set_out(
    keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path
) -> None:
    spec = {
        "search": {"max_drop": 0.05, "min_sparsity": 0.05, "max_sparsity": 0.6, "validation_fraction": 0.2},
        "preset": "fast",
    }
    doc = _run(keras3_export_dir, spec, digits_cnn, tmp_path)
    assert doc["search"]["selection_data"] == "validation split of the train set"
    assert any("held out" in n for n in doc["notes"])


def test_lower_is_better_metrics_pass_below_the_threshold() -> None:
    judge = Judge(Search(metric="mse", max_drop=0.1, relative=True), baseline=2.0)
    assert judge.threshold == pytest.approx(2.2)
    assert judge.passes(2.1) and judge.passes(1.0) and not judge.passes(2.3) and not judge.passes(None)
    judge = Judge(Search(metric="accuracy", max_drop=0.01), baseline=0.9)
    assert judge.passes(0.895) and not judge.passes(0.88)


def test_budget_stops_with_the_best_passing_trial() -> None:
    from worker.kinds.search import Budget, Trial, _search

    now = [0.0]
    search = Search(min_sparsity=0.3, max_sparsity=0.9, budget_s=25)
    spec = PruneSpec.model_validate({"search": search.model_dump(), "fine_tune": {"epochs": 1}})
    trials: list[Trial] = []

    def run_trial(sparsity: float, one_shot: bool) -> Trial:
        now[0] += 1.0 if one_shot else 10.0  # an injected clock: probes 1 s, trials 10 s
        trial = Trial(
            sparsity,
            1.0 - sparsity,
            sparsity <= 0.8,
            1.0 if one_shot else 10.0,
            "probe" if one_shot else "trial",
        )
        trials.append(trial)
        return trial

    exhausted = _search(search, spec, run_trial, Budget(25, lambda: now[0]), trials)
    assert exhausted
    assert [t.phase for t in trials].count("trial") == 2  # 5 s of probes + 2 x 10 s; a third would not fit


def test_cross_validation_runs_on_the_chosen_sparsity_only(
    keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path
) -> None:
    spec = {
        "search": {"max_drop": 0.05, "min_sparsity": 0.05, "max_sparsity": 0.5},
        "preset": "fast",
        "evaluation": {"cross_validation": {"folds": 2}},
    }
    doc = _run(keras3_export_dir, spec, digits_cnn, tmp_path)
    chosen = doc["search"]["chosen"]["sparsity"]
    folds = doc["cross_validation"]["per_fold"]
    assert len(folds) == 2 and all(abs(f["sparsity"] - chosen) < 0.01 for f in folds)


def test_a_lower_is_better_metric_is_searched_the_right_way(
    keras3_export_dir: Path, digits_cnn: Any, tmp_path: Path
) -> None:
    spec = {
        "search": {"metric": "loss", "max_drop": 0.3, "min_sparsity": 0.1, "max_sparsity": 0.9},
        "preset": "fast",
    }
    doc = _run(keras3_export_dir, spec, digits_cnn, tmp_path)
    search = doc["search"]
    assert search["lower_is_better"] and search["threshold"] == pytest.approx(search["baseline"] + 0.3)
    for trial in search["trials"]:
        assert trial["passed"] == (trial["metric"] <= search["threshold"])
    assert doc["pruned"]["metrics"]["loss"] <= search["threshold"] + 1e-9
    assert any(not t["passed"] for t in search["trials"])  # 90% one-shot raises the loss past the threshold
