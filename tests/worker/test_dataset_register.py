"""Registration on the worker (``worker.datasets.register``): what each kind of upload or reference becomes, and
the worker's own checks of a reference (the API is not the only writer of records).

Real files (numpy, PIL-free PNGs from TensorFlow) in a real local blob store; the manifests are read back by the
real stream reader.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from app.config import Settings
from app.db.tables import DatasetRecord
from app.storage import Storage
from worker.data.errors import DataError
from worker.data.sources import open_source
from worker.data.stream import StreamedSet
from worker.datasets import register

pytestmark = pytest.mark.tf


def _setup(tmp_path: Path, **settings: object) -> tuple[Settings, Storage]:
    config = Settings(data_dir=tmp_path / "data", **settings)  # type: ignore[arg-type]
    return config, Storage.from_settings(config, worker=True)


def _upload(storage: Storage, dataset_id: str, ext: str, data: bytes) -> None:
    path = storage.tmp_dir / f"up{ext}"
    path.write_bytes(data)
    storage.publish(storage.dataset_upload_key(dataset_id, ext), path)


def _progress() -> tuple[list[tuple[str, float]], object]:
    seen: list[tuple[str, float]] = []
    return seen, lambda status, fraction: seen.append((status, fraction))


def test_an_image_folder_archive_becomes_shards_with_sorted_class_names(tmp_path: Path) -> None:
    config, storage = _setup(tmp_path)
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buffer, "w") as zf:
        for label in ("zebra", "cat"):
            for i in range(3):
                image = rng.integers(0, 255, (6, 5, 1), dtype=np.uint8)
                zf.writestr(f"pets/{label}/{i}.png", tf.io.encode_png(image).numpy())
        zf.writestr("pets/README.txt", b"not an image")
    _upload(storage, "ds_images0000000000000", ".zip", buffer.getvalue())
    record = DatasetRecord(id="ds_images0000000000000", tenant="default", name="pets", format="image_folder")
    seen, report = _progress()
    manifest = register(record, config, storage, report)
    assert manifest["class_names"] == ["cat", "zebra"]
    assert manifest["n_samples"] == 6
    assert manifest["root"].startswith("blob:datasets/ds_images0000000000000/shards/")
    assert ("converting", 0.0) in seen
    source = open_source(manifest["root"], storage=storage, settings=config, allowed=None)
    arrays = StreamedSet(manifest, source).take(10)
    assert arrays["x"].shape == (6, 6, 5, 1) and sorted(arrays["y"].tolist()) == [0, 0, 0, 1, 1, 1]


def test_a_large_npz_is_converted_and_reads_back_bit_exact(tmp_path: Path) -> None:
    config, storage = _setup(tmp_path, convert_above_bytes=1)
    x = np.random.default_rng(1).standard_normal((40, 3, 2)).astype(np.float32)
    y = np.arange(40, dtype=np.int64) % 4
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    _upload(storage, "ds_npz000000000000000", ".npz", buffer.getvalue())
    record = DatasetRecord(id="ds_npz000000000000000", tenant="default", name="big", format="npz")
    _, report = _progress()
    manifest = register(record, config, storage, report)
    assert manifest["n_samples"] == 40 and manifest["format"] == "tfrecord"
    source = open_source(manifest["root"], storage=storage, settings=config, allowed=None)
    back = StreamedSet(manifest, source).take(40)
    np.testing.assert_array_equal(back["x"], x)
    np.testing.assert_array_equal(back["y"], y)


def test_a_reference_is_checked_again_on_the_worker(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "empty").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "data.tfrecord").write_bytes(b"")
    (allowed / "escape").symlink_to(outside)
    config, storage = _setup(tmp_path, dataset_sources=f'{{"default": ["file://{allowed}/"]}}')

    def reference(source: str) -> DatasetRecord:
        return DatasetRecord(id="ds_ref000000000000000", tenant="default", name="r", format="tfrecord", source=source)

    _, report = _progress()
    with pytest.raises(DataError) as empty:
        register(reference(f"file://{allowed}/empty/"), config, storage, report)
    assert empty.value.code == "source_empty"
    with pytest.raises(DataError) as escape:  # a symlink out of the allowed prefix
        register(reference(f"file://{allowed}/escape/"), config, storage, report)
    assert escape.value.code == "source_denied"
    with pytest.raises(DataError) as other:  # another tenant's (or no) prefix: denied whatever the API said
        register(reference(f"file://{outside}/"), config, storage, report)
    assert other.value.code == "source_denied"


def test_a_dataset_held_in_memory_counts_its_skipped_records_in_the_notes(tmp_path: Path) -> None:
    from tests.worker.data.stream_support import example, png, write_tfrecord
    from worker.datasets import open_for_job

    root = tmp_path / "shards"
    images = np.random.default_rng(3).integers(0, 256, (5, 6, 5, 1), dtype=np.uint8)
    records = [example({"image": png(images[i]), "label": np.int64(i)}) for i in range(5)]
    records.insert(2, example({"image": b"not a png", "label": np.int64(9)}))
    write_tfrecord(root / "a.tfrecord", records)
    config, storage = _setup(tmp_path)
    description = {
        "format": "tfrecord",
        "features": {
            "image": {"kind": "fixed", "dtype": "string", "shape": []},
            "label": {"kind": "fixed", "dtype": "int64", "shape": []},
        },
        "inputs": {"x": {"feature": "image", "decode": {"image": "png", "channels": 1}}},
        "label": "label",
    }
    source = open_source(f"file://{root}/", storage=storage, settings=config, allowed=None)
    from worker.data.manifest import build_manifest

    manifest = build_manifest(source, description, max_objects=10, sample_records=2)
    record = DatasetRecord(id="ds_skip00000000000000", tenant="default", name="s", format="tfrecord", manifest=manifest)
    arrays, notes = open_for_job(record, storage, config, on_bad_record="skip", input_specs=None)
    assert isinstance(arrays, dict) and sorted(arrays["y"].tolist()) == [0, 1, 2, 3, 4]
    assert any("1 records of dataset ds_skip00000000000000 could not be read" in n for n in notes), notes
