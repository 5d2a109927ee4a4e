"""Registration-time conversion: uploaded archives unpacked safely, image folders and large ``.npz`` files
rewritten as TFRecord shards the stream reader reads like any other (worker task ``validate_dataset``).

- :func:`unpack_archive` extracts a ``.tar`` / ``.tar.gz`` / ``.zip`` with the same member checks as model
  uploads (``app.archive``: no ``..``, absolute paths, links or devices; bounded members, size and ratio;
  bytes really written are counted), then :func:`detect_layout` says what it holds: TFRecord shards, Parquet
  files, one ``.npz``, or an image folder ``<class>/<image>.jpg|jpeg|png``.
- :func:`convert_image_folder` (a local folder) and :func:`convert_images` (any listing, e.g. an ``s3://``
  prefix named by :func:`image_listing`) write shards of ``{"image": the file's bytes as stored, "label": int64 index
  into the sorted class names, "path": its path inside the folder}`` in a seeded shuffled order (so every shard
  mixes classes and a shard-level split is not a class split); the images are not decoded here (the stream
  decodes them), only recognised by their magic bytes; other files are skipped and counted.
  :func:`image_folder_description` is the description to build its manifest with.
- :func:`convert_npz` streams an ``.npz`` member by member into shards without loading it: each array's rows
  are read in chunks of about ``chunk_bytes`` straight from the zip member (deflated or stored), so memory is
  ``chunk_bytes`` per array, whatever the file's size (a Fortran-ordered array has no contiguous rows and is
  loaded whole: memory is then that array's size).

The npz record format (the contract with ``worker.data.stream``): every input array ``x`` / ``x.<input>`` is a
``string`` feature holding one serialized ``tensorflow.TensorProto`` per sample (what
``tf.io.serialize_tensor`` writes), decoded bit-exactly by
``tf.ensure_shape(tf.io.parse_tensor(value, out_type=decode["tensor"]), decode["shape"])``:

```
"features": {"x": {"kind": "fixed", "dtype": "string", "shape": []}, "y": {"kind": "fixed", "dtype": "int64",
             "shape": []}},
"inputs":   {"x": {"feature": "x", "decode": {"tensor": "float32", "shape": [28, 28, 1]}}},
             (multi-input: {"<input>": {"feature": "x.<input>", "decode": {...}}})
"label": "y"
```

The label ``y`` is a native feature when that is exact: integers (but uint64) and bools as ``int64``, float32
and float16 as ``float32``, ``fixed`` with the per-sample shape. Other labels (float64, uint64, complex) are
serialized tensors too, and the description carries ``"label_decode": {"tensor": dtype, "shape": [...]}``
beside ``"label": "y"`` (the manifest keeps it).
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal

from app.archive import ArchiveLimits
from app.errors import ArchiveError, ArchiveTooLarge, UnsupportedFormat
from worker.data.errors import DescriptionError, SourceError
from worker.data.manifest import PARQUET_SUFFIXES, _check_npz_arrays, _is_tfrecord_name, image_channels

Report = Callable[[float], None]
GiB = 1 << 30
DATASET_ARCHIVE_LIMITS = ArchiveLimits(
    max_members=1_000_000, max_uncompressed_bytes=256 * GiB, max_ratio=200.0, max_path_length=1024
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MAGIC = {".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",), ".png": (b"\x89PNG\r\n\x1a\n",)}
SHARD_BYTES = 128 << 20


def _noop(_: float) -> None:
    pass


# ----------------------------------------------------------------------------------------------------------
# archives


def unpack_archive(
    path: Path, out_dir: Path, *, limits: ArchiveLimits = DATASET_ARCHIVE_LIMITS
) -> list[Path]:
    """Extract ``path`` (zip, tar.gz or plain tar, told by magic bytes) into ``out_dir`` (created; must be
    empty) with ``app.archive``'s member checks; the files written, sorted. Nothing is left on failure.
    SourceError ``archive_invalid`` / ``archive_too_large``."""
    from app import archive as ar

    with path.open("rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK\x03\x04"):
        kind = "zip"
    elif head.startswith(b"\x1f\x8b"):
        kind = "tar.gz"
    elif head[257:262] == b"ustar":
        kind = "tar"
    else:
        raise SourceError("archive_invalid", "the upload is not a .zip, .tar or .tar.gz archive")
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    written: list[Path] = []
    try:
        members = ar._Members(limits, path.stat().st_size)
        made: set[Path] = {out_dir}
        if kind == "zip":
            with ar._open_zip(path, limits) as zf:
                for info, rel, is_dir in ar._zip_entries(zf, path, members):
                    if is_dir:
                        ar._make_dirs(out_dir, rel, made)
                        continue
                    with ar._reading(rel, partial(zf.open, info)) as src:
                        ar._write_member(src, out_dir, rel, info.file_size, members, made)
                    written.append(out_dir / rel)
        else:
            with _open_tar(path, kind) as (tf, meter):
                for tinfo, rel in ar._tar_entries(tf, meter, members):
                    if tinfo.isdir():
                        ar._make_dirs(out_dir, rel, made)
                        continue
                    with ar._reading(rel, partial(tf.extractfile, tinfo)) as src:
                        ar._write_member(src, out_dir, rel, tinfo.size, members, made)
                    written.append(out_dir / rel)
    except ArchiveTooLarge as exc:
        _clear(out_dir)
        raise SourceError("archive_too_large", exc.detail) from exc
    except (ArchiveError, UnsupportedFormat) as exc:
        _clear(out_dir)
        raise SourceError("archive_invalid", exc.detail) from exc
    except BaseException:
        _clear(out_dir)
        raise
    return sorted(written)


@contextlib.contextmanager
def _open_tar(path: Path, kind: str) -> Iterator[tuple[tarfile.TarFile, Any]]:
    from app import archive as ar

    if kind == "tar.gz":
        with ar._open_tar(path) as pair:
            yield pair
        return
    with path.open("rb") as raw:
        meter = ar._MeteredReader(raw)
        try:
            tf = tarfile.open(fileobj=meter, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"the file is not a valid tar archive ({exc}); was it truncated?") from exc
        with tf:
            yield tf, meter


def _clear(out_dir: Path) -> None:
    for child in out_dir.iterdir() if out_dir.exists() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


Layout = Literal["tfrecord", "parquet", "npz", "image_folder"]


@dataclass(frozen=True)
class ArchiveLayout:
    """What an unpacked archive holds: ``kind``, the folder it starts at (``root``; a single wrapping folder
    is stepped into), and the data files (shards, or the one .npz; images are listed by the converter)."""

    kind: Layout
    root: Path
    files: list[Path]


def _visible(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)  # .DS_Store, __MACOSX
    )


def detect_layout(root: Path) -> ArchiveLayout:
    """Parquet files, TFRecord shards, one .npz, or ``<class>/<image>`` folders (module docstring);
    SourceError ``archive_unrecognised`` naming what was found otherwise."""
    files = _visible(root)
    parquet = [p for p in files if p.name.lower().endswith(PARQUET_SUFFIXES)]
    if parquet:
        return ArchiveLayout("parquet", root, parquet)
    shards = [p for p in files if _is_tfrecord_name(p.name)]
    if shards:
        return ArchiveLayout("tfrecord", root, shards)
    folder = _image_root(root)
    if folder is not None:
        return ArchiveLayout("image_folder", folder, [])
    npz = [p for p in files if p.name.lower().endswith(".npz")]
    if len(npz) == 1:
        return ArchiveLayout("npz", root, npz)
    shown = ", ".join(str(p.relative_to(root)) for p in files[:5]) or "nothing"
    raise SourceError(
        "archive_unrecognised",
        f"the archive holds no .tfrecord/.parquet shards, no single .npz and no <class>/<image>.jpg|png "
        f"folders (found {shown}{' ...' if len(files) > 5 else ''})",
    )


def _image_root(root: Path) -> Path | None:
    """The folder whose subfolders are the classes: ``root`` or a single folder wrapping it."""
    current = root
    while True:
        dirs = [d for d in sorted(current.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))]
        images_here = [p for p in current.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if len(dirs) == 1 and not images_here and not _has_images(dirs[0], depth=1):
            current = dirs[0]
            continue
        if dirs and any(_has_images(d, depth=None) for d in dirs):
            return current
        return None


def _has_images(folder: Path, depth: int | None) -> bool:
    pattern = folder.glob("*") if depth == 1 else folder.rglob("*")
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in pattern)


# ----------------------------------------------------------------------------------------------------------
# image folders


@dataclass(frozen=True)
class Conversion:
    """What a conversion wrote: shard files in order with their record counts, the samples written, the
    files it skipped (not images), and the description to build the shards' manifest with."""

    shards: list[Path]
    records: list[int]
    n: int
    description: dict[str, Any]
    skipped: int = 0
    class_names: list[str] = field(default_factory=list)
    channels: int | None = None


