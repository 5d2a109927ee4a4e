"""Manifests of real TFRecord (written by tf.io.TFRecordWriter), Parquet (pyarrow) and .npz files.

The decoded ``arrays`` entry is the stream reader's job (worker.data.stream.sample_arrays, DATA-STREAM); these
tests pass a small stand-in hook so they decide only what the manifest builder owns."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.data.errors import DescriptionError, RecordError, SourceError
from worker.data.manifest import build_manifest, count_records, read_records
from worker.data.sources import FileSource, Source

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tf


def no_arrays(manifest: dict[str, Any], source: Source, n: int) -> dict[str, Any]:
    """Stand-in for the stream reader's sample_arrays: records that it was asked, with what."""
    assert "arrays" in manifest and manifest["shards"]
    return {"called_with": n}


def example(**features: Any) -> bytes:
    feats = {}
    for name, value in features.items():
        if isinstance(value, bytes):
            feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        elif isinstance(value, list) and value and isinstance(value[0], float):
            feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=value))
        elif isinstance(value, list):
            feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=value))
        else:
            feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def write_tfrecord(path: Path, records: list[bytes], compression: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path), options=compression) as w:
        for r in records:
            w.write(r)
    return path


def src(path: Path) -> FileSource:
    return FileSource(path.as_uri() + ("/" if path.is_dir() else ""), allowed=None)


def test_tfrecord_counts_and_inferred_features(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for shard, n in ((0, 5), (1, 3)):
        records = [
            example(
                pixels=[float(v) for v in rng.random(4)], label=i % 2, tags=list(range(i % 3 + 1)), name=b"n"
            )
            for i in range(n)
        ]
        write_tfrecord(d / f"train-0000{shard}-of-00002", records)
    (d / "README.md").write_text("not a shard")
    desc = {"format": "tfrecord", "inputs": {"x": {"feature": "pixels"}}}
    m = build_manifest(src(d), desc, max_objects=10, compute_arrays=no_arrays)
    assert [(s["key"], s["records"]) for s in m["shards"]] == [
        ("train-00000-of-00002", 5),
        ("train-00001-of-00002", 3),
    ]
    assert m["n_samples"] == 8 and m["compression"] is None
    assert m["features"] == {
        "label": {"kind": "fixed", "dtype": "int64", "shape": []},
        "name": {"kind": "fixed", "dtype": "string", "shape": []},
        "pixels": {"kind": "fixed", "dtype": "float32", "shape": [4]},
        "tags": {"kind": "var_len", "dtype": "int64", "shape": []},
    }
    assert m["label"] == "label"
    assert m["arrays"] == {"called_with": 8}
    with pytest.raises(DescriptionError) as err:  # three candidates for the model's input
        build_manifest(src(d), {}, max_objects=10, compute_arrays=no_arrays)
    assert err.value.code == "input_invalid"
    m = build_manifest(
        src(d),
        {
            "inputs": {"x": {"feature": "pixels"}},
            "label": "label",
            "features": {
                "pixels": {"kind": "fixed", "dtype": "float32", "shape": [4]},
                "label": {"kind": "fixed", "dtype": "int64", "shape": []},
            },
        },
        max_objects=10,
        compute_arrays=no_arrays,
    )
    assert m["inputs"] == {"x": {"feature": "pixels"}} and set(m["features"]) == {"pixels", "label"}


def test_counting_matches_tensorflow(tmp_path: Path) -> None:
    records = [example(v=i, blob=b"x" * (i * 37 % 300)) for i in range(257)]
    for compression in (None, "GZIP", "ZLIB"):
        path = write_tfrecord(tmp_path / f"c-{compression}.tfrecord", records, compression)
        want = int(
            tf.data.TFRecordDataset(str(path), compression_type=compression or "").reduce(
                0, lambda n, _: n + 1
            )
        )
        assert count_records(path, compression) == want == 257
        assert read_records(path, compression, limit=3) == records[:3]


def test_gzip_shards_are_recognised(tmp_path: Path) -> None:
    records = [example(image=b"\x00\x01", label=i) for i in range(4)]
    write_tfrecord(tmp_path / "gz" / "part-0.tfrecord.gz", records, "GZIP")
    m = build_manifest(src(tmp_path / "gz"), {}, max_objects=5, compute_arrays=no_arrays)
    assert m["compression"] == "GZIP" and m["n_samples"] == 4
    assert m["inputs"] == {"x": {"feature": "image"}}  # bytes that are no image get no decode
    # a gzip file named as plain: the magic bytes tell
    raw = (tmp_path / "gz" / "part-0.tfrecord.gz").read_bytes()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "part-0.tfrecord").write_bytes(raw)
    m = build_manifest(src(tmp_path / "plain"), {}, max_objects=5, compute_arrays=no_arrays)
    assert m["compression"] == "GZIP" and m["n_samples"] == 4


