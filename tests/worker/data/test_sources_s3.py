"""s3:// sources against a real S3 server (SeaweedFS ``weed mini``): list with ETags, fetch into the shard
cache, an object overwritten between listing and fetch (shard_changed), a deleted one (shard_missing)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.storage import Storage
from app.storage.s3 import S3BlobStore
from tests.support.seaweed import Seaweed
from worker.data.cache import ShardCache
from worker.data.errors import SourceError
from worker.data.sources import ObjectInfo, S3Source, open_source


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    server = Seaweed(tmp_path_factory.mktemp("seaweed-data")).start()
    yield server
    server.stop()


@pytest.fixture
def bucket(
    seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[S3BlobStore, str, Settings]:
    """A fresh prefix in the server's bucket, a writer for it, and worker settings pointing at the server."""
    for name, value in seaweed.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    prefix = f"ds-{uuid.uuid4().hex[:10]}"
    writer = S3BlobStore(f"s3://{seaweed.bucket}/{prefix}", endpoint_url=seaweed.endpoint)
    settings = Settings(data_dir=tmp_path / "data", s3_endpoint_url=seaweed.endpoint, s3_region="us-east-1")
    return writer, f"s3://{seaweed.bucket}/{prefix}/", settings


def put(writer: S3BlobStore, tmp_path: Path, key: str, data: bytes) -> None:
    path = tmp_path / f"up-{uuid.uuid4().hex}"
    path.write_bytes(data)
    writer.put_file(key, path)


def test_list_fetch_change_and_missing(bucket: tuple[S3BlobStore, str, Settings], tmp_path: Path) -> None:
    writer, root, settings = bucket
    put(writer, tmp_path, "train/part-1.tfrecord", b"second")
    put(writer, tmp_path, "train/part-0.tfrecord", b"first!")
    put(writer, tmp_path, "train/_SUCCESS", b"")
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 20)
    source = open_source(
        root + "train/", storage=Storage(tmp_path / "data"), settings=settings, allowed=[root], cache=cache
    )
    assert isinstance(source, S3Source) and not source.local
    objs = source.list(max_objects=10)
    assert [(o.key, o.size) for o in objs] == [("part-0.tfrecord", 6), ("part-1.tfrecord", 6)]
    assert all(o.etag for o in objs)
    assert source.cached(objs[0]) is None
    path = source.fetch(objs[0])
    assert path.read_bytes() == b"first!" and source.cached(objs[0]) == path
    with source.open(objs[1]) as fh:
        fh.seek(3)
        assert fh.read() == b"ond"

    put(writer, tmp_path, "train/part-1.tfrecord", b"CHANGED")  # overwritten after listing
    with pytest.raises(SourceError) as err:
        S3Source(root + "train/", settings=settings, cache=cache, retry_delay_s=0.01).fetch(objs[1])
    assert err.value.code == "shard_changed" and "part-1.tfrecord" in err.value.message
    put(writer, tmp_path, "train/part-1.tfrecord", b"sec0nd")  # same size, other bytes: the ETag tells
    with pytest.raises(SourceError) as err:
        source.fetch(objs[1])
    assert err.value.code == "shard_changed"
    assert not any((cache.root / "tmp").iterdir())

    writer.delete_prefix("train/part-0.tfrecord")
    fresh = ShardCache(tmp_path / "cache2", max_bytes=0)
    with pytest.raises(SourceError) as err:
        S3Source(root + "train/", settings=settings, cache=fresh).fetch(objs[0])
    assert err.value.code == "shard_missing"
    with pytest.raises(SourceError) as err:
        S3Source(root + "train/", settings=settings, cache=fresh).fetch(ObjectInfo("nope.tfrecord", 1, '"x"'))
    assert err.value.code == "shard_missing"


def test_limits_single_object_and_allow_list(
    bucket: tuple[S3BlobStore, str, Settings], tmp_path: Path
) -> None:
    writer, root, settings = bucket
    for i in range(3):
        put(writer, tmp_path, f"many/{i}.parquet", b"x" * (i + 1))
    cache = ShardCache(tmp_path / "cache", max_bytes=0)
    with pytest.raises(SourceError) as err:
        S3Source(root + "many/", settings=settings, cache=cache).list(max_objects=2)
    assert err.value.code == "too_many_objects"
    with pytest.raises(SourceError) as err:
        S3Source(root + "nothing/", settings=settings, cache=cache).list(max_objects=2)
    assert err.value.code == "source_empty"
    single = S3Source(root + "many/2.parquet", settings=settings, cache=cache)
    (obj,) = single.list(10)
    assert (obj.key, obj.size) == ("2.parquet", 3)
    assert single.fetch(obj).read_bytes() == b"xxx"
    no_slash = S3Source(root + "many", settings=settings, cache=cache)  # a prefix named without its slash
    assert len(no_slash.list(10)) == 3
    for bad, allowed in (
        (root + "many/", [root + "other/"]),
        (root[:-1] + "-evil/", [root]),
        (root + "../x/", None),
    ):
        with pytest.raises(SourceError) as err:
            S3Source(bad, settings=settings, cache=cache, allowed=allowed)
        assert err.value.code == "source_denied"


