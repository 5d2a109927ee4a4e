"""The manifest: what a dataset is, read once at registration so jobs never list or guess again.

``build_manifest(source, description)`` lists the source, picks the shards of the stored format, counts
records where that is cheap, reads a small sample to infer or check the ``features``, resolves ``inputs`` /
``label`` and asks the stream reader for the decoded ``arrays`` (the npz-style shapes the API's fit check
uses). Its JSON form is the contract with ``worker.data.stream`` (see /work/DATA_PLAN.md):

```
{"root", "format": "tfrecord"|"parquet"|"npz", "compression": null|"GZIP"|"ZLIB",
 "shards": [{"key", "size", "etag", "records": int|null}], "n_samples": int|null,
 "features": {name: {"kind": "fixed"|"var_len", "dtype", "shape"}}, "inputs": {name: {...}},
 "label": str|null, "class_names": [...]|null, "arrays": {...}, + "label_decode" when the description has it}
```

TFRecord framing is read here without TensorFlow: a record is ``length (uint64 LE) | masked CRC32C of the length
(uint32) | data | masked CRC32C of the data (uint32)``. Counting reads only the 12-byte headers and seeks past
the data (GZIP / ZLIB shards are decompressed as a stream on the way: counting them costs a full read, so
remote ones are counted only when already cached). The length CRC is verified, so a file that is not a TFRecord
fails at its first record with the shard's key, not deep inside a training job.

Features are tf.io specs in JSON: dtype ``string`` (bytes_list), ``int64`` or ``float32``; ``fixed`` with
``shape`` ``[]`` for one value per record, ``[n]`` for n; ``var_len`` when the count varies or a record lacks
the feature. For Parquet the same shape describes columns: numeric and string columns are ``fixed`` ``[]``,
fixed-size lists ``fixed`` ``[n, ...]``, variable lists ``var_len``; dtypes are numpy names.
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from worker.data.errors import DescriptionError, RecordError, SourceError
from worker.data.sources import ObjectInfo, Source

ArraysHook = Callable[[dict[str, Any], Source, int], dict[str, Any]]

TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec", ".tfrecord.gz", ".tfrecords.gz", ".tfrecord.zz")
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
COMPRESSIONS = (None, "GZIP", "ZLIB")
_FEATURE_DTYPES = {
    "string": "bytes_list",
    "bytes": "bytes_list",
    "int64": "int64_list",
    "float32": "float_list",
}
_KIND_DTYPE = {"bytes_list": "string", "int64_list": "int64", "float_list": "float32"}
_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------
# TFRecord framing (no TensorFlow)


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord frames use; pure Python, for the 8-byte length fields only."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class _ZlibReader:
    """A forward-only reader over a ZLIB-compressed file (TF's ``ZLIB`` compression), decompressing in chunks."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw, self._z, self._buf = raw, zlib.decompressobj(), b""

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                self._buf += self._z.flush()
                break
            self._buf += self._z.decompress(chunk)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def skip(self, n: int) -> int:
        got = 0
        while got < n:
            part = self.read(min(n - got, 1 << 20))
            if not part:
                break
            got += len(part)
        return got

    def close(self) -> None:
        self._raw.close()


def _open_records(path: Path, compression: str | None) -> Any:
    if compression == "GZIP":
        return gzip.open(path, "rb")
    if compression == "ZLIB":
        return _ZlibReader(path.open("rb"))
    return path.open("rb")


def _frames(path: Path, compression: str | None, key: str, *, data: bool) -> Iterator[bytes | int]:
    """Each record's data (``data=True``) or length, checking the framing; RecordError naming key + index."""
    reader = _open_records(path, compression)
    index = 0
    try:
        while True:
            try:
                head = reader.read(12)
            except (OSError, EOFError, zlib.error) as exc:
                raise _bad_frame(key, index, compression, f"it does not decompress ({exc})") from exc
            if not head:
                return
            if len(head) < 12:
                raise _bad_frame(key, index, compression, "the file ends inside a record header (truncated)")
            length, crc = struct.unpack("<QI", head)
            if masked_crc(head[:8]) != crc:
                raise _bad_frame(key, index, compression, "its length checksum does not match")
            try:
                if data:
                    body = reader.read(length)
                    tail = reader.read(4)
                    got = len(body) + len(tail)
                else:
                    got = _skip(reader, length + 4)
            except (OSError, EOFError, zlib.error) as exc:
                raise _bad_frame(key, index, compression, f"it does not decompress ({exc})") from exc
            if got < length + 4:
                raise _bad_frame(key, index, compression, "the file ends inside the record (truncated)")
            yield body if data else length
            index += 1
    finally:
        reader.close()


def _skip(reader: Any, n: int) -> int:
    if isinstance(reader, _ZlibReader):
        return reader.skip(n)
    if isinstance(reader, gzip.GzipFile):
        before = reader.tell()
        reader.seek(n, 1)  # decompresses forward; stops at the end
        return reader.tell() - before
    before = reader.tell()
    reader.seek(n, 1)
    end = reader.seek(0, 2)
    if before + n > end:
        return end - before
    reader.seek(before + n)
    return n


def _bad_frame(key: str, index: int, compression: str | None, why: str) -> RecordError:
    hint = (
        ' (is the shard compressed? set "compression": "GZIP" or "ZLIB")'
        if compression is None
        else f" (compression is {compression}: is that right?)"
    )
    return RecordError(
        "bad_record",
        f"record {index} of shard {key!r} is not a TFRecord frame: {why}{hint}",
        shard=key,
        index=index,
    )


def count_records(path: Path, compression: str | None = None, *, key: str = "") -> int:
    """How many records a TFRecord file holds, reading only the frame headers (module docstring)."""
    return sum(1 for _ in _frames(path, compression, key or path.name, data=False))


def read_records(path: Path, compression: str | None = None, *, limit: int, key: str = "") -> list[bytes]:
    """The first ``limit`` records' bytes."""
    out: list[bytes] = []
    if limit <= 0:
        return out
    for record in _frames(path, compression, key or path.name, data=True):
        out.append(record)  # type: ignore[arg-type]
        if len(out) >= limit:
            break
    return out


# ----------------------------------------------------------------------------------------------------------
# the manifest


def build_manifest(
    source: Source,
    description: dict[str, Any],
    *,
    max_objects: int,
    sample_records: int = 64,
    compute_arrays: ArraysHook | None = None,
) -> dict[str, Any]:
    """The manifest of ``source`` (module docstring). ``description`` is the registration's ``format``,
    ``compression``, ``features``, ``inputs``, ``label`` (+ ``class_names``, ``label_decode`` from a
    conversion); a missing ``format`` is taken from the objects' names. ``compute_arrays(manifest, source,
    n)`` gives the decoded ``arrays`` entry; default ``worker.data.stream.sample_arrays`` (imported here, so
    this module loads without the stream reader). Raises SourceError / RecordError / DescriptionError."""
    objects = source.list(max_objects)
    fmt = description.get("format") or _guess_format(objects)
    if fmt == "image_folder":
        raise DescriptionError(
            "input_invalid",
            "an image folder is converted to TFRecord shards first (worker.data.convert); build the manifest "
            "of the shards with image_folder_description()",
        )
    builder = _BUILDERS.get(fmt)
    if builder is None:
        raise DescriptionError(
            "input_invalid", f"format {fmt!r} is not one of npz, tfrecord, parquet, image_folder"
        )
    manifest = builder(source, objects, description, sample_records)
    if fmt != "npz":
        hook = compute_arrays or default_arrays_hook
        manifest["arrays"] = hook(manifest, source, min(8, max(1, sample_records)))
    return manifest


def default_arrays_hook(manifest: dict[str, Any], source: Source, n: int) -> dict[str, Any]:
    """The decoded arrays entry, from the stream reader (DATA-STREAM's ``sample_arrays``)."""
    from worker.data.stream import sample_arrays

    return sample_arrays(manifest, source, n)


def _guess_format(objects: list[ObjectInfo]) -> str:
    keys = [o.key.lower() for o in objects]
    if any(k.endswith(PARQUET_SUFFIXES) for k in keys):
        return "parquet"
    if len(keys) == 1 and keys[0].endswith(".npz"):
        return "npz"
    return "tfrecord"


def _base(source: Source, fmt: str, compression: str | None, description: dict[str, Any]) -> dict[str, Any]:
    return {
        "root": source.root,
        "format": fmt,
        "compression": compression,
        "shards": [],
        "n_samples": None,
        "features": None,
        "inputs": None,
        "label": None,
        "class_names": description.get("class_names"),
        "arrays": None,
    }


# --- TFRecord ----------------------------------------------------------------------------------------------


def _tfrecord(
    source: Source, objects: list[ObjectInfo], description: dict[str, Any], sample: int
) -> dict[str, Any]:
    compression = description.get("compression")
    if compression not in COMPRESSIONS:
        raise DescriptionError(
            "input_invalid", f"compression {compression!r} is not one of GZIP, ZLIB or null"
        )
    shards = [o for o in objects if _is_tfrecord_name(o.key)] or objects
    if compression is None and all(o.key.lower().endswith(".gz") for o in shards):
        compression = "GZIP"
    first = source.fetch(shards[0])
    if compression is None:
        with first.open("rb") as fh:
            if fh.read(2) == b"\x1f\x8b":
                compression = "GZIP"  # a gzip file that is not named so: TF would read it as garbage
    manifest = _base(source, "tfrecord", compression, description)

    records: list[bytes] = []
    where: list[tuple[str, int]] = []
    for obj in shards:
        if len(records) >= sample:
            break
        got = read_records(source.fetch(obj), compression, limit=sample - len(records), key=obj.key)
        where.extend((obj.key, i) for i in range(len(got)))
        records.extend(got)
    examples = _parse_examples(records, where)

    for obj in shards:
        local = source.cached(obj)
        count = count_records(local, compression, key=obj.key) if local is not None else None
        manifest["shards"].append({**obj.to_dict(), "records": count})
    counts = [s["records"] for s in manifest["shards"]]
    manifest["n_samples"] = sum(counts) if all(c is not None for c in counts) else None
    if manifest["n_samples"] == 0:
        raise SourceError("source_empty", f"the TFRecord shards of {source.root} hold no records")

    features = description.get("features")
    if features:
        features = _normalise_features(features)
        _check_features(features, examples, where)
    else:
        features = infer_features(examples, where)
    manifest["features"] = features
    label = _resolve_label(description, features, "feature")
    manifest["label"] = label
    manifest["inputs"] = _resolve_inputs(description, features, label, "feature", examples)
    if description.get("label_decode") is not None:
        manifest["label_decode"] = description["label_decode"]
    return manifest


def _is_tfrecord_name(key: str) -> bool:
    name = key.lower().rsplit("/", 1)[-1]
    if name.endswith(TFRECORD_SUFFIXES):
        return True
    parts = name.split("-")
    return len(parts) >= 3 and parts[-2] == "of" and parts[-1].split(".")[0].isdigit()


def _parse_examples(
    records: list[bytes], where: list[tuple[str, int]]
) -> list[dict[str, tuple[str, list[Any]]]]:
    """Each sampled record as {feature: (kind, values)}; RecordError naming the record that is no Example."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.example import example_pb2

    out = []
    for record, (key, index) in zip(records, where, strict=True):
        try:
            example = example_pb2.Example.FromString(record)
        except DecodeError as exc:
            raise RecordError(
                "bad_record",
                f"record {index} of shard {key!r} is not a serialized tf.train.Example ({exc})",
                shard=key,
                index=index,
            ) from exc
        parsed = {}
        for name, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            if kind is not None:
                parsed[name] = (kind, list(getattr(feature, kind).value))
        out.append(parsed)
    return out


def infer_features(
    examples: list[dict[str, tuple[str, list[Any]]]], where: list[tuple[str, int]]
) -> dict[str, dict[str, Any]]:
    """tf.io specs from sampled Examples (module docstring): one dtype per feature, fixed when every record has
    the same number of values."""
    kinds: dict[str, str] = {}
    counts: dict[str, set[int]] = {}
    present: dict[str, int] = {}
    for example, (key, index) in zip(examples, where, strict=True):
        for name, (kind, values) in example.items():
            if kinds.setdefault(name, kind) != kind:
                raise DescriptionError(
                    "feature_mismatch",
                    f"feature {name!r} holds {_KIND_DTYPE[kind]} values in record {index} of shard {key!r} but "
                    f"{_KIND_DTYPE[kinds[name]]} in earlier records; one feature must keep one dtype",
                )
            counts.setdefault(name, set()).add(len(values))
            present[name] = present.get(name, 0) + 1
    if not kinds:
        raise DescriptionError(
            "input_invalid", "the sampled records hold no features; describe them in 'features'"
        )
    out = {}
    for name in sorted(kinds):
        spec: dict[str, Any] = {"dtype": _KIND_DTYPE[kinds[name]]}
        if present[name] == len(examples) and len(counts[name]) == 1:
            (n,) = counts[name]
            spec = {"kind": "fixed", **spec, "shape": [] if n == 1 else [n]}
        else:
            spec = {"kind": "var_len", **spec, "shape": []}
        out[name] = spec
    return out


def _normalise_features(features: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, spec in features.items():
        if not isinstance(spec, dict):
            raise DescriptionError(
                "input_invalid", f"feature {name!r} must be an object with kind, dtype, shape"
            )
        kind = spec.get("kind", "fixed")
        dtype = "string" if spec.get("dtype") == "bytes" else spec.get("dtype")
        if kind not in ("fixed", "var_len") or dtype not in _FEATURE_DTYPES:
            raise DescriptionError(
                "input_invalid",
                f"feature {name!r}: kind must be fixed or var_len and dtype string, int64 or float32 "
                f"(TFRecord features), not {kind!r} / {spec.get('dtype')!r}",
            )
        out[name] = {**spec, "kind": kind, "dtype": dtype, "shape": list(spec.get("shape") or [])}
    return out


def _check_features(
    features: dict[str, dict[str, Any]],
    examples: list[dict[str, tuple[str, list[Any]]]],
    where: list[tuple[str, int]],
) -> None:
    """Every described feature parses from every sampled record, as tf.io.parse_example would demand."""
    for name, spec in features.items():
        want = _FEATURE_DTYPES[spec["dtype"]]
        for example, (key, index) in zip(examples, where, strict=True):
            at = f"record {index} of shard {key!r}"
            if name not in example:
                if spec["kind"] == "fixed" and spec.get("default") is None:
                    raise DescriptionError(
                        "feature_missing",
                        f"feature {name!r} is missing from {at}; give it a 'default', make it var_len, or fix "
                        f"the name (the record has {sorted(example) or 'no features'})",
                    )
                continue
            kind, values = example[name]
            if kind != want:
                raise DescriptionError(
                    "feature_mismatch",
                    f"feature {name!r} holds {_KIND_DTYPE[kind]} values in {at}, but the description says "
                    f"{spec['dtype']}",
                )
            size = math.prod(spec["shape"])
            if spec["kind"] == "fixed" and len(values) != size:
                raise DescriptionError(
                    "feature_mismatch",
                    f"feature {name!r} has {len(values)} values in {at}, but its fixed shape {spec['shape']} "
                    f"holds {size}; fix the shape or make it var_len",
                )


def _resolve_label(description: dict[str, Any], features: dict[str, Any], noun: str) -> str | None:
    if "label" in description:
        label = description["label"]
        if label is not None and label not in features:
            raise DescriptionError(
                "feature_missing" if noun == "feature" else "column_missing",
                f"the label {noun} {label!r} is not in the data (it has {sorted(features)})",
            )
        return label
    return next((n for n in ("label", "labels", "y", "target") if n in features), None)


def _resolve_inputs(
    description: dict[str, Any],
    features: dict[str, Any],
    label: str | None,
    noun: str,
    examples: list[dict[str, tuple[str, list[Any]]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The given inputs, checked; or the one feature that is not the label (with an image decode when its
    bytes are JPEG/PNG). Several candidates and no inputs: DescriptionError naming them."""
    inputs = description.get("inputs")
    if inputs:
        out = {}
        for name, spec in inputs.items():
            if not isinstance(spec, dict) or not isinstance(spec.get(noun), str):
                raise DescriptionError(
                    "input_invalid", f'input {name!r} must name a {noun}: {{"{noun}": ...}}'
                )
            ref = spec[noun]
            if ref not in features:
                raise DescriptionError(
                    "feature_missing" if noun == "feature" else "column_missing",
                    f"input {name!r} names the {noun} {ref!r}, which is not in the data (it has {sorted(features)})",
                )
            decode = spec.get("decode")
            if decode and features[ref].get("dtype") != "string":
                raise DescriptionError(
                    "feature_mismatch",
                    f"input {name!r} decodes {noun} {ref!r}, but it holds {features[ref].get('dtype')}, not bytes",
                )
            if noun == "column" and spec.get("shape") is not None:
                _check_column_shape(name, ref, features[ref], spec["shape"])
            out[name] = dict(spec)
        return out
    candidates = [n for n in features if n != label]
    if len(candidates) != 1:
        raise DescriptionError(
            "input_invalid",
            f"cannot tell which {noun}s feed the model among {candidates}; name them in 'inputs', e.g. "
            f'{{"x": {{"{noun}": "{candidates[0] if candidates else "image"}"}}}}',
        )
    (only,) = candidates
    spec: dict[str, Any] = {noun: only}
    if examples and features[only].get("dtype") == "string":
        decode = _sniff_image(only, examples)
        if decode:
            spec["decode"] = decode
    return {"x": spec}


def _sniff_image(name: str, examples: list[dict[str, tuple[str, list[Any]]]]) -> dict[str, Any] | None:
    """{"image": "auto", "channels": C} when the feature's sampled bytes are JPEG/PNG (C from PIL)."""
    blobs = [ex[name][1][0] for ex in examples if name in ex and ex[name][1]]
    if not blobs or not all(b.startswith((_JPEG, _PNG)) for b in blobs):
        return None
    return {"image": "auto", "channels": image_channels(blobs[:16])}


def image_channels(images: list[bytes]) -> int:
    """1 when every sampled image is grayscale, else 3 (TF decodes gray to RGB, and drops alpha, on request)."""
    import io

    from PIL import Image

    for blob in images:
        try:
            with Image.open(io.BytesIO(blob)) as img:
                if img.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return 3
        except Exception:  # a broken sample image is the stream's to report, with its index
            continue
    return 1


# --- Parquet -----------------------------------------------------------------------------------------------


def _parquet(
    source: Source, objects: list[ObjectInfo], description: dict[str, Any], sample: int
) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = [o for o in objects if o.key.lower().endswith(PARQUET_SUFFIXES)] or objects
    manifest = _base(source, "parquet", None, description)
    schema: pa.Schema | None = None
    for obj in shards:
        local = source.cached(obj)
        try:
            with local.open("rb") if local is not None else source.open(obj) as fh:
                meta = pq.ParquetFile(fh).metadata
                this = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as exc:
            raise RecordError(
                "bad_record", f"shard {obj.key!r} is not a Parquet file ({exc})", shard=obj.key, index=0
            ) from exc
        if schema is None:
            schema = this
        elif not this.equals(schema):
            raise DescriptionError(
                "feature_mismatch",
                f"shard {obj.key!r} has another schema than {shards[0].key!r}: {_schema_text(this)} vs "
                f"{_schema_text(schema)}; every file of a Parquet dataset must share one schema",
            )
        manifest["shards"].append({**obj.to_dict(), "records": int(meta.num_rows)})
    assert schema is not None
    manifest["n_samples"] = sum(s["records"] for s in manifest["shards"])
    if manifest["n_samples"] == 0:
        raise SourceError("source_empty", f"the Parquet files of {source.root} hold no rows")
    features = {field.name: arrow_feature(field.type) for field in schema}
    manifest["features"] = features
    label = _resolve_label(description, features, "column")
    manifest["label"] = label
    manifest["inputs"] = _resolve_inputs(description, features, label, "column")
    for spec in [*manifest["inputs"].values(), {"column": label} if label else {}]:
        column = spec.get("column")
        if column and features[column]["kind"] == "unsupported":
            raise DescriptionError(
                "feature_mismatch",
                f"column {column!r} is of type {features[column]['dtype']}, which cannot feed a model",
            )
    return manifest


def arrow_feature(typ: Any) -> dict[str, Any]:
    """A Parquet column's type as a feature spec (module docstring)."""
    import pyarrow as pa
    import pyarrow.types as pt

    shape: list[int] = []
    kind = "fixed"
    while pt.is_fixed_size_list(typ) or pt.is_list(typ) or pt.is_large_list(typ):
        if pt.is_fixed_size_list(typ):
            if kind == "fixed":
                shape.append(typ.list_size)
        else:
            kind = "var_len"
        typ = typ.value_type
    if pt.is_string(typ) or pt.is_large_string(typ) or pt.is_binary(typ) or pt.is_large_binary(typ):
        dtype = "string"
    elif pt.is_integer(typ) or pt.is_floating(typ) or pt.is_boolean(typ):
        dtype = typ.to_pandas_dtype().__name__ if not pt.is_boolean(typ) else "bool"
        if isinstance(typ, pa.DataType) and pt.is_floating(typ):
            dtype = {16: "float16", 32: "float32", 64: "float64"}[typ.bit_width]
    else:
        return {"kind": "unsupported", "dtype": str(typ), "shape": []}
    return {"kind": kind, "dtype": dtype, "shape": shape if kind == "fixed" else []}


def _schema_text(schema: Any) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in schema) + "}"