def test_bad_record_is_named_by_shard_and_index(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    good = [example(x=[1.0, 2.0], label=1) for _ in range(3)]
    write_tfrecord(d / "a.tfrecord", good)
    write_tfrecord(d / "b.tfrecord", [*good[:2], b"\xff\xff not a proto \x00", good[0]])
    with pytest.raises(RecordError) as err:
        build_manifest(src(d), {}, max_objects=5, compute_arrays=no_arrays)
    assert err.value.shard == "b.tfrecord" and err.value.index == 2
    assert "record 2 of shard 'b.tfrecord'" in err.value.message
    # a file that is no TFRecord at all (a truncated frame) fails at its first record
    (d / "b.tfrecord").write_bytes(gzip.compress(b"abc")[:5] + b"\x00" * 20)
    (d / "b.tfrecord").rename(d / "c.tfrecord")
    data = (d / "a.tfrecord").read_bytes()
    (d / "a.tfrecord").write_bytes(data[:-3])
    with pytest.raises(RecordError) as err:
        count_records(d / "a.tfrecord", key="a.tfrecord")
    assert err.value.index == 2 and "truncated" in err.value.message


def test_description_checked_against_the_sample(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    write_tfrecord(d / "p.tfrecord", [example(x=[1.0, 2.0, 3.0], label=1) for _ in range(3)])
    base = {"label": "label", "inputs": {"x": {"feature": "x"}}}

    def run(features: dict[str, Any], **extra: Any) -> DescriptionError:
        with pytest.raises(DescriptionError) as err:
            build_manifest(
                src(d), {**base, "features": features, **extra}, max_objects=5, compute_arrays=no_arrays
            )
        return err.value

    label = {"kind": "fixed", "dtype": "int64", "shape": []}
    e = run({"x": {"kind": "fixed", "dtype": "int64", "shape": [3]}, "label": label})
    assert e.code == "feature_mismatch" and "'x'" in e.message and "float32" in e.message
    e = run({"x": {"kind": "fixed", "dtype": "float32", "shape": [4]}, "label": label})
    assert e.code == "feature_mismatch" and "3 values" in e.message
    e = run(
        {"x": {"kind": "fixed", "dtype": "float32", "shape": [3]}, "label": label, "img": {"dtype": "string"}}
    )
    assert e.code == "feature_missing" and "'img'" in e.message
    e = run({"x": {"kind": "fixed", "dtype": "float32", "shape": [3]}}, label="label")
    assert e.code == "feature_missing" and "label" in e.message
    e = run(
        {"x": {"kind": "fixed", "dtype": "float32", "shape": [3]}, "label": label},
        inputs={"x": {"feature": "nope"}},
    )
    assert e.code == "feature_missing" and "'nope'" in e.message


def test_image_feature_gets_a_decode(tmp_path: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(buf, format="PNG")
    write_tfrecord(tmp_path / "img" / "s.tfrecord", [example(image=buf.getvalue(), label=0)] * 2)
    m = build_manifest(src(tmp_path / "img"), {}, max_objects=5, compute_arrays=no_arrays)
    assert m["inputs"] == {"x": {"feature": "image", "decode": {"image": "auto", "channels": 1}}}


def test_parquet_manifest(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(24, dtype=np.float32)), 4)
    for i, rows in enumerate((slice(0, 4), slice(4, 6))):
        table = pa.table(
            {
                "pixels": pixels[rows],
                "label": pa.array(np.arange(6, dtype=np.int64)[rows]),
                "note": pa.array(["a"] * 6)[rows],
            }
        )
        pq.write_table(table, d / f"part-{i}.parquet")
    desc = {"format": "parquet", "inputs": {"x": {"column": "pixels", "shape": [2, 2]}}, "label": "label"}
    m = build_manifest(src(d), desc, max_objects=5, compute_arrays=no_arrays)
    assert [s["records"] for s in m["shards"]] == [4, 2] and m["n_samples"] == 6
    assert m["features"]["pixels"] == {"kind": "fixed", "dtype": "float32", "shape": [4]}
    assert m["features"]["label"] == {"kind": "fixed", "dtype": "int64", "shape": []}
    assert m["features"]["note"]["dtype"] == "string"
    assert m["inputs"] == {"x": {"column": "pixels", "shape": [2, 2]}}
    with pytest.raises(DescriptionError) as err:
        build_manifest(
            src(d), {**desc, "inputs": {"x": {"column": "pixel"}}}, max_objects=5, compute_arrays=no_arrays
        )
    assert err.value.code == "column_missing" and "'pixel'" in err.value.message
    with pytest.raises(DescriptionError) as err:
        build_manifest(
            src(d),
            {**desc, "inputs": {"x": {"column": "pixels", "shape": [3, 3]}}},
            max_objects=5,
            compute_arrays=no_arrays,
        )
    assert err.value.code == "feature_mismatch"
    pq.write_table(pa.table({"other": [1]}), d / "part-2.parquet")
    with pytest.raises(DescriptionError) as err:
        build_manifest(src(d), desc, max_objects=5, compute_arrays=no_arrays)
    assert "part-2.parquet" in err.value.message


def test_npz_manifest(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=np.zeros((7, 3, 2), np.float32), y=np.arange(7))
    m = build_manifest(src(path), {"format": "npz"}, max_objects=5)
    assert m["n_samples"] == 7 and m["shards"][0]["records"] == 7 and m["label"] == "y"
    assert m["arrays"] == {
        "x": {"shape": [7, 3, 2], "dtype": "float32"},
        "y": {"shape": [7], "dtype": "int64"},
    }
    np.savez(path, x=np.zeros((7, 3)), y=np.arange(6))
    with pytest.raises(DescriptionError):
        build_manifest(src(path), {"format": "npz"}, max_objects=5)


def test_empty_and_too_many(tmp_path: Path) -> None:
    write_tfrecord(tmp_path / "e" / "a.tfrecord", [])
    with pytest.raises(SourceError) as err:
        build_manifest(src(tmp_path / "e"), {}, max_objects=5, compute_arrays=no_arrays)
    assert err.value.code == "source_empty"
    for i in range(3):
        write_tfrecord(tmp_path / "m" / f"{i}.tfrecord", [example(a=1)])
    with pytest.raises(SourceError) as err:
        build_manifest(src(tmp_path / "m"), {}, max_objects=2, compute_arrays=no_arrays)
    assert err.value.code == "too_many_objects"
