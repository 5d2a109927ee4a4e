"""Validation of uploaded ``.npz`` datasets in the API process, with bounded memory and no unpickling.

Each ``.npy`` member is streamed from the zip. Its header is parsed with numpy's own reader and object dtypes
are refused from the header alone, so nothing is ever unpickled (stricter than np.load(allow_pickle=False)).
Its data is then read in fixed-size blocks to count NaN/inf and prove the member complete. A multi-GB dataset
thus costs one block of memory, and the worker can later ``np.load`` it knowing it is sound.
"""

from __future__ import annotations

import math
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypedDict

import numpy as np
from numpy.lib import format as npy_format

from app.archive import count_zip_entries, human_size
from app.errors import ArchiveError, DatasetError, UnsupportedFormat

GiB = 2**30
_BLOCK_BYTES = 16 << 20
_NAME = re.compile(r"^(?P<role>[xy])(?:\.(?P<sub>[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}))?$")
_ALLOWED_KINDS = {"b": "bool", "i": "int", "u": "uint", "f": "float"}
_CORRUPT: tuple[type[BaseException], ...] = (zipfile.BadZipFile, zlib.error, EOFError, OSError, struct.error)


class ArrayInfo(TypedDict):
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class NpzLimits:
    """Bounds checked from the zip directory before any array data is read."""

    max_bytes_uncompressed: int = 4 * GiB
    max_arrays: int = 64


@dataclass(frozen=True)
class NpzInfo:
    """Array name -> shape/dtype (sorted by name), and the shared first dimension."""

    arrays: dict[str, ArrayInfo]
    n_samples: int


def inspect_npz(path: Path, limits: NpzLimits = NpzLimits()) -> NpzInfo:
    """Check an uploaded .npz against the dataset rules; DatasetError (422) names the array and the problem.

    Rules: arrays named ``x`` or ``x.<input>`` (at least one) and optionally ``y`` or ``y.<output>``; bool,
    int, uint or float dtypes only; rank >= 1 with one shared first dimension > 0; no NaN/inf in ``x`` arrays.
    """
    with path.open("rb") as f:
        head = f.read(6)
    if not head.startswith(b"PK\x03\x04"):
        what = "a single .npy array" if head == b"\x93NUMPY" else "not a zip file"
        raise UnsupportedFormat(
            f"the dataset is {what}; send an .npz written by np.savez(path, x=..., y=...)"
        )
    try:
        too_many = count_zip_entries(path, stop_after=limits.max_arrays) > limits.max_arrays
    except ArchiveError as exc:
        raise DatasetError(f"the .npz is not a valid zip file: {exc.detail}") from exc
    if too_many:
        raise DatasetError(f"the .npz holds more than {limits.max_arrays} arrays")
    try:
        zf = zipfile.ZipFile(path)
    except _CORRUPT as exc:
        raise DatasetError(f"the .npz is not a valid zip file ({exc}); was it truncated?") from exc
    with zf:
        infos = zf.infolist()
        names = _check_names(infos, limits)
        arrays: dict[str, ArrayInfo] = {}
        for name, info in sorted(zip(names, infos, strict=True)):
            arrays[name] = _check_member(zf, info, name)
    return NpzInfo(arrays=arrays, n_samples=_common_length(arrays))