def image_folder_description(class_names: list[str], channels: int, input_name: str = "x") -> dict[str, Any]:
    """The description of converted image-folder shards (features given, so nothing is inferred)."""
    return {
        "format": "tfrecord",
        "compression": None,
        "features": {
            "image": {"kind": "fixed", "dtype": "string", "shape": []},
            "label": {"kind": "fixed", "dtype": "int64", "shape": []},
            "path": {"kind": "fixed", "dtype": "string", "shape": []},
        },
        "inputs": {input_name: {"feature": "image", "decode": {"image": "auto", "channels": channels}}},
        "label": "label",
        "class_names": list(class_names),
    }


def convert_image_folder(
    root: Path,
    out_dir: Path,
    *,
    shard_bytes: int = SHARD_BYTES,
    seed: int = 0,
    report: Report | None = None,
    input_name: str = "x",
) -> Conversion:
    """``root/<class>/.../<image>`` -> TFRecord shards ``out_dir/part-NNNNN.tfrecord`` of about
    ``shard_bytes`` (module docstring). Class names are the sorted folder names (label = index). Memory: the
    list of file paths, and one image at a time."""
    folder = _image_root(root) or root
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
    items: list[tuple[str, int]] = []
    skipped = sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for label, name in enumerate(classes):
        for p in _visible(folder / name):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                items.append((p.relative_to(folder).as_posix(), label))
            else:
                skipped += 1
    return convert_images(
        ImageListing(classes, items, skipped),
        lambda rels: ((folder / rel).read_bytes() for rel in rels),
        out_dir,
        shard_bytes=shard_bytes,
        seed=seed,
        report=report,
        input_name=input_name,
    )


