"""file:// and blob: sources on real files: listing, containment, symlink escapes, change detection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import pytest

from app.config import Settings
from app.storage import Storage
from app.storage.base import BlobInfo
from app.storage.local import LocalBlobStore
from worker.data.cache import ShardCache
from worker.data.errors import SourceError
from worker.data.sources import BlobSource, FileSource, ObjectInfo, open_source


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "allowed" / "set"
    (root / "sub").mkdir(parents=True)
    (root / "b.tfrecord").write_bytes(b"bb")
    (root / "a.tfrecord").write_bytes(b"a")
    (root / "sub" / "c.tfrecord").write_bytes(b"ccc")
    (root / ".DS_Store").write_bytes(b"x")
    (root / "_SUCCESS").write_bytes(b"")
    return root


def uri(path: Path) -> str:
    return path.as_uri() + ("/" if path.is_dir() else "")


def test_file_listing_is_recursive_sorted_and_skips_markers(tree: Path) -> None:
    src = FileSource(uri(tree), allowed=[uri(tree.parent)])
    objs = src.list(max_objects=10)
    assert [(o.key, o.size) for o in objs] == [("a.tfrecord", 1), ("b.tfrecord", 2), ("sub/c.tfrecord", 3)]
    assert src.fetch(objs[2]).read_bytes() == b"ccc"
    with src.open(objs[0]) as fh:
        assert fh.read() == b"a"


def test_file_single_object_root(tree: Path) -> None:
    src = FileSource(uri(tree / "b.tfrecord"), allowed=None)
    (obj,) = src.list(5)
    assert obj.key == "b.tfrecord"
    assert src.fetch(obj) == tree / "b.tfrecord"


def test_file_limits(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        FileSource(uri(tree), allowed=None).list(max_objects=2)
    assert err.value.code == "too_many_objects"
    assert "SECATEURS_DATASET_MAX_OBJECTS=2" in err.value.message
    empty = tmp_path / "empty"
    (empty / "deep").mkdir(parents=True)
    with pytest.raises(SourceError) as err:
        FileSource(uri(empty), allowed=None).list(10)
    assert err.value.code == "source_empty"


def test_file_outside_allowed_and_dotdot_refused(tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SourceError) as err:
        FileSource(uri(other), allowed=[uri(tree.parent)])
    assert err.value.code == "source_denied"
    with pytest.raises(SourceError) as err:
        FileSource(f"file://{tree}/../../other/", allowed=[uri(tmp_path)])
    assert err.value.code == "source_denied"
    with pytest.raises(SourceError) as err:  # a sibling whose name merely starts with the allowed prefix
        (tmp_path / "allowed-evil").mkdir()
        FileSource(uri(tmp_path / "allowed-evil"), allowed=[str((tmp_path / "allowed").as_uri())])
    assert err.value.code == "source_denied"


def test_symlinks_leaving_the_root_are_refused(tree: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.tfrecord").write_bytes(b"s")
    os.symlink(secret / "key.tfrecord", tree / "leak.tfrecord")
    with pytest.raises(SourceError) as err:
        FileSource(uri(tree), allowed=[uri(tree.parent)]).list(10)
    assert err.value.code == "source_denied"
    assert "leak.tfrecord" in err.value.message
    os.unlink(tree / "leak.tfrecord")
    os.symlink(secret, tree / "linkdir")
    with pytest.raises(SourceError) as err:  # no allow-list: the root itself bounds the links
        FileSource(uri(tree), allowed=None).list(10)
    assert err.value.code == "source_denied"
    os.unlink(tree / "linkdir")
    # a root that is itself a link out of the allowed prefix
    os.symlink(secret, tree.parent / "sneaky")
    with pytest.raises(SourceError) as err:
        FileSource(uri(tree.parent / "sneaky"), allowed=[uri(tree.parent)])
    assert err.value.code == "source_denied"
    # a link inside the root to a file inside the root is fine
    os.symlink(tree / "a.tfrecord", tree / "z.tfrecord")
    keys = [o.key for o in FileSource(uri(tree), allowed=None).list(10)]
    assert "z.tfrecord" in keys


def test_file_fetch_detects_change_and_missing(tree: Path) -> None:
    src = FileSource(uri(tree), allowed=None)
    objs = {o.key: o for o in src.list(10)}
    (tree / "a.tfrecord").write_bytes(b"changed")
    with pytest.raises(SourceError) as err:
        src.fetch(objs["a.tfrecord"])
    assert err.value.code == "shard_changed" and "a.tfrecord" in err.value.message
    (tree / "b.tfrecord").unlink()
    with pytest.raises(SourceError) as err:
        src.fetch(objs["b.tfrecord"])
    assert err.value.code == "shard_missing"
    with pytest.raises(SourceError) as err:
        src.fetch(ObjectInfo("../allowed/set/a.tfrecord", 1))
    assert err.value.code == "source_denied"


def test_blob_source_local_and_remote_like(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "data")
    shard_dir = storage.root / "datasets" / "d1" / "shards"
    shard_dir.mkdir(parents=True)
    (shard_dir / "part-00001.tfrecord").write_bytes(b"22")
    (shard_dir / "part-00000.tfrecord").write_bytes(b"1")
    settings = Settings(data_dir=tmp_path / "data")
    src = open_source("blob:datasets/d1/shards/", storage=storage, settings=settings, allowed=[])
    objs = src.list(10)
    assert [o.key for o in objs] == ["part-00000.tfrecord", "part-00001.tfrecord"]
    assert src.local and src.fetch(objs[1]) == shard_dir / "part-00001.tfrecord"
    single = open_source(
        "blob:datasets/d1/shards/part-00001.tfrecord", storage=storage, settings=settings, allowed=None
    )
    assert [o.key for o in single.list(10)] == ["part-00001.tfrecord"]

    # a store elsewhere than the data directory: fetched through the cache
    other = LocalBlobStore(tmp_path / "elsewhere")

    class Remote:  # the blob-store protocol over another directory, as a remote store would behave
        url = "test://"

        def list(self, prefix: str) -> list[BlobInfo]:
            return other.list(prefix)

        def head(self, key: str) -> BlobInfo:
            return other.head(key)

        def open(self, key: str) -> BinaryIO:
            return other.open(key)

    (tmp_path / "elsewhere" / "datasets" / "d2").mkdir(parents=True)
    (tmp_path / "elsewhere" / "datasets" / "d2" / "upload.parquet").write_bytes(b"PAR1")
    remote_storage = Storage(tmp_path / "data2", blobs=Remote())  # type: ignore[arg-type]
    cache = ShardCache(tmp_path / "cache", max_bytes=0)
    remote = BlobSource("blob:datasets/d2/upload.parquet", storage=remote_storage, cache=cache)
    (obj,) = remote.list(10)
    assert not remote.local and remote.cached(obj) is None
    path = remote.fetch(obj)
    assert path.read_bytes() == b"PAR1" and path.parent == cache.root
    assert remote.cached(obj) == path
    with pytest.raises(SourceError) as err:
        remote.fetch(ObjectInfo("gone.parquet", 3))
    assert err.value.code == "shard_missing"
    for bad in ("blob:models/x/upload.zip", "blob:datasets/../x", "blob:datasets/d1/../../etc"):
        with pytest.raises(SourceError):
            BlobSource(bad, storage=storage, cache=None)


def test_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        open_source(
            "gs://b/p/", storage=Storage(tmp_path), settings=Settings(data_dir=tmp_path), allowed=None
        )
    assert err.value.code == "source_invalid"


def test_cache_eviction_is_lru_and_bounded(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path / "c", max_bytes=10, grace_s=0)
    paths = []
    for i in range(4):
        obj = ObjectInfo(f"k{i}.tfrecord", 4, f"e{i}")
        paths.append(cache.get("s3://b/p/", obj, lambda out, i=i: out.write(bytes([i]) * 4)))
        os.utime(paths[-1], (1000 + i, 1000 + i))  # deterministic use order
    assert cache.total_bytes() <= 10
    assert paths[-1].exists() and not paths[0].exists()
    assert paths[-1].suffix == ".tfrecord"
    with pytest.raises(SourceError) as err:  # a short download is refused, nothing is left behind
        cache.get("s3://b/p/", ObjectInfo("short", 5, "x"), lambda out: out.write(b"abc"))
    assert err.value.code == "shard_changed"
    assert not any(cache._tmp.iterdir())