def _check_names(infos: list[zipfile.ZipInfo], limits: NpzLimits) -> list[str]:
    """Array names from the directory, and the size limit, before any data is touched."""
    names: list[str] = []
    total = 0
    for info in infos:
        shown = info.filename[:80]
        if not info.filename.endswith(".npy") or info.is_dir():
            raise DatasetError(f"the .npz member {shown!r} is not a .npy array; save with np.savez")
        if info.flag_bits & 0x41:
            raise DatasetError(f"the .npz member {shown!r} is encrypted")
        name = info.filename[: -len(".npy")]
        if not _NAME.match(name):
            raise DatasetError(
                f"array {name[:80]!r} has an unexpected name; use 'x' (or 'x.<input name>' per model input) "
                "and optionally 'y' (or 'y.<output name>')"
            )
        if name in names:
            raise DatasetError(f"array {name!r} appears more than once in the .npz")
        if info.file_size > limits.max_bytes_uncompressed:
            raise DatasetError(
                f"array {name!r} is {human_size(info.file_size)} uncompressed, above the "
                f"{human_size(limits.max_bytes_uncompressed)} limit"
            )
        total += info.file_size
        names.append(name)
    if total > limits.max_bytes_uncompressed:
        raise DatasetError(
            f"the arrays total {human_size(total)} uncompressed, above the "
            f"{human_size(limits.max_bytes_uncompressed)} limit"
        )
    for role in ("x", "y"):
        plain = role in names
        named = [n for n in names if n.startswith(role + ".")]
        if plain and named:
            raise DatasetError(f"use either {role!r} or {role + '.<name>'!r} arrays, not both ({named[0]!r})")
    if not any(n == "x" or n.startswith("x.") for n in names):
        raise DatasetError(
            f"the .npz has no 'x' array (found: {', '.join(sorted(names)) or 'nothing'}); "
            "name the model inputs 'x' or 'x.<input name>'"
        )
    return names


def _check_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> ArrayInfo:
    """Parse one member's header, refuse bad dtypes/ranks, then stream its data (counting NaN/inf in x)."""
    try:
        with zf.open(info) as f:
            shape, dtype = _read_header(f, name)
            expected = math.prod(shape) * dtype.itemsize
            non_finite = _scan(f, dtype, expected, name, count_non_finite=name.startswith("x"))
    except _CORRUPT as exc:
        raise DatasetError(f"array {name!r} cannot be read ({exc}); the .npz is corrupt") from exc
    if non_finite:
        raise DatasetError(
            f"array {name!r} holds {non_finite} NaN/inf value{'s' if non_finite != 1 else ''}; "
            "drop or impute those samples"
        )
    return {"shape": list(shape), "dtype": dtype.name}


def _read_header(f: IO[bytes], name: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise DatasetError(f"array {name!r} uses .npy format {version}, which is not supported")
    except ValueError as exc:
        raise DatasetError(f"array {name!r} is not a valid .npy array ({exc})") from exc
    if dtype.hasobject:
        raise DatasetError(
            f"array {name!r} holds Python objects (a pickle); only numeric arrays are accepted"
        )
    if dtype.kind not in _ALLOWED_KINDS:
        raise DatasetError(
            f"array {name!r} has dtype {dtype}, which is not accepted; use bool, int, uint or float"
        )
    if len(shape) == 0:
        raise DatasetError(f"array {name!r} is a scalar (rank 0); arrays need one row per sample")
    return shape, dtype


def _scan(f: IO[bytes], dtype: np.dtype, expected: int, name: str, *, count_non_finite: bool) -> int:
    """Read exactly ``expected`` data bytes in blocks (layout is irrelevant for counting); NaN/inf count."""
    block = max(_BLOCK_BYTES // dtype.itemsize, 1) * dtype.itemsize
    seen = bad = 0
    check = count_non_finite and dtype.kind == "f"
    while seen < expected:
        buf = f.read(min(block, expected - seen))
        if not buf:
            break
        seen += len(buf)
        if len(buf) % dtype.itemsize:  # zip reads are short only at the end: the member is truncated
            break
        if check:
            values = np.frombuffer(buf, dtype=dtype)
            bad += values.size - int(np.count_nonzero(np.isfinite(values)))
    if seen != expected or f.read(1):
        raise DatasetError(
            f"array {name!r} holds {'fewer' if seen < expected else 'more'} data bytes than its header "
            "declares; the .npz is corrupt"
        )
    return bad


def _common_length(arrays: dict[str, ArrayInfo]) -> int:
    lengths = {name: info["shape"][0] for name, info in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{n}: {v}" for n, v in lengths.items())
        raise DatasetError(f"arrays must have the same number of samples (first dimension); got {listed}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise DatasetError("the arrays have no samples (first dimension is 0)")
    return n
