"""worker.tasks records the pipeline's extra files (work/artifacts/*) as job artifacts, replacing an earlier
attempt's, with the size and SHA-256 the API will serve them under."""

from __future__ import annotations

import hashlib
from pathlib import Path

from worker.tasks import _move_extra_files


def test_extra_files_move_into_the_job_and_are_described(tmp_path: Path) -> None:
    work, job_dir = tmp_path / "job" / "work-2", tmp_path / "job"
    (work / "artifacts").mkdir(parents=True)
    (work / "artifacts" / "tflite_int8.tflite").write_bytes(b"int8")
    (work / "artifacts" / "tflite_float32.tflite").write_bytes(b"float32!")
    (job_dir / "artifacts").mkdir()
    (job_dir / "artifacts" / "tflite_float16.tflite").write_bytes(b"stale, from attempt 1")

    entries = _move_extra_files(work, job_dir)

    assert [e["name"] for e in entries] == ["tflite_float32", "tflite_int8"]
    assert entries[1] == {
        "name": "tflite_int8",
        "file": "artifacts/tflite_int8.tflite",
        "media_type": "application/octet-stream",
        "size_bytes": 4,
        "sha256": hashlib.sha256(b"int8").hexdigest(),
    }
    assert sorted(p.name for p in (job_dir / "artifacts").iterdir()) == [
        "tflite_float32.tflite",
        "tflite_int8.tflite",
    ]
    assert not (work / "artifacts").exists()


def test_no_extra_files_is_an_empty_list(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    assert _move_extra_files(tmp_path / "work", tmp_path) == []
