"""Model size: on-disk bytes of a model directory, its zipped form (what a user downloads), and weight counts.

The zip is deterministic -- sorted entries, fixed timestamps, permissions from the files -- so the same
pruned model always gives the same bytes (stable ETag, comparable sizes between baseline and pruned).
Unstructured zeros do not shrink the SavedModel (variables are stored dense) but deflate well, which is why
both sizes are reported.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import uuid
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["ZipCanceled", "dir_size", "param_counts", "write_zip", "zip_dir"]

_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest time a zip can hold
_CHUNK = 1 << 20


def dir_size(path: Path) -> int:
    """Total bytes of the regular files under ``path``; symlinks are neither followed nor counted."""
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _entries(src_dir: Path) -> list[tuple[Path, str, bool]]:
    """(path, arcname, is_dir) in sorted order; symlinks and special files are skipped (not ours to ship)."""
    entries: list[tuple[Path, str, bool]] = []
    for root, dirs, files in os.walk(src_dir, followlinks=False):
        dirs.sort()
        base = Path(root)
        for name in dirs:
            path = base / name
            if not path.is_symlink():
                entries.append((path, path.relative_to(src_dir).as_posix() + "/", True))
        for name in sorted(files):
            path = base / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                entries.append((path, path.relative_to(src_dir).as_posix(), False))
    return sorted(entries, key=lambda entry: entry[1])


def zip_dir(src_dir: Path, out_zip: Path, compresslevel: int = 6) -> int:
    """Zip ``src_dir``'s contents (arcnames relative to it) into ``out_zip``; returns the zip's byte size.

    Written to a temporary name beside ``out_zip`` and renamed, so readers never see a half-written zip.
    Files are streamed in chunks: SavedModel variables can be larger than memory allows.
    """
    src_dir, out_zip = Path(src_dir), Path(out_zip)
    if not src_dir.is_dir():
        raise NotADirectoryError(f"{src_dir} is not a directory")
    if out_zip.resolve().is_relative_to(src_dir.resolve()):
        raise ValueError("the zip must not be written inside the directory being zipped")
    tmp = out_zip.with_name(f".{out_zip.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as fh:
            write_zip(src_dir, fh, compresslevel)
        os.replace(tmp, out_zip)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return out_zip.stat().st_size


class ZipCanceled(Exception):
    """``write_zip`` was told to stop (its ``stop`` event was set)."""


def write_zip(
    src_dir: Path,
    fileobj: BinaryIO,
    compresslevel: int = 6,
    stop: threading.Event | None = None,
    gate: threading.Event | None = None,
) -> None:
    """The deterministic zip of ``src_dir`` into a seekable binary file; files streamed in chunks (variables
    can be larger than memory). ``stop`` set -> ``ZipCanceled`` within one chunk; ``gate`` cleared -> waits
    before the next chunk (paused) until it is set again or ``stop`` is."""
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        for path, arcname, is_dir in _entries(src_dir):
            info = zipfile.ZipInfo(arcname, date_time=_EPOCH)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if is_dir:
                info.external_attr = ((stat.S_IFDIR | mode) << 16) | 0x10
                zf.writestr(info, b"")
                continue
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            if hasattr(info, "compress_level"):  # Python >= 3.13
                info.compress_level = compresslevel
            else:  # a ZipInfo passed to open() ignores the ZipFile's level unless set here
                info._compresslevel = compresslevel  # type: ignore[attr-defined]
            info.file_size = path.stat().st_size  # lets zipfile switch to ZIP64 for files over 2 GiB
            with path.open("rb") as src, zf.open(info, "w") as dst:
                while chunk := src.read(_CHUNK):
                    while gate is not None and not gate.wait(0.05):
                        if stop is not None and stop.is_set():
                            raise ZipCanceled
                    if stop is not None and stop.is_set():
                        raise ZipCanceled
                    dst.write(chunk)


def param_counts(arrays: Mapping[str, np.ndarray], prunable: Collection[str]) -> dict[str, Any]:
    """Weight counts of a model from its variables' values (name -> array) and the prunable names.

    Returns API.md's ``params`` (``total``, ``prunable``, ``nonzero`` -- nonzero over EVERY variable), the
    ``sparsity`` the spec targets (zeros among prunable weights / prunable weights; 0.0 with none) and
    ``nonzero_by_name`` (per variable, the ``masks_nonzero`` input of ``flops.estimate_flops``).
    """
    unknown = sorted(set(prunable) - set(arrays))
    if unknown:
        raise ValueError(f"prunable names {unknown} are not among the variables")
    sizes = {name: int(np.size(value)) for name, value in arrays.items()}
    nonzero = {name: int(np.count_nonzero(value)) for name, value in arrays.items()}
    prunable_size = sum(sizes[name] for name in prunable)
    prunable_zeros = sum(sizes[name] - nonzero[name] for name in prunable)
    return {
        "params": {
            "total": sum(sizes.values()),
            "prunable": prunable_size,
            "nonzero": sum(nonzero.values()),
        },
        "sparsity": prunable_zeros / prunable_size if prunable_size else 0.0,
        "nonzero_by_name": nonzero,
    }