@dataclass(frozen=True)
class ImageListing:
    """An image folder as names: ``classes`` (sorted), ``items`` ``(path relative to the folder, label)``,
    the files that are not images (``skipped``), and the key prefix of the folder in a listing (``prefix``)."""

    classes: list[str]
    items: list[tuple[str, int]]
    skipped: int = 0
    prefix: str = ""


def _hidden_part(key: str) -> bool:
    return any(part.startswith((".", "_")) for part in key.split("/"))


def image_listing(keys: list[str]) -> ImageListing:
    """The image folder in a listing of object keys (an ``s3://`` prefix), by the rules of
    ``convert_image_folder``'s local walk: the folder whose subfolders are the classes is the root or a single
    folder wrapping it; hidden parts (``.DS_Store``, ``__MACOSX``, ``_SUCCESS``) are ignored; anything not
    ``.jpg``/``.jpeg``/``.png`` is skipped and counted. SourceError ``source_empty`` when there is no such
    folder."""
    visible = sorted(k for k in keys if not _hidden_part(k))

    def is_image(key: str) -> bool:
        return Path(key).suffix.lower() in IMAGE_SUFFIXES

    prefix = ""
    while True:
        below = [k[len(prefix) :] for k in visible if k.startswith(prefix)]
        dirs = sorted({k.split("/", 1)[0] for k in below if "/" in k})
        images_here = [k for k in below if "/" not in k and is_image(k)]
        if (
            len(dirs) == 1
            and not images_here
            and not any(k.count("/") == 1 and is_image(k) for k in below if k.startswith(dirs[0] + "/"))
        ):
            prefix += dirs[0] + "/"
            continue
        if not dirs or not any(is_image(k) for k in below if "/" in k):
            raise SourceError(
                "source_empty",
                "the source holds no .jpg/.jpeg/.png files inside <class>/ folders (an image folder is "
                "<class name>/<image>, optionally inside one wrapping folder)",
            )
        break
    items: list[tuple[str, int]] = []
    skipped = sum(1 for k in below if "/" not in k)
    for label, name in enumerate(dirs):
        for rel in (k for k in below if k.startswith(name + "/")):
            if is_image(rel):
                items.append((rel, label))
            else:
                skipped += 1
    return ImageListing(dirs, items, skipped, prefix)


