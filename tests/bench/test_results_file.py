"""bench/RESULTS.md is edited section by section: a rerun of one section leaves the rest of the file alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import results as bench_results
from bench import run as bench_run


def test_replace_block_replaces_in_place_appends_new_and_keeps_the_rest() -> None:
    text = "intro by hand\n\n<!-- bench:a -->\nold a\n<!-- /bench:a -->\n\nnotes by hand\n"
    updated = bench_results.replace_block(text, "a", "new a\n")
    assert updated == "intro by hand\n\n<!-- bench:a -->\nnew a\n<!-- /bench:a -->\n\nnotes by hand\n"
    appended = bench_results.replace_block(updated, "b", "b body")
    assert appended.endswith("notes by hand\n\n<!-- bench:b -->\nb body\n<!-- /bench:b -->\n")
    assert bench_results.replace_block(appended, "b", "b again").count("<!-- bench:b -->") == 1
    headed = bench_results.replace_block("body\n", "header", "# Title", at_start=True)
    assert headed == "<!-- bench:header -->\n# Title\n<!-- /bench:header -->\n\nbody\n"
    # Regex characters in bodies are kept literally (no backreference expansion).
    assert r"\1 $0" in bench_results.replace_block(text, "a", r"\1 $0")


def test_write_results_rewrites_only_the_sections_it_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_results, "OUT_DIR", tmp_path / "out")
    path = tmp_path / "RESULTS.md"
    first: dict[str, Any] = {
        "resnet": {"markdown": "resnet table 1", "bench_wall_s": 1.0},
        "tfmot": {"markdown": "tfmot table 1", "bench_wall_s": 2.0},
    }
    bench_results.write_results(first, smoke=False, path=path)
    path.write_text(path.read_text() + "\nA paragraph the lead wrote by hand.\n")
    bench_results.write_results(
        {"tfmot": {"markdown": "tfmot table 2", "bench_wall_s": 3.0}}, smoke=False, path=path
    )
    text = path.read_text()
    assert "resnet table 1" in text and "tfmot table 2" in text and "tfmot table 1" not in text
    assert "A paragraph the lead wrote by hand." in text
    assert text.index("resnet table 1") < text.index("tfmot table 2")
    assert (tmp_path / "out" / "section-tfmot.json").is_file()
    with pytest.raises(ValueError, match="unknown section"):
        bench_run.run_sections(only="nope")


def test_every_section_has_a_runner_and_a_title() -> None:
    assert list(bench_run.RUNNERS) == list(bench_results.ALL_SECTIONS)
