"""The manifest's ``features`` / ``inputs`` / ``label`` / ``decode`` as typed, validated objects.

One place says how a stored record becomes model inputs, so the stream reader, the manifest's sample
(``arrays``) and the error messages agree. No TensorFlow at import: ``FeatureSpec.tf_spec`` imports it.

- ``features`` (TFRecord): name -> ``{"kind": "fixed"|"var_len", "dtype": "float32"|"int64"|"string",
  "shape": [...], "default"?}``. ``var_len`` features are densified with ``default`` (0 / ""), padded or cut to
  ``shape[0]`` when a shape is given.
- ``inputs``: signature input name (or ``"x"`` for a single-input model) -> ``{"feature": name}`` (TFRecord,
  npz array) or ``{"column": name, "shape"?: [...]}`` (Parquet; fixed-size list columns take a shape), with an
  optional ``decode``: ``{"image": "jpeg"|"png"|"auto", "channels"?: 1|3|4}`` (float32 in [0, 255], API.md)
  or ``{"tensor": dtype, "shape": [...]}`` (bytes written by ``tf.io.serialize_tensor``: how large ``.npz``
  uploads are converted to shards, read back bit-exact).
- ``label``: a feature / column / npz array holding int64 class ids or float targets; None = unlabelled.
  ``label_decode`` (``{"tensor": dtype, "shape"}``): the label is stored as serialized tensors (labels that a
  tf.train.Example cannot hold exactly, e.g. float64; worker.data.convert.convert_npz).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from worker.data.errors import DescriptionError

Format = Literal["tfrecord", "parquet", "npz"]
_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float64": "float32",  # tf.train.Example stores float32; wider requests read as float32
    "int64": "int64",
    "int": "int64",
    "string": "string",
    "bytes": "string",
}
_TENSOR_DTYPES = {
    "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "string",
}  # fmt: skip
_IMAGE_FORMATS = ("jpeg", "png", "auto")


@dataclass(frozen=True)
class FeatureSpec:
    """One tf.train.Example feature: how ``tf.io.parse_example`` reads it."""

    name: str
    kind: Literal["fixed", "var_len"]
    dtype: str  # float32 | int64 | string
    shape: tuple[int, ...]
    default: Any = None

    def tf_spec(self) -> Any:
        import tensorflow as tf

        dtype = tf.as_dtype(self.dtype)
        if self.kind == "var_len":
            return tf.io.VarLenFeature(dtype)
        return tf.io.FixedLenFeature(list(self.shape), dtype, default_value=self.default)

    @property
    def fill(self) -> Any:
        """The value that densifies / pads a var_len feature."""
        if self.default is not None:
            return self.default
        return b"" if self.dtype == "string" else 0


@dataclass(frozen=True)
class ImageDecode:
    """Encoded image bytes -> float32 (H, W, C) in [0, 255]; ``channels`` None = as stored (or the model's)."""

    format: str  # jpeg | png | auto
    channels: int | None


@dataclass(frozen=True)
class TensorDecode:
    """``tf.io.serialize_tensor`` bytes -> a tensor of ``dtype`` and per-sample ``shape``."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class InputSpec:
    """Where one model input comes from: ``source`` is the feature / column / npz array name."""

    name: str
    source: str
    shape: tuple[int, ...] | None = None  # Parquet list columns: per-sample shape
    decode: ImageDecode | TensorDecode | None = None

    @property
    def array_key(self) -> str:
        """The npz-style array name (``x`` or ``x.<input>``) worker.models.inputs.bind_inputs expects."""
        return "x" if self.name == "x" else f"x.{self.name}"


@dataclass(frozen=True)
class Description:
    format: Format
    compression: str | None
    features: dict[str, FeatureSpec]
    inputs: dict[str, InputSpec]
    label: str | None
    label_decode: TensorDecode | None = None  # a label stored as serialized tensors (convert_npz, float64 y)

    @property
    def sources(self) -> list[str]:
        """Features / columns / arrays a pass reads (inputs then label): the projection."""
        names = [spec.source for spec in self.inputs.values()]
        if self.label is not None:
            names.append(self.label)
        return list(dict.fromkeys(names))


def _fail(message: str, code: str = "input_invalid") -> DescriptionError:
    """DescriptionError codes as in worker/data/errors.py: input_invalid, feature_missing, feature_mismatch."""
    return DescriptionError(code, message)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(d, int) and d >= 0 for d in value):
        raise _fail(f"{where}: shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def _feature(name: str, raw: Any) -> FeatureSpec:
    if not isinstance(raw, dict):
        raise _fail(f"feature {name!r} must be an object with kind, dtype, shape; got {raw!r}")
    kind = raw.get("kind", "fixed")
    if kind not in ("fixed", "var_len"):
        raise _fail(f"feature {name!r}: kind must be 'fixed' or 'var_len', got {kind!r}")
    dtype = _DTYPES.get(str(raw.get("dtype")))
    if dtype is None:
        raise _fail(
            f"feature {name!r}: dtype must be one of float32, int64, string; got {raw.get('dtype')!r}"
        )
    shape = _shape(raw.get("shape"), f"feature {name!r}")
    if kind == "var_len" and len(shape) > 1:
        raise _fail(f"feature {name!r}: a var_len feature is a list; give shape [length] or none")
    default = raw.get("default")
    if dtype == "string" and isinstance(default, str):
        default = default.encode()
    return FeatureSpec(name, kind, dtype, shape, default)


def _decode(name: str, raw: Any) -> ImageDecode | TensorDecode | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _fail(f"input {name!r}: decode must be an object, got {raw!r}")
    if "image" in raw:
        fmt, channels = raw["image"], raw.get("channels")
        if fmt not in _IMAGE_FORMATS:
            raise _fail(f"input {name!r}: decode.image must be one of {list(_IMAGE_FORMATS)}, got {fmt!r}")
        if channels is not None and channels not in (1, 3, 4):
            raise _fail(f"input {name!r}: decode.channels must be 1, 3 or 4, got {channels!r}")
        return ImageDecode(fmt, channels)
    if "tensor" in raw:
        dtype = raw["tensor"]
        if dtype not in _TENSOR_DTYPES:
            raise _fail(f"input {name!r}: decode.tensor must be a TensorFlow dtype name, got {dtype!r}")
        return TensorDecode(dtype, _shape(raw.get("shape"), f"input {name!r} decode"))
    raise _fail(f"input {name!r}: decode needs 'image' or 'tensor', got keys {sorted(raw)}")


def _inputs(raw: Any, fmt: str, default_source: dict[str, str]) -> dict[str, InputSpec]:
    if not raw:
        if not default_source:
            raise _fail("the description names no inputs: give inputs {input name or 'x': {feature|column}}")
        return {name: InputSpec(name, src) for name, src in default_source.items()}
    if not isinstance(raw, dict):
        raise _fail(f"inputs must be an object keyed by signature input names, got {raw!r}")
    if "x" in raw and len(raw) > 1:
        raise _fail(
            f"input 'x' means the only input of a single-input model; name every input instead: {sorted(raw)}"
        )
    specs: dict[str, InputSpec] = {}
    for name, item in raw.items():
        if not isinstance(item, dict):
            raise _fail(f"input {name!r} must be an object with 'feature' or 'column', got {item!r}")
        source = item.get("column") if fmt == "parquet" else item.get("feature")
        source = source or item.get("feature") or item.get("column") or item.get("array")
        if not isinstance(source, str) or not source:
            want = "column" if fmt == "parquet" else "feature"
            raise _fail(f"input {name!r} names no {want}")
        shape = _shape(item["shape"], f"input {name!r}") if item.get("shape") is not None else None
        specs[name] = InputSpec(name, source, shape, _decode(name, item.get("decode")))
    return specs


def _npz_defaults(manifest: dict[str, Any], npz_keys: list[str] | None) -> tuple[dict[str, str], str | None]:
    """Inputs and label of an npz manifest named by the API's convention (``x`` / ``x.<input>``, ``y``)."""
    keys = list(npz_keys if npz_keys is not None else (manifest.get("arrays") or {}).keys())
    inputs = {("x" if k == "x" else k[2:]): k for k in keys if k == "x" or k.startswith("x.")}
    return inputs, ("y" if "y" in keys else None)


def parse_description(manifest: dict[str, Any], *, npz_keys: list[str] | None = None) -> Description:
    """Validate the manifest's description; raises ``DescriptionError`` with a sentence naming the field.

    ``npz_keys``: the array names of an npz shard, for a manifest that has neither ``inputs`` nor ``arrays``
    yet (the stream reads them from the file)."""
    fmt = manifest.get("format")
    if fmt not in ("tfrecord", "parquet", "npz"):
        raise _fail(f"stored format must be tfrecord, parquet or npz, got {fmt!r}")
    compression = manifest.get("compression") or None
    if compression not in (None, "GZIP", "ZLIB"):
        raise _fail(f"compression must be GZIP, ZLIB or null, got {compression!r}")
    raw_features = manifest.get("features") or {}
    if not isinstance(raw_features, dict):
        raise _fail("features must be an object keyed by feature name")
    features = {name: _feature(name, raw) for name, raw in raw_features.items()} if fmt == "tfrecord" else {}
    label = manifest.get("label")

    defaults: dict[str, str] = {}
    if fmt == "npz":
        defaults, npz_label = _npz_defaults(manifest, npz_keys)
        if "label" not in manifest:
            label = npz_label
    elif fmt == "tfrecord":
        others = [name for name in features if name != label]
        if len(others) == 1:
            defaults = {"x": others[0]}
    inputs = _inputs(manifest.get("inputs"), fmt, defaults)
    if label is not None and not isinstance(label, str):
        raise _fail(f"label must name one feature or column, got {label!r}")
    label_decode = _decode("label", manifest.get("label_decode"))
    if label_decode is not None and not isinstance(label_decode, TensorDecode):
        raise _fail("label_decode must be a tensor decode {'tensor': dtype, 'shape': [...]}")

    if fmt == "tfrecord":
        for spec in inputs.values():
            feature = features.get(spec.source)
            if feature is None:
                raise _fail(
                    f"input {spec.name!r} reads feature {spec.source!r}, which is not in features {sorted(features)}",
                    "feature_missing",
                )
            if spec.decode is not None and feature.dtype != "string":
                raise _fail(
                    f"input {spec.name!r}: decode needs a string (bytes) feature; {spec.source!r} is {feature.dtype}",
                    "feature_mismatch",
                )
            if feature.kind == "var_len" and spec.decode is not None:
                raise _fail(f"input {spec.name!r}: decode needs a fixed feature of one value per record")
        if label is not None:
            feature = features.get(label)
            if feature is None:
                raise _fail(f"label {label!r} is not in features {sorted(features)}", "feature_missing")
            if feature.dtype == "string" and label_decode is None:
                raise _fail(
                    f"label {label!r} must be int64 (class ids) or float32 (targets), not string",
                    "feature_mismatch",
                )
    return Description(fmt, compression, features, inputs, label, label_decode)