def convert_images(
    listing: ImageListing,
    read: Callable[[list[str]], Iterator[bytes]],
    out_dir: Path,
    *,
    shard_bytes: int = SHARD_BYTES,
    seed: int = 0,
    report: Report | None = None,
    input_name: str = "x",
) -> Conversion:
    """The shards of an image folder wherever it lies: ``read(paths)`` yields the bytes of ``listing``'s
    images in the order given (a local folder reads files; an ``s3://`` prefix GETs a few objects at once).
    Images go in a seeded shuffled order, so every shard mixes classes and the same folder gives the same
    shards."""
    import tensorflow as tf

    report = report or _noop
    skipped = listing.skipped
    items = sorted(listing.items)
    if not items:
        raise SourceError(
            "source_empty", "the image folder holds no .jpg/.jpeg/.png files inside <class>/ folders"
        )
    random.Random(seed).shuffle(items)  # every shard mixes classes; the same upload gives the same shards

    def checked(rel: str, data: bytes) -> bytes | None:
        return data if data.startswith(_MAGIC[Path(rel).suffix.lower()]) else None

    head = [rel for rel, _ in items[:16]]
    sample = [b for b in (checked(rel, data) for rel, data in zip(head, read(head), strict=True)) if b]
    channels = image_channels(sample) if sample else 3
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(tf, out_dir, shard_bytes)
    n = 0
    try:
        blobs = read([rel for rel, _ in items])
        for i, ((rel, label), raw) in enumerate(zip(items, blobs, strict=True)):
            data = checked(rel, raw)
            if data is None:  # named .jpg/.png but something else: not an image we can decode
                skipped += 1
                continue
            writer.write(
                _example(
                    tf, {"image": [data], "label": [label], "path": [rel.encode("utf-8")]}
                ).SerializeToString()
            )
            n += 1
            if i % 256 == 255:
                report((i + 1) / len(items))
    finally:
        writer.close()
    if n == 0:
        raise SourceError("source_empty", "none of the image folder's .jpg/.jpeg/.png files is a JPEG or PNG")
    report(1.0)
    return Conversion(
        writer.paths,
        writer.counts,
        n,
        image_folder_description(listing.classes, channels, input_name),
        skipped,
        list(listing.classes),
        channels,
    )


class _ShardWriter:
    """TFRecord shards of about ``shard_bytes`` each, ``part-00000.tfrecord`` onwards."""

    def __init__(self, tf: Any, out_dir: Path, shard_bytes: int) -> None:
        self._tf, self._dir, self._limit = tf, out_dir, max(1, shard_bytes)
        self.paths: list[Path] = []
        self.counts: list[int] = []
        self._writer: Any = None
        self._bytes = 0

    def write(self, record: bytes) -> None:
        if self._writer is None or self._bytes >= self._limit:
            self.close()
            path = self._dir / f"part-{len(self.paths):05d}.tfrecord"
            self._writer = self._tf.io.TFRecordWriter(str(path))
            self.paths.append(path)
            self.counts.append(0)
            self._bytes = 0
        self._writer.write(record)
        self._bytes += len(record) + 16
        self.counts[-1] += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _example(tf: Any, values: dict[str, list[Any]]) -> Any:
    feats = {}
    for name, vals in values.items():
        first = vals[0] if len(vals) else None
        if isinstance(first, bytes):
            feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=vals))
        elif isinstance(first, float):
            feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=vals))
        else:
            feats[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=vals))
    return tf.train.Example(features=tf.train.Features(feature=feats))


# ----------------------------------------------------------------------------------------------------------
# npz