def _check_column_shape(name: str, column: str, feature: dict[str, Any], shape: list[int]) -> None:
    if any(not isinstance(d, int) or d < -1 or d == 0 for d in shape):
        raise DescriptionError(
            "input_invalid", f"input {name!r}: shape {shape} must be positive sizes (-1 once)"
        )
    if feature["kind"] != "fixed" or -1 in shape:
        return
    have, want = math.prod(feature["shape"]), math.prod(shape)
    if have != want:
        raise DescriptionError(
            "feature_mismatch",
            f"input {name!r} reshapes column {column!r} ({have} values per row) to {shape} ({want} values)",
        )


# --- npz ---------------------------------------------------------------------------------------------------


def _npz(
    source: Source, objects: list[ObjectInfo], description: dict[str, Any], sample: int
) -> dict[str, Any]:
    shards = [o for o in objects if o.key.lower().endswith(".npz")]
    if len(shards) != 1:
        raise DescriptionError(
            "input_invalid", f"an npz dataset is one .npz file; {source.root} holds {len(shards)} of them"
        )
    (obj,) = shards
    arrays = npz_headers(source, obj)
    n = _check_npz_arrays(arrays, obj.key)
    manifest = _base(source, "npz", None, description)
    manifest["shards"] = [{**obj.to_dict(), "records": n}]
    manifest["n_samples"] = n
    manifest["label"] = "y" if "y" in arrays else None
    manifest["arrays"] = arrays
    return manifest


