"""bench.common.cached_model: one build per builder + arguments + versions, reused, never half-written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import common

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
    assert list(tmp_path.iterdir()) == []
