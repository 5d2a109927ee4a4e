"""StreamedSet over real TFRecord, Parquet and npz files: values, shapes, seeded order, splits, bad records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.worker.data.stream_support import LocalDirSource, example, manifest, png, write_tfrecord
from worker.data import split
from worker.data.augment import build_augmenter
from worker.data.errors import DescriptionError, RecordError
from worker.data.stream import StreamedSet, sample_arrays

pytestmark = pytest.mark.tf

SIZES = [10, 7, 5]  # records per shard; 22 in all, record ids 0..21 in shard order
FEATURES = {
    "image": {"kind": "fixed", "dtype": "string", "shape": []},
    "vec": {"kind": "fixed", "dtype": "float32", "shape": [3]},
    "tags": {"kind": "var_len", "dtype": "int64", "shape": [2], "default": -1},
    "blob": {"kind": "fixed", "dtype": "string", "shape": []},
    "label": {"kind": "fixed", "dtype": "int64", "shape": []},
}
IMAGE_INPUT = {"x": {"feature": "image", "decode": {"image": "png", "channels": 1}}}


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(n, 6, 5, 1), dtype=np.uint8)


def _record(i: int, image: np.ndarray) -> bytes:
    blob = tf.io.serialize_tensor(tf.fill([2, 2], float(i))).numpy()
    return example(
        {"image": png(image), "vec": np.array([i, i + 0.5, -i], np.float32), "tags": np.arange(i % 3, dtype=np.int64),
         "blob": blob, "label": np.int64(i)}
    )  # fmt: skip


@pytest.fixture(scope="module")
def tf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tfrecords")
    images, start = _images(sum(SIZES)), 0
    for shard, size in enumerate(SIZES):
        ids = range(start, start + size)
        write_tfrecord(root / f"part-{shard:05d}.tfrecord", [_record(i, images[i]) for i in ids])
        start += size
    return root


def _tf_manifest(root: Path, inputs: dict = IMAGE_INPUT, **extra: object) -> dict:
    keys = [f"part-{s:05d}.tfrecord" for s in range(len(SIZES))]
    return manifest(
        root, "tfrecord", keys, list(SIZES), features=FEATURES, inputs=inputs, label="label", **extra
    )


def _collect(ds: tf.data.Dataset) -> tuple[dict[str, np.ndarray], np.ndarray]:
    xs: dict[str, list[np.ndarray]] = {}
    ys = []
    for x, y in ds.as_numpy_iterator():
        for k, v in x.items():
            xs.setdefault(k, []).append(v)
        ys.append(y)
    return {k: np.concatenate(v) for k, v in xs.items()}, np.concatenate(ys)


def test_tfrecord_batches_match_the_source_in_order(tf_dir: Path) -> None:
    source = LocalDirSource(tf_dir)
    ds = StreamedSet(_tf_manifest(tf_dir), source).dataset(4)
    shapes = [(x["x"].shape, y.shape) for x, y in ds.as_numpy_iterator()]
    assert shapes[0] == ((4, 6, 5, 1), (4,)) and shapes[-1] == ((2, 6, 5, 1), (2,))  # 22 = 5 * 4 + 2
    x, y = _collect(ds)
    assert x["x"].dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(y, np.arange(22))
    np.testing.assert_array_equal(x["x"], _images(22).astype(np.float32))
    assert source.fetched[:3] == [f"part-{s:05d}.tfrecord" for s in range(3)]  # fetched one shard at a time


def test_multi_input_numeric_varlen_and_serialized_tensor(tf_dir: Path) -> None:
    inputs = {
        "vec": {"feature": "vec"},
        "tags": {"feature": "tags"},
        "blob": {"feature": "blob", "decode": {"tensor": "float32", "shape": [2, 2]}},
    }
    specs = {"vec": {"shape": [None, 3], "dtype": "float64"}}
    x, y = _collect(
        StreamedSet(_tf_manifest(tf_dir, inputs), LocalDirSource(tf_dir), input_specs=specs).dataset(8)
    )
    ids = np.arange(22)
    assert x["vec"].dtype == np.float64  # cast to the model's dtype
    np.testing.assert_array_equal(x["vec"], np.stack([ids, ids + 0.5, -ids], 1))
    want_tags = np.array([[0, 1][: i % 3] + [-1] * (2 - i % 3) for i in ids])  # densified with the default
    np.testing.assert_array_equal(x["tags"], want_tags)
    np.testing.assert_array_equal(
        x["blob"], np.broadcast_to(ids[:, None, None], (22, 2, 2)).astype(np.float32)
    )
    np.testing.assert_array_equal(y, ids)
    # a label stored as serialized tensors (convert_npz's float64 labels): label_decode
    relabelled = _tf_manifest(tf_dir, {"x": {"feature": "vec"}})
    relabelled.update(label="blob", label_decode={"tensor": "float32", "shape": [2, 2]})
    _, y = _collect(StreamedSet(relabelled, LocalDirSource(tf_dir)).dataset(8))
    assert y.shape == (22, 2, 2) and y[5, 1, 1] == 5.0


def test_shuffle_is_seeded_per_epoch_and_reads_everything(tf_dir: Path) -> None:
    streamed = StreamedSet(_tf_manifest(tf_dir), LocalDirSource(tf_dir))

    def order(seed: int, epoch: int) -> np.ndarray:
        return _collect(streamed.dataset(5, shuffle=True, seed=seed, epoch=epoch, shuffle_buffer=8))[1]

    first = order(1, 0)
    np.testing.assert_array_equal(first, order(1, 0))
    assert not np.array_equal(first, order(1, 1))
    assert not np.array_equal(first, order(2, 0))
    np.testing.assert_array_equal(np.sort(first), np.arange(22))


def test_keep_splits_partition_the_records(tf_dir: Path) -> None:
    streamed = StreamedSet(_tf_manifest(tf_dir), LocalDirSource(tf_dir))
    held = set(_collect(streamed.dataset(4, keep=split.keep_fraction(0.0, 0.3, seed=5)))[1].tolist())
    rest = set(
        _collect(streamed.dataset(4, keep=split.drop_fraction(0.0, 0.3, seed=5), shuffle=True))[1].tolist()
    )
    assert held and rest and not held & rest and held | rest == set(range(22))
    # the same buckets as the NumPy twin of the hash
    shard_of = np.repeat(np.arange(3), SIZES)
    record_of = np.concatenate([np.arange(s) for s in SIZES])
    buckets = split.record_bucket_np(shard_of, record_of, 5)
    assert held == set(np.flatnonzero(buckets < 0.3).tolist())
    # with_hash yields each record's bucket
    _, y, bucket = next(iter(streamed.dataset(22, with_hash=True, keep=split.keep_fraction(0, 1, seed=0))))
    np.testing.assert_allclose(bucket.numpy(), split.record_bucket_np(shard_of, record_of, 0)[y.numpy()])


def test_shard_folds_fetch_only_their_shards(tf_dir: Path) -> None:
    source = LocalDirSource(tf_dir)
    streamed = StreamedSet(_tf_manifest(tf_dir), source)
    seen: list[set[int]] = []
    for _train, held in split.shard_folds(3, 3, seed=1):
        source.fetched.clear()
        seen.append(set(_collect(streamed.dataset(8, keep=held))[1].tolist()))
        assert len(set(source.fetched)) == 1
    assert sorted(len(s) for s in seen) == sorted(SIZES) and set().union(*seen) == set(range(22))


def test_count_and_part_agree_with_the_records_a_pass_reads(tf_dir: Path) -> None:
    source = LocalDirSource(tf_dir)
    streamed = StreamedSet(_tf_manifest(tf_dir), source)
    hashed = [sub for pair in split.shard_folds(3, 4, seed=9) for sub in pair]  # 3 shards < 4: by record hash
    counts = streamed.count(hashed)
    uncounted = StreamedSet(_tf_manifest(tf_dir) | {"n_samples": None}, source)
    uncounted.shards = [dict(s, records=None) for s in uncounted.shards]
    by_shard = split.shard_folds(3, 3, seed=1)
    source.fetched.clear()
    held_sizes = [sum(SIZES[i] for i in held.shards or ()) for _, held in by_shard]
    assert streamed.count([s for pair in by_shard for s in pair]) == [
        n for size in held_sizes for n in (sum(SIZES) - size, size)
    ]
    assert not source.fetched  # whole shards of a counted manifest: no read
    assert uncounted.count([s for pair in by_shard for s in pair]) == streamed.count(
        [s for pair in by_shard for s in pair]
    )
    for (train, held), (n_train, n_held) in zip(
        split.shard_folds(3, 4, seed=9), zip(counts[::2], counts[1::2], strict=True), strict=True
    ):
        assert n_train + n_held == sum(SIZES)
        part = streamed.part(held, n_held)
        assert part.n == n_held == len(_collect(part.dataset(5))[1])
        assert len(part.take(100)["y"]) == n_held
        assert set(part.take(100)["y"].tolist()).isdisjoint(streamed.part(train).take(100)["y"].tolist())
    assert sum(counts[1::2]) == sum(SIZES)  # every record held out exactly once


def test_take_returns_npz_style_arrays(tf_dir: Path) -> None:
    arrays = StreamedSet(_tf_manifest(tf_dir), LocalDirSource(tf_dir)).take(13)
    assert sorted(arrays) == ["x", "y"] and arrays["x"].shape == (13, 6, 5, 1)
    np.testing.assert_array_equal(arrays["y"], np.arange(13))
    named = {"img": IMAGE_INPUT["x"], "vec": {"feature": "vec"}}
    multi = StreamedSet(_tf_manifest(tf_dir, named), LocalDirSource(tf_dir)).take(30)
    assert sorted(multi) == ["x.img", "x.vec", "y"] and multi["x.vec"].shape == (22, 3)


def test_images_resized_to_the_model_input(tf_dir: Path) -> None:
    arrays = {"x": {"shape": [22, 6, 5, 1], "dtype": "float32"}, "y": {"shape": [22], "dtype": "int64"}}
    specs = {"image": {"shape": [None, 8, 8, 1], "dtype": "float32"}}
    streamed = StreamedSet(_tf_manifest(tf_dir, arrays=arrays), LocalDirSource(tf_dir), input_specs=specs)
    x, _ = next(iter(streamed.dataset(3)))
    assert x["x"].shape == (3, 8, 8, 1) and x["x"].dtype == tf.float32
    assert any("resized" in note and "8x8" in note for note in streamed.notes)


def test_sample_arrays(tf_dir: Path) -> None:
    arrays = sample_arrays(_tf_manifest(tf_dir), LocalDirSource(tf_dir), n=4)
    assert arrays == {
        "x": {"shape": [22, 6, 5, 1], "dtype": "float32"},
        "y": {"shape": [22], "dtype": "int64"},
    }


def test_augmentation_changes_training_batches_not_shapes(tf_dir: Path) -> None:
    specs = {"x": {"shape": [None, 6, 5, 1], "dtype": "float32"}}  # a static size: random_crop resizes back
    streamed = StreamedSet(_tf_manifest(tf_dir), LocalDirSource(tf_dir), input_specs=specs)
    plain = _collect(streamed.dataset(22))[0]["x"]
    augment = build_augmenter(
        [{"kind": "random_flip", "mode": "horizontal"}, {"kind": "random_crop", "height": 4, "width": 4}],
        seed=3,
    )
    augmented = _collect(streamed.dataset(22, augment=augment))[0]["x"]
    assert augmented.shape == plain.shape and not np.array_equal(augmented, plain)


# --- bad records -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    images = _images(12)
    good = [_record(i, images[i]) for i in range(12)]
    write_tfrecord(root / "a.tfrecord", good[:6])
    broken = example({"image": b"not a png", "vec": np.zeros(3, np.float32), "tags": np.zeros(0, np.int64),
                      "blob": b"", "label": np.int64(99)})  # fmt: skip
    write_tfrecord(root / "b.tfrecord", [*good[6:9], broken, *good[9:]])
    return root


def _bad_manifest(root: Path) -> dict:
    return manifest(
        root,
        "tfrecord",
        ["a.tfrecord", "b.tfrecord"],
        [6, 7],
        features=FEATURES,
        inputs=IMAGE_INPUT,
        label="label",
    )


def test_bad_record_fails_naming_shard_and_index(bad_dir: Path) -> None:
    streamed = StreamedSet(_bad_manifest(bad_dir), LocalDirSource(bad_dir))
    with pytest.raises(RecordError) as caught:
        list(streamed.batches(4))
    assert "'b.tfrecord' record 3" in caught.value.message and caught.value.code == "bad_image"
    assert (caught.value.shard, caught.value.index) == ("b.tfrecord", 3)


def test_bad_record_skipped_and_counted(bad_dir: Path) -> None:
    streamed = StreamedSet(_bad_manifest(bad_dir), LocalDirSource(bad_dir), on_bad_record="skip")
    labels = np.concatenate([y.numpy() for _, y in streamed.batches(4, shuffle=True, seed=1)])
    assert sorted(labels.tolist()) == list(range(12)) and streamed.skipped == 1


def test_damaged_shard_fails_or_counts_the_lost_records(tmp_path: Path, bad_dir: Path) -> None:
    data = (bad_dir / "a.tfrecord").read_bytes()
    (tmp_path / "a.tfrecord").write_bytes(data[: len(data) - 40])  # the last record is cut short
    write_tfrecord(tmp_path / "b.tfrecord", [])
    m = manifest(
        tmp_path,
        "tfrecord",
        ["a.tfrecord", "b.tfrecord"],
        [6, 0],
        features=FEATURES,
        inputs=IMAGE_INPUT,
        label="label",
    )
    with pytest.raises(RecordError, match=r"'a.tfrecord' record 5 .*damaged"):
        list(StreamedSet(m, LocalDirSource(tmp_path)).batches(4))
    skipping = StreamedSet(m, LocalDirSource(tmp_path), on_bad_record="skip")
    assert sum(len(y) for _, y in skipping.batches(4)) == 5 and skipping.skipped == 1


def test_inconsistent_description_is_refused(tf_dir: Path) -> None:
    with pytest.raises(DescriptionError, match="'nope'"):
        StreamedSet(_tf_manifest(tf_dir, {"x": {"feature": "nope"}}), LocalDirSource(tf_dir))
    with pytest.raises(DescriptionError, match="string"):
        StreamedSet(
            _tf_manifest(tf_dir, {"x": {"feature": "vec", "decode": {"image": "png"}}}),
            LocalDirSource(tf_dir),
        )


def test_serialized_tensors_in_any_encoding_read_as_parse_tensor_reads_them(tmp_path: Path) -> None:
    """A batch of ``serialize_tensor`` bytes is decoded at once; a batch holding another encoding of the same
    values (typed ``float_val`` fields) falls back to the per-record parse, and a tensor of another shape
    still fails naming its record."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    def typed(values: np.ndarray) -> bytes:
        shape = tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in values.shape]
        )
        proto = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=values.ravel().tolist()
        )
        return proto.SerializeToString()

    values = np.arange(12 * 4, dtype=np.float32).reshape(12, 2, 2)
    blobs = [tf.io.serialize_tensor(v).numpy() for v in values]
    blobs[9] = typed(values[9])  # the third batch of 4 mixes both encodings
    write_tfrecord(
        tmp_path / "a.tfrecord", [example({"blob": b, "label": np.int64(i)}) for i, b in enumerate(blobs)]
    )
    features = {"blob": FEATURES["blob"], "label": FEATURES["label"]}
    inputs = {"x": {"feature": "blob", "decode": {"tensor": "float32", "shape": [2, 2]}}}
    m = manifest(tmp_path, "tfrecord", ["a.tfrecord"], [12], features=features, inputs=inputs, label="label")
    x, y = _collect(StreamedSet(m, LocalDirSource(tmp_path)).dataset(4))
    np.testing.assert_array_equal(x["x"], values)
    np.testing.assert_array_equal(y, np.arange(12))

    blobs[6] = tf.io.serialize_tensor(tf.zeros([3], tf.float32)).numpy()
    write_tfrecord(
        tmp_path / "a.tfrecord", [example({"blob": b, "label": np.int64(i)}) for i, b in enumerate(blobs)]
    )
    m["shards"][0]["size"] = (tmp_path / "a.tfrecord").stat().st_size
    with pytest.raises(RecordError) as caught:
        list(StreamedSet(m, LocalDirSource(tmp_path)).batches(4))
    assert caught.value.index == 6