def convert_npz(
    path: Path,
    out_dir: Path,
    *,
    shard_bytes: int = SHARD_BYTES,
    report: Report | None = None,
    chunk_bytes: int = 16 << 20,
) -> Conversion:
    """An ``.npz`` (``x`` or ``x.<input>``, optional ``y``) -> TFRecord shards of serialized tensors, one record
    per sample, bit-exact (module docstring: the ``"tensor"`` decode). Streamed: about ``chunk_bytes`` of rows
    per array in memory."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    from worker.data.manifest import _read_npy_header

    report = report or _noop
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError("archive_invalid", f"the upload is not a readable .npz ({exc})") from exc
    with zf, contextlib.ExitStack() as stack:
        names = [m[:-4] for m in zf.namelist() if m.endswith(".npy")]
        wanted = sorted(n for n in names if n == "x" or n.startswith("x."))
        if "y" in names:
            wanted.append("y")
        streams: dict[str, _RowStream] = {}
        for name in wanted:
            member = stack.enter_context(zf.open(name + ".npy"))
            shape, fortran, dtype = _read_npy_header(member)
            dtype = np.dtype(dtype)
            if dtype.hasobject or dtype.kind not in "biufc":
                raise DescriptionError(
                    "unsupported_array",
                    f"array {name!r} is {dtype}; only numeric and bool arrays can be converted",
                )
            if not shape:
                raise DescriptionError(
                    "unsupported_array", f"array {name!r} is a scalar; it needs one row per sample"
                )
            streams[name] = _RowStream(member, tuple(shape), dtype, fortran, chunk_bytes)
        n = _check_npz_arrays({k: {"shape": list(s.shape)} for k, s in streams.items()}, path.name)

        features: dict[str, Any] = {}
        inputs: dict[str, Any] = {}
        description: dict[str, Any] = {"format": "tfrecord", "compression": None}
        encoders: dict[str, Callable[[Any], Any]] = {}
        for name, stream in streams.items():
            per_sample = list(stream.shape[1:])
            if name == "y" and _native_label(stream.dtype):
                kind = "float32" if stream.dtype.kind == "f" else "int64"
                features["y"] = {"kind": "fixed", "dtype": kind, "shape": per_sample}
                encoders["y"] = _native_encoder(tf, kind)
                continue
            features[name] = {"kind": "fixed", "dtype": "string", "shape": []}
            decode = {"tensor": stream.dtype.name, "shape": per_sample}
            template = tensor_pb2.TensorProto(
                dtype=tf.dtypes.as_dtype(stream.dtype).as_datatype_enum,
                tensor_shape=tf.TensorShape(per_sample).as_proto(),
            )
            encoders[name] = partial(_tensor_feature, tf, template)
            if name == "y":
                description["label_decode"] = decode
            else:
                inputs["x" if name == "x" else name[2:]] = {"feature": name, "decode": decode}
        description.update(features=features, inputs=inputs, label="y" if "y" in streams else None)

        out_dir.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(tf, out_dir, shard_bytes)
        done = 0
        try:
            while done < n:
                chunks = {name: s.next_rows() for name, s in streams.items()}
                rows = min(len(c) for c in chunks.values())
                for name, s in streams.items():  # arrays of other row sizes read other chunk lengths
                    s.push_back(chunks[name][rows:])
                for i in range(rows):
                    feats = {name: encoders[name](chunks[name][i]) for name in streams}
                    writer.write(
                        tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()
                    )
                done += rows
                report(done / n)
        finally:
            writer.close()
    return Conversion(writer.paths, writer.counts, n, description)


def _native_label(dtype: Any) -> bool:
    """Labels stored as plain int64 / float32 features lose nothing: ints but uint64, bools, float16/32."""
    return (
        dtype.kind in "bi"
        or (dtype.kind == "u" and dtype.itemsize < 8)
        or dtype.name in ("float16", "float32")
    )


def _native_encoder(tf: Any, kind: str) -> Callable[[Any], Any]:
    if kind == "float32":
        return lambda row: tf.train.Feature(float_list=tf.train.FloatList(value=row.reshape(-1).tolist()))
    return lambda row: tf.train.Feature(
        int64_list=tf.train.Int64List(value=row.reshape(-1).astype("int64").tolist())
    )


def _tensor_feature(tf: Any, template: Any, row: Any) -> Any:
    proto = type(template)()
    proto.CopyFrom(template)
    proto.tensor_content = row.tobytes()
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[proto.SerializeToString()]))


class _RowStream:
    """Rows of one .npy member, read in chunks from the (decompressing) zip stream, in native byte order."""

    def __init__(
        self, member: IO[bytes], shape: tuple[int, ...], dtype: Any, fortran: bool, chunk_bytes: int
    ) -> None:
        import numpy as np

        self.shape, self.dtype = shape, dtype.newbyteorder("=")
        self._member, self._source_dtype = member, dtype
        self._row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self._rows_per_chunk = max(1, chunk_bytes // max(1, self._row_bytes))
        self._left = shape[0]
        self._pending: Any = None
        self._whole: Any = None
        if fortran and len(shape) > 1:  # no contiguous rows on disk: this array is loaded whole
            count = math.prod(shape)
            data = np.frombuffer(_read_exact(member, count * dtype.itemsize), dtype)
            self._whole = np.ascontiguousarray(data.reshape(shape, order="F")).astype(self.dtype, copy=False)

    def next_rows(self) -> Any:
        import numpy as np

        if self._pending is not None and len(self._pending):
            out, self._pending = self._pending, None
            return out
        rows = min(self._rows_per_chunk, self._left)
        if self._whole is not None:
            start = self.shape[0] - self._left
            out = self._whole[start : start + rows]
        else:
            raw = _read_exact(self._member, rows * self._row_bytes)
            out = (
                np.frombuffer(raw, self._source_dtype)
                .reshape((rows, *self.shape[1:]))
                .astype(self.dtype, copy=False)
            )
        self._left -= rows
        return out

    def push_back(self, rows: Any) -> None:
        if len(rows):
            self._pending = rows


def _read_exact(member: IO[bytes], n: int) -> bytes:
    parts, left = [], n
    while left > 0:
        chunk = member.read(min(left, 16 << 20))
        if not chunk:
            raise DescriptionError(
                "unsupported_array", "an array in the .npz ends early; the file is truncated"
            )
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


__all__ = [
    "DATASET_ARCHIVE_LIMITS",
    "ArchiveLayout",
    "Conversion",
    "convert_image_folder",
    "convert_npz",
    "detect_layout",
    "image_folder_description",
    "unpack_archive",
]
