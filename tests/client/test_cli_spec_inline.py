"""`--spec` as a file or an inline JSON object, and the one-line summary of a compacted job."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli.output import metrics_summary
from app.cli.remote import UsageError, _read_spec


def test_an_inline_object_and_a_file_give_the_same_spec(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text('{"granularity": "channel"}')
    inline = _read_spec('{"granularity": "channel"}', 0.5)
    assert inline == _read_spec(str(path), 0.5) == {"granularity": "channel", "target_sparsity": 0.5}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("missing.json", "does not exist (give a JSON file or a JSON object)"),
        ('{"granularity": ', "(inline) is not JSON"),
        (" [1, 2]", "does not exist"),
    ],
)
def test_bad_specs_are_usage_errors(given: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _read_spec(given, 0.5)


def test_a_compacted_job_reports_parameters_not_the_zero_fraction() -> None:
    side = {"metrics": {"accuracy": 0.97}, "size_bytes": {"zip": 2048}}
    metrics = {
        "baseline": {**side, "params": {"total": 16858}, "sparsity": 0.0},
        "pruned": {**side, "params": {"total": 6398}, "sparsity": 0.0},
        "structure": {"compact": True},
    }
    line = metrics_summary(metrics)
    assert line.startswith("params 16,858 -> 6,398 (channels removed)") and "sparsity" not in line
    metrics["structure"]["compact"] = False
    assert metrics_summary(metrics).startswith("sparsity 0.00")
