"""Dataset rules for uploaded .npz files, each broken on purpose with real numpy/zipfile output."""

from __future__ import annotations

import io
import pathlib
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app import npz as npz_module
from app.errors import DatasetError, UnsupportedFormat
from app.npz import NpzInfo, NpzLimits, inspect_npz


def savez(tmp_path: Path, name: str = "d.npz", *, compressed: bool = False, **arrays: Any) -> Path:
    path = tmp_path / name
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def zip_of(tmp_path: Path, members: list[tuple[str, bytes]]) -> Path:
    path = tmp_path / "d.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names on purpose
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def refused(path: Path, match: str, limits: NpzLimits = NpzLimits()) -> None:
    with pytest.raises(DatasetError, match=re.escape(match)):
        inspect_npz(path, limits)


X = np.arange(30, dtype=np.float32).reshape(10, 3)
Y = np.arange(10, dtype=np.int64)


# -------------------------------------------------------------------------------------------------- valid


@pytest.mark.parametrize("compressed", [False, True])
def test_valid_x_y(tmp_path: Path, compressed: bool) -> None:
    info = inspect_npz(savez(tmp_path, x=X, y=Y, compressed=compressed))
    assert info == NpzInfo(
        arrays={"x": {"shape": [10, 3], "dtype": "float32"}, "y": {"shape": [10], "dtype": "int64"}},
        n_samples=10,
    )


def test_valid_multi_input_and_multi_output(tmp_path: Path) -> None:
    path = savez(
        tmp_path,
        **{
            "x.image": np.zeros((4, 8, 8, 1), np.uint8),
            "x.mask": np.ones((4, 8), bool),
            "y.class": np.arange(4),
            "y.box": np.zeros((4, 4), np.float64),
        },
    )
    info = inspect_npz(path)
    assert list(info.arrays) == ["x.image", "x.mask", "y.box", "y.class"]
    assert info.arrays["x.image"] == {"shape": [4, 8, 8, 1], "dtype": "uint8"}
    assert info.arrays["x.mask"]["dtype"] == "bool"
    assert info.n_samples == 4


def test_x_only_and_nan_in_y_is_fine(tmp_path: Path) -> None:
    assert inspect_npz(savez(tmp_path, x=X)).n_samples == 10
    y = np.full(10, np.nan)
    assert inspect_npz(savez(tmp_path, "b.npz", x=X, y=y)).arrays["y"]["dtype"] == "float64"


def test_fortran_order_and_big_endian(tmp_path: Path) -> None:
    x = np.asfortranarray(np.arange(60, dtype=">f8").reshape(6, 10))
    assert inspect_npz(savez(tmp_path, x=x)).arrays["x"] == {"shape": [6, 10], "dtype": "float64"}


# ------------------------------------------------------------------------------------------------ pickles