def npz_headers(source: Source, obj: ObjectInfo) -> dict[str, dict[str, Any]]:
    """{name: {"shape", "dtype"}} of an .npz's arrays from their .npy headers only (no array is loaded)."""
    local = source.cached(obj)
    try:
        with local.open("rb") if local is not None else source.open(obj) as fh, zipfile.ZipFile(fh) as zf:
            return {name: npy_header(zf, name) for name in _npy_members(zf)}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise RecordError(
            "bad_record", f"{obj.key!r} is not a readable .npz ({exc})", shard=obj.key, index=0
        ) from exc


def _npy_members(zf: zipfile.ZipFile) -> list[str]:
    return [m[:-4] for m in zf.namelist() if m.endswith(".npy")]


def npy_header(zf: zipfile.ZipFile, name: str) -> dict[str, Any]:
    import numpy as np

    with zf.open(name + ".npy") as member:
        shape, fortran, dtype = _read_npy_header(member)
    if dtype.hasobject:
        raise DescriptionError(
            "unsupported_array", f"array {name!r} holds Python objects; save numeric arrays"
        )
    del fortran
    return {"shape": list(shape), "dtype": np.dtype(dtype).name}


def _read_npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], bool, Any]:
    from numpy.lib import format as npy

    version = npy.read_magic(fh)
    if version == (1, 0):
        return npy.read_array_header_1_0(fh)
    return npy.read_array_header_2_0(fh)


def _check_npz_arrays(arrays: dict[str, dict[str, Any]], key: str) -> int:
    xs = [n for n in arrays if n == "x" or n.startswith("x.")]
    if not xs:
        raise DescriptionError(
            "input_invalid", f"{key!r} has no array 'x' (or 'x.<input>'); it has {sorted(arrays)}"
        )
    lengths = {n: a["shape"][0] if a["shape"] else None for n, a in arrays.items() if n in xs or n == "y"}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise DescriptionError("input_invalid", f"the arrays of {key!r} differ in length: {lengths}")
    return int(next(iter(lengths.values())))


_BUILDERS: dict[str, Callable[[Source, list[ObjectInfo], dict[str, Any], int], dict[str, Any]]] = {
    "tfrecord": _tfrecord,
    "parquet": _parquet,
    "npz": _npz,
}
