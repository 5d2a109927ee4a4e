"""tests.support.model_cache: one build per builder + arguments + versions, reused, never half-written; the
decorator the test builders use copies the one stored build to each caller."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import model_cache as common

CALLS: list[tuple[Path, int]] = []


def _builder(root: Path, size: int) -> dict[str, Any]:
    CALLS.append((root, size))
    (root / "weights.bin").write_bytes(b"x" * size)
    return {"size": size}


def _failing(root: Path) -> dict[str, Any]:
    (root / "half.bin").write_bytes(b"x")
    raise RuntimeError("killed mid-build")


def test_builds_once_per_key_and_reuses(tmp_path: Path) -> None:
    CALLS.clear()
    root, meta = common.cached_model(_builder, 3, cache_dir=tmp_path)
    assert meta == {"size": 3, "cached": False} and (root / "weights.bin").read_bytes() == b"xxx"
    again, meta = common.cached_model(_builder, 3, cache_dir=tmp_path)
    assert (again, meta) == (root, {"size": 3, "cached": True}) and len(CALLS) == 1
    other, _ = common.cached_model(_builder, 4, cache_dir=tmp_path)
    assert other != root and len(CALLS) == 2  # other arguments, other model
    assert root.name.startswith("builder-3-")  # readable: builder and arguments, then the digest


def test_versions_are_part_of_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = common.cached_model(_builder, 3, cache_dir=tmp_path)
    monkeypatch.setattr(common, "_dist_version", lambda name: "0.0-other")
    assert common.cached_model(_builder, 3, cache_dir=tmp_path)[0] != root


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="killed"):
        common.cached_model(_failing, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_decorated_builder_builds_once_and_copies_to_each_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    @common.cached_builder
    def export(out: Path, width: int = 2) -> Path:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "saved_model.pb").write_bytes(b"m" * width)
        return out

    monkeypatch.delenv(common.CACHE_ENV, raising=False)
    export(tmp_path / "uncached")
    assert calls == [tmp_path / "uncached"]  # no cache named: a plain build where the caller asked
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "cache"))
    first, second = export(tmp_path / "a"), export(tmp_path / "b", width=2)  # one key: defaults bound
    assert len(calls) == 2 and (first / "saved_model.pb").read_bytes() == b"mm" == (second / "saved_model.pb").read_bytes()
    (first / "saved_model.pb").write_bytes(b"changed by its caller")
    assert (export(tmp_path / "c") / "saved_model.pb").read_bytes() == b"mm"  # callers get copies
    export(tmp_path / "d", width=3)
    assert len(calls) == 3