class _Trap:
    """Unpickling this touches a file: proof that the validator never unpickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    objects = np.empty(10, dtype=object)
    objects[:] = [_Trap(marker) for _ in range(10)]
    path = tmp_path / "d.npz"
    np.savez(path, x=X, y=objects, allow_pickle=True)
    refused(path, "array 'y' holds Python objects (a pickle)")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- not an npz


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"x,y\n1,2\n")
    with pytest.raises(UnsupportedFormat, match="not a zip file"):
        inspect_npz(path)


def test_single_npy_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(npy_bytes(X))
    with pytest.raises(UnsupportedFormat, match=r"a single \.npy array.*np\.savez"):
        inspect_npz(path)


def test_truncated_npz(tmp_path: Path) -> None:
    full = savez(tmp_path, x=X, y=Y).read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(full[: len(full) - 40])
    refused(path, "not a valid zip file")


def test_zip_with_a_non_npy_member(tmp_path: Path) -> None:
    refused(zip_of(tmp_path, [("x.npy", npy_bytes(X)), ("README.txt", b"hi")]), "'README.txt' is not a .npy")


def test_npy_member_that_is_not_npy(tmp_path: Path) -> None:
    refused(zip_of(tmp_path, [("x.npy", b"not numpy at all, just text")]), "array 'x' is not a valid .npy")


def test_member_with_missing_data(tmp_path: Path) -> None:
    refused(zip_of(tmp_path, [("x.npy", npy_bytes(X)[:-8])]), "array 'x' holds fewer data bytes")


def test_member_with_extra_data(tmp_path: Path) -> None:
    refused(zip_of(tmp_path, [("x.npy", npy_bytes(X) + b"\0" * 4)]), "array 'x' holds more data bytes")


# ------------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("bad", ["features", "X", "x.", "x..a", "labels", "x.a b", "z.x"])
def test_unexpected_array_names(tmp_path: Path, bad: str) -> None:
    refused(savez(tmp_path, x=X, **{bad: Y}), f"array {bad!r} has an unexpected name")


def test_no_x(tmp_path: Path) -> None:
    refused(savez(tmp_path, y=Y), "no 'x' array (found: y)")


def test_plain_and_named_x_mixed(tmp_path: Path) -> None:
    refused(savez(tmp_path, x=X, **{"x.other": X}), "use either 'x' or 'x.<name>' arrays, not both")


def test_duplicate_member(tmp_path: Path) -> None:
    refused(zip_of(tmp_path, [("x.npy", npy_bytes(X)), ("x.npy", npy_bytes(X))]), "more than once")


def test_too_many_arrays(tmp_path: Path) -> None:
    arrays = {f"x.in{i}": X for i in range(5)}
    refused(savez(tmp_path, **arrays), "more than 4 arrays", NpzLimits(max_arrays=4))


# ---------------------------------------------------------------------------------------- shapes & dtypes


def test_mismatched_lengths_are_listed(tmp_path: Path) -> None:
    refused(savez(tmp_path, x=X, y=Y[:9]), "got x: 10, y: 9")


def test_zero_samples(tmp_path: Path) -> None:
    refused(savez(tmp_path, x=np.zeros((0, 3)), y=np.zeros(0)), "no samples")


def test_rank_zero(tmp_path: Path) -> None:
    refused(savez(tmp_path, x=X, y=np.float32(3.0)), "array 'y' is a scalar (rank 0)")


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(10, np.complex64),
        np.array(["a"] * 10),
        np.array([b"a"] * 10),
        np.zeros(10, "datetime64[ns]"),
        np.zeros(10, "timedelta64[s]"),
        np.zeros(10, [("a", "i4"), ("b", "f4")]),
        np.zeros(10, "V8"),
    ],
    ids=lambda a: str(a.dtype),
)
def test_refused_dtypes(tmp_path: Path, array: np.ndarray) -> None:
    refused(savez(tmp_path, x=X, y=array), "array 'y' has dtype")


# ------------------------------------------------------------------------------------------------ NaN/inf


def test_nan_and_inf_in_x_are_counted(tmp_path: Path) -> None:
    x = X.copy()
    x[1, 1] = np.nan
    x[5, 0] = np.inf
    x[9, 2] = -np.inf
    refused(savez(tmp_path, x=x, y=Y), "array 'x' holds 3 NaN/inf values")


def test_nan_in_named_input_and_float16(tmp_path: Path) -> None:
    b = np.ones((10, 2), np.float16)
    b[3, 1] = np.nan
    refused(savez(tmp_path, **{"x.a": X, "x.b": b}), "array 'x.b' holds 1 NaN/inf value;")


def test_nan_counting_is_exact_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tiny read blocks the scan sees the array in many pieces; the count must not change."""
    monkeypatch.setattr(npz_module, "_BLOCK_BYTES", 24)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7)).astype(np.float64)
    bad = rng.choice(x.size, size=13, replace=False)
    x.flat[bad] = np.nan
    refused(savez(tmp_path, x=np.asfortranarray(x), compressed=True), "holds 13 NaN/inf values")


# ------------------------------------------------------------------------------------------------- limits


def test_per_array_and_total_size_limits(tmp_path: Path) -> None:
    big = np.zeros((10, 100), np.float64)  # 8000 bytes of data
    refused(
        savez(tmp_path, x=big, compressed=True),
        "array 'x' is 7.9 KB uncompressed, above the 7.8 KB limit",
        NpzLimits(max_bytes_uncompressed=8000),
    )
    refused(
        savez(tmp_path, "t.npz", x=X, y=np.zeros((10, 90))),
        "the arrays total",
        NpzLimits(max_bytes_uncompressed=7500),
    )
