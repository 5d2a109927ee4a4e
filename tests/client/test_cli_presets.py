"""The CLI and presets: the resolved spec in one line, ``--preset``, and the accuracy-drop warning.

The warning's wording is unit-tested on metrics documents; the CLI paths run in-process against the real app
(no worker: the spec line and the 422 of ``--preset recommended`` without ``--train``) and end to end on the
embedded server (a real job whose drop triggers the warning, exit code 0, stdout JSON still one document).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.drop_warning import DEFAULT_WARN_DROP, drop_warning, spec_line, suggestions
from tests.client.conftest import Tiny
from tests.client.test_cli import cli, run
from tests.conftest import Embedded


def metrics(before: float, after: float, name: str = "accuracy") -> dict[str, Any]:
    return {"baseline": {"metrics": {name: before}}, "pruned": {"metrics": {name: after}}}


# fast with an explicit "scope": "layer" (the preset alone ranks globally: FAST_DEFAULT_NO_TRAIN)
FAST_NO_TRAIN = {
    "spec": {"target_sparsity": 0.8, "preset": "fast", "scope": "layer", "fine_tune": None},
    "train_dataset_id": None,
}
FAST_DEFAULT_NO_TRAIN = {
    "spec": {"target_sparsity": 0.9, "preset": "fast", "scope": "global", "normalization": "lamp"},
    "train_dataset_id": None,
}
FAST_WITH_TRAIN = {**FAST_NO_TRAIN, "train_dataset_id": "ds_1"}
RECOMMENDED = {
    "spec": {"target_sparsity": 0.9, "preset": "recommended", "scope": "global", "fine_tune": {"epochs": 3}},
    "train_dataset_id": "ds_1",
}


# --- the warning's wording -------------------------------------------------------------------------------------


def test_a_drop_above_the_threshold_warns_with_the_numbers() -> None:
    warning = drop_warning(FAST_NO_TRAIN, metrics(0.973, 0.340), DEFAULT_WARN_DROP)
    assert warning is not None
    assert "accuracy dropped by 0.633 (0.973 -> 0.340)" in warning and "--warn-drop 0.05" in warning


@pytest.mark.parametrize(
    ("before", "after", "threshold"),
    [(0.97, 0.93, 0.05), (0.97, 0.92, 0.05), (0.9, 0.2, 1.0), (0.5, 0.6, 0.0)],
)
def test_no_warning_within_the_threshold(before: float, after: float, threshold: float) -> None:
    assert drop_warning(FAST_NO_TRAIN, metrics(before, after), threshold) is None


def test_r2_counts_and_lower_is_better_metrics_do_not() -> None:
    assert drop_warning(FAST_NO_TRAIN, metrics(0.9, 0.5, "r2"), 0.05) is not None
    assert drop_warning(FAST_NO_TRAIN, metrics(0.1, 0.9, "mse"), 0.05) is None  # no absolute scale
    assert drop_warning(FAST_NO_TRAIN, {"baseline": {"metrics": None}, "pruned": {}}, 0.05) is None


def test_suggestions_follow_the_spec_that_ran() -> None:
    no_train = suggestions(FAST_NO_TRAIN)
    assert no_train[0].startswith("--train") and any('"scope": "global"' in s for s in no_train)
    assert no_train[-1] == "a lower sparsity, e.g. --sparsity 0.70"
    assert suggestions(FAST_DEFAULT_NO_TRAIN) == [  # already global: no scope advice
        "--train DATA.npz: with training data the recommended preset fine-tunes the model",
        "a lower sparsity, e.g. --sparsity 0.80",
    ]
    with_train = suggestions(FAST_WITH_TRAIN)
    assert with_train[0].startswith("--preset recommended")
    assert not any('"scope": "global"' in s for s in with_train)  # the preset already does that
    tuned = suggestions(RECOMMENDED)
    assert tuned[0] == 'more fine-tuning: "fine_tune": {"epochs": 6} in --spec'
    assert not any("--preset" in s for s in tuned)
    explicit = suggestions(
        {"spec": {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}, "train_dataset_id": "d"}
    )
    assert explicit[:2] == [
        'more fine-tuning: "fine_tune": {"epochs": 2} in --spec',
        "--preset recommended (the fields in --spec still override it)",
    ]


def test_the_spec_line_is_one_line_of_json() -> None:
    line = spec_line({"target_sparsity": 0.8, "preset": "recommended", "fine_tune": {"epochs": 3}})
    assert "\n" not in line and line.startswith("spec (preset recommended): ")
    assert json.loads(line.split(": ", 1)[1])["fine_tune"] == {"epochs": 3}
    assert spec_line({"target_sparsity": 0.5}).startswith("spec (preset none): ")


# --- in-process CLI, no worker -----------------------------------------------------------------------------------


def test_prune_prints_the_resolved_spec_on_stderr(
    capsys: pytest.CaptureFixture[str], api_url: str, fake_model: Path
) -> None:
    code, out, err = run(capsys, "prune", str(fake_model), "--sparsity", "0.6", "--url", api_url, "--json")
    assert code == 0, err
    report = json.loads(out)  # stdout stays one JSON document
    spec_lines = [line for line in err.splitlines() if line.startswith("spec (preset ")]
    assert len(spec_lines) == 1 and spec_lines[0].startswith("spec (preset fast): ")
    assert json.loads(spec_lines[0].split(": ", 1)[1]) == report["job"]["spec"]


def test_preset_recommended_without_train_data_exits_2_naming_the_fix(
    capsys: pytest.CaptureFixture[str], api_url: str, fake_model: Path
) -> None:
    code, _, err = run(
        capsys, "prune", str(fake_model), "--sparsity", "0.6", "--preset", "recommended", "--url", api_url
    )
    assert code == 2
    assert "preset 'recommended' fine-tunes on training data" in err and "train_dataset_id" in err


def test_warn_drop_must_be_a_non_negative_number(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "jobs", "wait", "job_x", "--warn-drop", "-1")
    assert code == 2 and "must be >= 0" in err


# --- end to end: a real job that loses accuracy ------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.tf
def test_a_large_drop_warns_on_stderr_and_exits_0(embedded: Embedded, tiny: Tiny, tmp_path: Path) -> None:
    done = cli(
        "prune",
        str(tiny.model_zip),
        "--sparsity",
        "0.97",
        "--eval",
        str(tiny.test),
        "--wait",
        "--poll",
        "0.2",
        "--json",
        SECATEURS_URL=embedded.url,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    metrics = report["metrics"]
    before, after = metrics["baseline"]["metrics"]["accuracy"], metrics["pruned"]["metrics"]["accuracy"]
    assert before - after > DEFAULT_WARN_DROP, (before, after)  # the premise: one-shot 97% hurts this MLP
    assert metrics["spec"]["preset"] == "fast" and metrics["spec"] == report["job"]["spec"]
    warnings = [line for line in done.stderr.splitlines() if "warning: accuracy dropped by" in line]
    assert len(warnings) == 1 and "--train DATA.npz" in warnings[0], done.stderr
    assert report["warning"] in warnings[0]
    assert "spec (preset fast): " in done.stderr

    silenced = cli("jobs", "wait", report["job"]["id"], "--warn-drop", "1", SECATEURS_URL=embedded.url)
    assert silenced.returncode == 0 and "warning:" not in silenced.stderr, silenced.stderr