def test_wrong_credentials_are_source_denied(
    bucket: tuple[S3BlobStore, str, Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, root, settings = bucket
    put(writer, tmp_path, "x/a.tfrecord", b"a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    with pytest.raises(SourceError) as err:
        S3Source(root + "x/", settings=settings, cache=ShardCache(tmp_path / "c", 0)).list(10)
    assert err.value.code == "source_denied"


def test_parquet_manifest_reads_footers_over_s3(
    bucket: tuple[S3BlobStore, str, Settings], tmp_path: Path
) -> None:
    """Parquet footers are read with ranged GETs through Source.open; nothing is downloaded whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from worker.data.manifest import build_manifest

    writer, root, settings = bucket
    for i in range(2):
        local = tmp_path / f"p{i}.parquet"
        pq.write_table(
            pa.table({"f": pa.array([1.0, 2.0, 3.0][: i + 2]), "label": pa.array([0, 1, 0][: i + 2])}), local
        )
        writer.put_file(f"pq/part-{i}.parquet", local)
    cache = ShardCache(tmp_path / "cache", max_bytes=0)
    source = S3Source(root + "pq/", settings=settings, cache=cache)
    m = build_manifest(source, {"format": "parquet"}, max_objects=10, compute_arrays=lambda m, s, n: {})
    assert [s["records"] for s in m["shards"]] == [2, 3] and m["n_samples"] == 5
    assert (
        all(s["etag"] for s in m["shards"])
        and m["inputs"] == {"x": {"column": "f"}}
        and m["label"] == "label"
    )
    assert cache.total_bytes() == 0


def test_an_image_folder_by_s3_reference_becomes_the_shards_of_the_same_folder_on_disk(
    bucket: tuple[S3BlobStore, str, Settings], tmp_path: Path
) -> None:
    """Registration lists the prefix, reads the images a few at a time and writes the shards a file:// root of
    the same folder gives (same seeded order, same bytes); hidden files and non-images are skipped."""
    import numpy as np
    import tensorflow as tf

    from app.db.tables import DatasetRecord
    from worker.data.stream import StreamedSet
    from worker.datasets import register

    writer, root, settings = bucket
    local = tmp_path / "folder"
    rng = np.random.default_rng(4)
    files: dict[str, bytes] = {}
    for label in ("zebra", "cat"):
        for i in range(5):
            image = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
            files[f"pets/{label}/{i}.png"] = tf.io.encode_png(image).numpy()
    files["pets/cat/odd.jpg"] = tf.io.encode_jpeg(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).numpy()
    files["pets/README.txt"] = b"not an image"
    files["pets/zebra/.DS_Store"] = b"hidden"
    files["pets/zebra/fake.png"] = b"a png by name only"
    for key, data in files.items():
        put(writer, tmp_path, f"images/{key}", data)
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)
    config = settings.model_copy(
        update={"dataset_sources": {"default": [root, f"file://{local}/"]}, "dataset_shard_bytes": 300}
    )
    storage = Storage.from_settings(config, worker=True)
    manifests = {}
    for name, uri in (("s3", root + "images/"), ("file", f"file://{local}/")):
        seen: list[tuple[str, float]] = []
        record = DatasetRecord(
            id=f"ds_{name}img0000000000000", tenant="default", name="pets", format="image_folder", source=uri
        )
        manifests[name] = register(record, config, storage, lambda status, f, seen=seen: seen.append((status, f)))
        assert seen[0] == ("converting", 0.0) and seen[-1] == ("converting", 1.0)
    s3, file = manifests["s3"], manifests["file"]
    assert s3["class_names"] == file["class_names"] == ["cat", "zebra"]
    assert s3["n_samples"] == file["n_samples"] == 11  # 10 PNGs and the JPEG; README and fake.png skipped
    assert len(s3["shards"]) > 1 and [s["records"] for s in s3["shards"]] == [s["records"] for s in file["shards"]]
    read = {
        name: StreamedSet(m, open_source(m["root"], storage=storage, settings=config, allowed=None)).take(20)
        for name, m in manifests.items()
    }
    np.testing.assert_array_equal(read["s3"]["x"], read["file"]["x"])
    np.testing.assert_array_equal(read["s3"]["y"], read["file"]["y"])
    assert sorted(read["s3"]["y"].tolist()) == [0] * 6 + [1] * 5


def test_an_image_rewritten_after_listing_fails_the_conversion_naming_it(
    bucket: tuple[S3BlobStore, str, Settings], tmp_path: Path
) -> None:
    import tensorflow as tf

    from worker.data.convert import convert_images, image_listing

    writer, root, settings = bucket
    image = tf.io.encode_png(tf.zeros((4, 4, 1), tf.uint8)).numpy()
    for key in ("a/0.png", "a/1.png", "b/0.png"):
        put(writer, tmp_path, f"imgs/{key}", image)
    source = S3Source(root + "imgs/", settings=settings, cache=ShardCache(tmp_path / "c", 0), retry_delay_s=0.01)
    by_key = {obj.key: obj for obj in source.list(10)}
    listing = image_listing(list(by_key))
    assert (listing.classes, listing.prefix) == (["a", "b"], "")
    put(writer, tmp_path, "imgs/b/0.png", image + b"rewritten")  # after the listing, before the read
    with pytest.raises(SourceError) as err:
        convert_images(listing, lambda rels: source.read_many(by_key[r] for r in rels), tmp_path / "out")
    assert err.value.code == "shard_changed" and "b/0.png" in err.value.message
