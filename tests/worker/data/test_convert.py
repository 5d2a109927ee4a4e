"""Conversion on real files: an image-folder archive (PNG + JPEG written by PIL, a stray .txt) into TFRecord
shards, archive safety and layout detection, and an .npz streamed into shards read back bit-exactly."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from worker.data.convert import convert_image_folder, convert_npz, detect_layout, unpack_archive
from worker.data.errors import SourceError
from worker.data.manifest import build_manifest, count_records
from worker.data.sources import FileSource

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.tf


def image_bytes(fmt: str, value: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    shape = (6, 5, 3) if mode == "RGB" else (6, 5)
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, value, np.uint8)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def parse(path: Path) -> list[dict[str, object]]:
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "path": tf.io.FixedLenFeature([], tf.string),
    }
    return [
        {k: v.numpy() for k, v in tf.io.parse_single_example(r, spec).items()}
        for r in tf.data.TFRecordDataset(str(path))
    ]


def test_image_folder_archive_to_shards(tmp_path: Path) -> None:
    files = {}
    for i in range(6):
        files[f"pets/dog/d{i}.png"] = image_bytes("PNG", 10 + i)
        files[f"pets/cat/c{i}.JPG"] = image_bytes("JPEG", 100 + i)
    files["pets/cat/notes.txt"] = b"not an image"
    files["pets/dog/fake.png"] = b"not a png at all"
    archive = make_tar(tmp_path / "up.tar.gz", files)
    out = unpack_archive(archive, tmp_path / "unpacked")
    assert len(out) == len(files)
    layout = detect_layout(tmp_path / "unpacked")
    assert layout.kind == "image_folder" and layout.root == tmp_path / "unpacked" / "pets"
    progress: list[float] = []
    conv = convert_image_folder(
        layout.root, tmp_path / "shards", shard_bytes=2_000, seed=3, report=progress.append
    )
    assert conv.class_names == ["cat", "dog"] and conv.n == 12 and conv.skipped == 2 and conv.channels == 3
    assert len(conv.shards) > 1 and sum(conv.records) == 12
    assert [count_records(p) for p in conv.shards] == conv.records
    assert progress[-1] == 1.0
    records = [r for p in conv.shards for r in parse(p)]
    by_path = {r["path"].decode(): r for r in records}
    assert set(by_path) == {
        k.removeprefix("pets/") for k in files if k.endswith(("png", "JPG")) and "fake" not in k
    }
    assert by_path["cat/c0.JPG"]["label"] == 0 and by_path["dog/d3.png"]["label"] == 1
    assert by_path["dog/d3.png"]["image"] == files["pets/dog/d3.png"]  # stored as uploaded
    first_shard_labels = {r["label"] for r in parse(conv.shards[0])}
    assert len(first_shard_labels) == 2 or len(parse(conv.shards[0])) == 1  # classes mixed across shards
    again = convert_image_folder(layout.root, tmp_path / "shards2", shard_bytes=2_000, seed=3)
    assert [p.read_bytes() for p in again.shards] == [
        p.read_bytes() for p in conv.shards
    ]  # seeded: reproducible

    # the shards' manifest, built from the conversion's description (image decode given)
    source = FileSource((tmp_path / "shards").as_uri() + "/", allowed=None)
    m = build_manifest(source, conv.description, max_objects=100, compute_arrays=lambda m, s, n: {})
    assert m["n_samples"] == 12 and m["class_names"] == ["cat", "dog"] and m["label"] == "label"
    assert m["inputs"] == {"x": {"feature": "image", "decode": {"image": "auto", "channels": 3}}}


def test_grayscale_channels_and_zip(tmp_path: Path) -> None:
    archive = tmp_path / "g.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            zf.writestr(f"a/{i}.png", image_bytes("PNG", i, mode="L"))
            zf.writestr(f"b/{i}.jpeg", image_bytes("JPEG", i, mode="L"))
    unpack_archive(archive, tmp_path / "u")
    conv = convert_image_folder(detect_layout(tmp_path / "u").root, tmp_path / "s")
    assert conv.channels == 1 and conv.n == 6 and len(conv.shards) == 1


def test_unsafe_archives_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    make_tar(evil, {"../escape.png": b"x"})
    with pytest.raises(SourceError) as err:
        unpack_archive(evil, tmp_path / "o1")
    assert err.value.code == "archive_invalid" and not any((tmp_path / "o1").iterdir())
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:  # plain (uncompressed) tar with a symlink member
        info = tarfile.TarInfo("a/x.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(SourceError) as err:
        unpack_archive(link, tmp_path / "o2")
    assert err.value.code == "archive_invalid" and "link" in err.value.message
    (tmp_path / "junk.bin").write_bytes(b"hello")
    with pytest.raises(SourceError):
        unpack_archive(tmp_path / "junk.bin", tmp_path / "o3")


def test_layout_detection(tmp_path: Path) -> None:
    (tmp_path / "t" / "x").mkdir(parents=True)
    (tmp_path / "t" / "x" / "part-0.tfrecord").write_bytes(b"")
    (tmp_path / "t" / "._part-0.tfrecord").write_bytes(b"")
    assert detect_layout(tmp_path / "t").kind == "tfrecord"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.parquet").write_bytes(b"")
    assert detect_layout(tmp_path / "p").kind == "parquet"
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "readme.txt").write_bytes(b"")
    with pytest.raises(SourceError) as err:
        detect_layout(tmp_path / "n")
    assert err.value.code == "archive_unrecognised" and "readme.txt" in err.value.message


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip_is_bit_exact(tmp_path: Path, compressed: bool) -> None:
    rng = np.random.default_rng(1)
    arrays = {
        "x.image": rng.standard_normal((23, 4, 3, 2)).astype(np.float32),
        "x.meta": np.asfortranarray(rng.integers(-5, 5, (23, 3)).astype(">i4")),  # big-endian, Fortran order
        "y": rng.integers(0, 10, 23).astype(np.uint8),
    }
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    progress: list[float] = []
    conv = convert_npz(path, tmp_path / "out", shard_bytes=500, chunk_bytes=200, report=progress.append)
    assert conv.n == 23 and sum(conv.records) == 23 and len(conv.shards) > 1 and progress[-1] == 1.0
    d = conv.description
    assert d["inputs"] == {
        "image": {"feature": "x.image", "decode": {"tensor": "float32", "shape": [4, 3, 2]}},
        "meta": {"feature": "x.meta", "decode": {"tensor": "int32", "shape": [3]}},
    }
    assert d["label"] == "y" and d["features"]["y"] == {"kind": "fixed", "dtype": "int64", "shape": []}
    assert "label_decode" not in d
    spec = {
        "x.image": tf.io.FixedLenFeature([], tf.string),
        "x.meta": tf.io.FixedLenFeature([], tf.string),
        "y": tf.io.FixedLenFeature([], tf.int64),
    }
    got: dict[str, list[np.ndarray]] = {"x.image": [], "x.meta": [], "y": []}
    for record in tf.data.TFRecordDataset([str(p) for p in conv.shards]):
        ex = tf.io.parse_single_example(record, spec)
        for inp in d["inputs"].values():
            dec = inp["decode"]
            t = tf.ensure_shape(tf.io.parse_tensor(ex[inp["feature"]], out_type=dec["tensor"]), dec["shape"])
            got[inp["feature"]].append(t.numpy())
        got["y"].append(ex["y"].numpy())
    for name, want in arrays.items():
        back = np.stack(got[name])
        assert back.shape == want.shape
        assert np.array_equal(back, want) and (
            name == "y" or back.tobytes() == np.ascontiguousarray(want).astype(back.dtype).tobytes()
        )


def test_npz_float64_label_is_a_tensor(tmp_path: Path) -> None:
    y = np.linspace(0, 1, 5) + 1e-12
    np.savez(tmp_path / "r.npz", x=np.ones((5, 2), np.float64), y=y)
    conv = convert_npz(tmp_path / "r.npz", tmp_path / "o")
    assert conv.description["label_decode"] == {"tensor": "float64", "shape": []}
    spec = {"y": tf.io.FixedLenFeature([], tf.string)}
    back = [
        tf.io.parse_tensor(tf.io.parse_single_example(r, spec)["y"], tf.float64).numpy()
        for r in tf.data.TFRecordDataset(str(conv.shards[0]))
    ]
    assert np.array_equal(np.array(back), y)


def test_image_listing_reads_an_object_listing_like_the_folder_walk() -> None:
    from worker.data.convert import image_listing
    from worker.data.errors import SourceError

    keys = [
        "pets/zebra/1.PNG", "pets/zebra/sub/2.jpg", "pets/cat/0.jpeg", "pets/cat/notes.txt", "pets/README.md",
        "pets/.DS_Store", "pets/__MACOSX/cat/0.jpeg", "pets/_SUCCESS",
    ]  # fmt: skip
    listing = image_listing(keys)
    assert listing.prefix == "pets/"  # one wrapping folder is stepped into
    assert listing.classes == ["cat", "zebra"]
    assert sorted(listing.items) == [("cat/0.jpeg", 0), ("zebra/1.PNG", 1), ("zebra/sub/2.jpg", 1)]
    assert listing.skipped == 2  # notes.txt and README.md; hidden parts are not data
    for empty in ([], ["a.png", "b.txt"], ["only/notes.txt"]):
        with pytest.raises(SourceError) as err:
            image_listing(empty)
        assert err.value.code == "source_empty"
