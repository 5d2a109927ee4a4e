"""StreamedSet over Parquet (fixed-size list column, column projection) and npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from tests.worker.data.stream_support import LocalDirSource, manifest, png
from worker.data import split
from worker.data.errors import DescriptionError, RecordError
from worker.data.stream import StreamedSet, sample_arrays

pytestmark = pytest.mark.tf

ROWS = [9, 6]  # rows per Parquet file; ids 0..14


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(3).normal(size=(n, 4, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def pq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parquet")
    pixels, start = _pixels(sum(ROWS)), 0
    for part, rows in enumerate(ROWS):
        ids = np.arange(start, start + rows)
        flat = pa.array(pixels[ids].reshape(-1))
        table = pa.table(
            {
                "pixels": pa.FixedSizeListArray.from_arrays(flat, 16),
                "label": pa.array(ids, pa.int64()),
                "unused": pa.array([f"row {i}" for i in ids]),
                "image": pa.array([png(np.full((3, 2, 1), i, np.uint8)) for i in ids], pa.binary()),
            }
        )
        pq.write_table(table, root / f"part-{part}.parquet", row_group_size=4)
        start += rows
    return root


def _pq_manifest(root: Path, inputs: dict | None = None) -> dict:
    inputs = inputs or {"x": {"column": "pixels", "shape": [4, 4]}}
    keys = [f"part-{p}.parquet" for p in range(len(ROWS))]
    return manifest(root, "parquet", keys, list(ROWS), inputs=inputs, label="label")


def test_parquet_batches_match_the_columns(pq_dir: Path) -> None:
    streamed = StreamedSet(_pq_manifest(pq_dir), LocalDirSource(pq_dir))
    batches = list(streamed.dataset(4).as_numpy_iterator())
    assert batches[0][0]["x"].shape == (4, 4, 4) and batches[0][1].dtype == np.int64
    x = np.concatenate([b[0]["x"] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(y, np.arange(15))
    np.testing.assert_array_equal(x, _pixels(15))


def test_parquet_shuffle_seeded_and_splits(pq_dir: Path) -> None:
    streamed = StreamedSet(_pq_manifest(pq_dir), LocalDirSource(pq_dir))

    def labels(**kw: object) -> list[int]:
        return [int(v) for _, y in streamed.dataset(4, **kw) for v in y.numpy()]

    a = labels(shuffle=True, seed=4, epoch=0, shuffle_buffer=6)
    assert a == labels(shuffle=True, seed=4, epoch=0, shuffle_buffer=6) and sorted(a) == list(range(15))
    assert a != labels(shuffle=True, seed=4, epoch=1, shuffle_buffer=6)
    held, rest = set(labels(keep=split.keep_fraction(0, 0.4))), set(labels(keep=split.drop_fraction(0, 0.4)))
    assert held and rest and not held & rest and held | rest == set(range(15))


def test_parquet_binary_images_and_multi_input_take(pq_dir: Path) -> None:
    inputs = {
        "img": {"column": "image", "decode": {"image": "png", "channels": 1}},
        "pix": {"column": "pixels", "shape": [16]},
    }
    streamed = StreamedSet(_pq_manifest(pq_dir, inputs), LocalDirSource(pq_dir))
    arrays = streamed.take(10)
    assert sorted(arrays) == ["x.img", "x.pix", "y"]
    assert arrays["x.img"].shape == (10, 3, 2, 1) and arrays["x.img"].dtype == np.float32
    np.testing.assert_array_equal(arrays["x.img"][:, 0, 0, 0], np.arange(10))
    np.testing.assert_array_equal(arrays["x.pix"], _pixels(15)[:10].reshape(10, 16))


def test_parquet_wrong_shapes_name_the_column(pq_dir: Path, tmp_path: Path) -> None:
    streamed = StreamedSet(
        _pq_manifest(pq_dir, {"x": {"column": "pixels", "shape": [3, 3]}}), LocalDirSource(pq_dir)
    )
    with pytest.raises(
        DescriptionError, match=r"column 'pixels' holds 16 values per row; shape \[3, 3\] needs 9"
    ):
        list(streamed.batches(4))
    ragged = pa.table({"v": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0]]), "label": pa.array([0, 1, 2])})
    pq.write_table(ragged, tmp_path / "r.parquet")
    m = manifest(
        tmp_path, "parquet", ["r.parquet"], [3], inputs={"x": {"column": "v", "shape": [2]}}, label="label"
    )
    with pytest.raises(
        RecordError, match=r"shard 'r.parquet' rows 0\.\.2: column 'v' holds 5 values for 3 rows"
    ):
        list(StreamedSet(m, LocalDirSource(tmp_path)).batches(4))


@pytest.fixture(scope="module")
def npz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(0)
    np.savez(root / "upload.npz", **{"x.a": rng.normal(size=(20, 3)).astype(np.float32),
                                      "x.b": rng.integers(0, 9, size=(20, 2, 2)), "y": np.arange(20)})  # fmt: skip
    return root


def test_npz_streams_and_takes_its_arrays(npz_dir: Path) -> None:
    m = manifest(npz_dir, "npz", ["upload.npz"], [20])
    m["arrays"] = sample_arrays(m, LocalDirSource(npz_dir))
    assert m["arrays"]["x.a"] == {"shape": [20, 3], "dtype": "float32"}
    assert m["arrays"]["x.b"]["shape"] == [20, 2, 2] and m["arrays"]["y"]["shape"] == [20]
    streamed = StreamedSet(
        m, LocalDirSource(npz_dir), input_specs={"b": {"shape": [None, 2, 2], "dtype": "float32"}}
    )
    x, _ = next(iter(streamed.dataset(8)))
    assert x["a"].shape == (8, 3) and x["b"].dtype == tf.float32
    with np.load(npz_dir / "upload.npz") as z:
        taken = StreamedSet(m, LocalDirSource(npz_dir)).take(20, shuffle=True, seed=3)
        order = np.argsort(taken["y"])
        for key in ("x.a", "x.b", "y"):
            np.testing.assert_array_equal(taken[key][order], z[key])
