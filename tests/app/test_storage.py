"""The data directory's layout: ids checked, removals complete, leftovers swept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app.errors import NotFound
from app.storage import Storage


def test_storage_layout_and_ids(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "data")
    for d in (storage.models_dir, storage.datasets_dir, storage.jobs_dir, storage.tmp_dir):
        assert d.is_dir() and d.parent == storage.root
    assert storage.model_dir("mdl_0a1b") == storage.models_dir / "mdl_0a1b"
    assert storage.dataset_path("ds_1") == storage.datasets_dir / "ds_1.npz"
    assert storage.job_dir("job-1") == storage.jobs_dir / "job-1"
    for bad in ("../x", "", "a" * 65, "a/b", "a b", ".", "mdl_1\n"):
        with pytest.raises(NotFound):
            storage.model_dir(bad)
        with pytest.raises(NotFound):
            storage.remove_dataset(bad)


def test_remove_is_complete_and_tolerates_missing(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    (storage.model_dir("m1") / "variables").mkdir(parents=True)
    (storage.model_dir("m1") / "variables" / "v").write_bytes(b"x")
    storage.dataset_path("d1").write_bytes(b"npz")
    storage.job_dir("j1").mkdir()
    storage.remove_model("m1")
    storage.remove_dataset("d1")
    storage.remove_job("j1")
    assert not storage.model_dir("m1").exists()
    assert not storage.dataset_path("d1").exists()
    assert not storage.job_dir("j1").exists()
    assert list(storage.tmp_dir.iterdir()) == []
    storage.remove_model("m1")  # already gone: no error
    storage.remove_dataset("never-existed")


def test_sweep_tmp_removes_only_old_leftovers(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    old_file, old_dir, fresh = (storage.tmp_dir / n for n in ("upload-1.part", "trash-1", "new"))
    old_file.write_bytes(b"x")
    old_dir.mkdir()
    (old_dir / "f").write_bytes(b"y")
    fresh.write_bytes(b"z")
    long_ago = time.time() - 3 * 24 * 3600
    for p in (old_file, old_dir):
        os.utime(p, (long_ago, long_ago))
    assert storage.sweep_tmp() == 2
    assert [p.name for p in storage.tmp_dir.iterdir()] == ["new"]
