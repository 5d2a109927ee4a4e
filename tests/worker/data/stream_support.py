"""Real files for the stream tests: TFRecord shards (tf.train.Example, PNG bytes), Parquet, npz, and a tiny
local-directory Source (the Source protocol of worker/data/sources.py: root, list, fetch, open)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np


@dataclass(frozen=True)
class Obj:
    key: str
    size: int
    etag: str | None = None


class LocalDirSource:
    """Objects are the files under ``root``; ``fetch`` returns the file itself and counts fetches."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.root = root.as_uri() + "/"
        self.fetched: list[str] = []

    def list(self, max_objects: int = 1000) -> list[Obj]:
        files = sorted(p for p in self.dir.rglob("*") if p.is_file())
        return [Obj(p.relative_to(self.dir).as_posix(), p.stat().st_size) for p in files][:max_objects]

    def fetch(self, obj: Obj) -> Path:
        self.fetched.append(obj.key)
        return self.dir / obj.key

    def open(self, obj: Obj) -> BinaryIO:
        return (self.dir / obj.key).open("rb")


def example(features: dict[str, object]) -> bytes:
    import tensorflow as tf

    def feature(value: object) -> tf.train.Feature:
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        array = np.asarray(value).ravel()
        if array.dtype.kind in "iu":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=array.tolist()))
        return tf.train.Feature(float_list=tf.train.FloatList(value=array.tolist()))

    return tf.train.Example(
        features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})
    ).SerializeToString()


def write_tfrecord(path: Path, records: list[bytes], compression: str | None = None) -> None:
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path), options=compression or "") as writer:
        for record in records:
            writer.write(record)


def png(image: np.ndarray) -> bytes:
    import tensorflow as tf

    return tf.io.encode_png(image).numpy()


def manifest(root: Path, fmt: str, keys: list[str], counts: list[int | None], **extra: object) -> dict:
    shards = [
        {"key": k, "size": (root / k).stat().st_size, "etag": None, "records": c}
        for k, c in zip(keys, counts, strict=True)
    ]
    known = all(c is not None for c in counts)
    return {
        "root": root.as_uri() + "/",
        "format": fmt,
        "compression": None,
        "shards": shards,
        "n_samples": sum(counts) if known else None,  # type: ignore[arg-type]
        **extra,
    }
