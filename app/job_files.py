"""The files a succeeded job offers for download, as its record lists them (no TensorFlow, no storage I/O).

The worker records one entry per file when it ends the job (``JobRecord.artifacts``): the SavedModel zip as
``saved_model`` first, then whatever else the run produced (``tflite_int8``, ``onnx``, ..., and later sweep points such
as ``sparsity-0.80``). The API lists and serves exactly those entries, so a new kind of file needs no change
here. Jobs finished before the list existed have only their ``pruned.zip`` (``artifact_sha256`` /
``artifact_bytes``), shown as the one ``saved_model`` entry.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from app.db.tables import JobRecord

__all__ = [
    "ARTIFACT_NAME",
    "SAVED_MODEL",
    "SAVED_MODEL_FILE",
    "download_filename",
    "entry",
    "find_file",
    "job_files",
    "media_type_for",
]

SAVED_MODEL = "saved_model"
SAVED_MODEL_FILE = "pruned.zip"
# Names go into URLs and download file names: short, lower-case, no path separators.
ARTIFACT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
# By file suffix. TFLite and ONNX have no registered media type; their protobuf/flatbuffer files are served as
# bytes (the file name in Content-Disposition keeps the .tflite / .onnx suffix).
_MEDIA_TYPES = {
    ".zip": "application/zip",
    ".tflite": "application/octet-stream",
    ".onnx": "application/octet-stream",
    ".json": "application/json",
}


def media_type_for(file: str) -> str:
    return _MEDIA_TYPES.get(PurePosixPath(file).suffix, "application/octet-stream")


def entry(name: str, file: str, size_bytes: int, sha256: str) -> dict[str, Any]:
    """One recorded file; ``file`` is its path relative to the job's storage (never user input)."""
    if not ARTIFACT_NAME.fullmatch(name):
        raise ValueError(f"artifact name {name!r} must match {ARTIFACT_NAME.pattern}")
    path = PurePosixPath(file)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"artifact file {file!r} must be a relative path inside the job's storage")
    return {
        "name": name,
        "file": path.as_posix(),
        "media_type": media_type_for(file),
        "size_bytes": int(size_bytes),
        "sha256": sha256,
    }


def job_files(record: JobRecord) -> list[dict[str, Any]]:
    """The record's files, in the order recorded (the SavedModel zip first)."""
    if record.artifacts is not None:
        return list(record.artifacts)
    if record.artifact_sha256 is None:
        return []
    return [entry(SAVED_MODEL, SAVED_MODEL_FILE, record.artifact_bytes or 0, record.artifact_sha256)]


def find_file(record: JobRecord, name: str) -> dict[str, Any] | None:
    return next((f for f in job_files(record) if f["name"] == name), None)


def download_filename(job_id: str, item: dict[str, Any]) -> str:
    """``<job>-pruned.zip`` for the SavedModel (as ``/artifact`` always named it), ``<job>-<name>.<ext>`` else."""
    if item["name"] == SAVED_MODEL:
        return f"{job_id}-pruned.zip"
    return f"{job_id}-{item['name']}{PurePosixPath(item['file']).suffix}"
