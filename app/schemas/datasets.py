"""Dataset registration bodies (API.md "Datasets"): a description of the data, and a reference to it.

The API checks what it can without reading the data (names, kinds, dtypes, where the source may point); the
worker task ``secateurs.validate_dataset`` reads a sample and decides ``ready`` or ``invalid``. Source checks
here are string checks only: the worker resolves ``file://`` paths (symlinks included) and refuses any that
land outside an allowed prefix.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.config import source_prefix_problem
from app.schemas.vocabulary import (
    DatasetCompression,
    DatasetFormat,
    FeatureDtype,
    FeatureKind,
    ImageChannels,
    ImageDecode,
)

Name = Annotated[str, Field(min_length=1, max_length=256)]
Dim = Annotated[int, Field(ge=1, le=2**31 - 1)]
MAX_ENTRIES = 256
MAX_SOURCE_LENGTH = 2048


class _Strict(BaseModel):
    """Unknown keys are an error: a misspelt ``lable`` must not silently train without labels."""

    model_config = ConfigDict(extra="forbid")


class FeatureSpec(_Strict):
    """One feature of a tf.train.Example, as ``tf.io.parse_example`` reads it."""

    kind: FeatureKind = Field(description="fixed: tf.io.FixedLenFeature; var_len: tf.io.VarLenFeature")
    dtype: FeatureDtype = Field(
        description="float32, int64 or string (bytes: encoded images, serialized tensors)"
    )
    shape: list[Dim] = Field(
        default_factory=list, max_length=8, description="values per record for fixed features ([] = a scalar)"
    )
    default: float | int | str | list[float | int | str] | None = Field(
        None, description="fixed features only: the value of records that lack the feature"
    )

    @model_validator(mode="after")
    def _var_len(self) -> FeatureSpec:
        if self.kind == "var_len" and (self.shape or self.default is not None):
            raise ValueError("a var_len feature has no shape or default (tf.io.VarLenFeature); remove them")
        return self


class ImageDecodeSpec(_Strict):
    """Decode a string feature/column holding an encoded image into float32 pixels in [0, 255]."""

    image: ImageDecode = Field("auto", description="jpeg, png, or auto (either, by its bytes)")
    channels: ImageChannels = Field(3, description="1 (grey), 3 (RGB) or 4 (RGBA)")


class InputSpec(_Strict):
    """Where a model input comes from: a TFRecord ``feature`` or a Parquet ``column`` (exactly one)."""

    feature: Name | None = None
    column: Name | None = None
    shape: list[Dim] | None = Field(
        None, max_length=8, description="per-sample shape, e.g. [28, 28] for a flat list column of 784 values"
    )
    decode: ImageDecodeSpec | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> InputSpec:
        if (self.feature is None) == (self.column is None):
            raise ValueError('give exactly one of "feature" (TFRecord) or "column" (Parquet)')
        return self


class DatasetDescription(_Strict):
    """What the caller says about the data (the multipart ``description`` field; the JSON registration adds
    ``source``). Everything is optional: the worker infers features from a sample and image folders need none."""

    format: DatasetFormat | None = Field(None, description="default: from the file name (uploads)")
    compression: DatasetCompression | None = Field(
        None, description="TFRecord only: GZIP or ZLIB (TF's names)"
    )
    features: dict[Name, FeatureSpec] | None = Field(
        None,
        max_length=MAX_ENTRIES,
        description="TFRecord features; default: inferred from a sample of records",
    )
    inputs: dict[Name, InputSpec] | None = Field(
        None,
        max_length=MAX_ENTRIES,
        description='signature input name ("x" also works for a single-input model) -> feature or column',
    )
    label: Name | None = Field(None, description="the feature or column holding y; null = unlabelled")

    @model_validator(mode="after")
    def _consistent(self) -> DatasetDescription:
        for problem in description_problems(self):
            raise ValueError(problem)
        return self

    def stored(self) -> dict[str, Any]:
        """The record's ``description`` column: what the worker's manifest builder reads."""
        return self.model_dump(mode="json", include={"compression", "features", "inputs", "label"})


def description_problems(desc: DatasetDescription) -> list[str]:
    """Inconsistencies knowable from the description alone, each a sentence naming the field."""
    problems: list[str] = []
    fmt = desc.format
    if desc.compression is not None and fmt not in (None, "tfrecord"):
        problems.append(f"compression applies to TFRecord files only, not format {fmt!r}: remove it")
    if fmt in ("parquet", "image_folder", "npz") and desc.features is not None:
        problems.append(f"features describe TFRecord records; format {fmt!r} has none: remove them")
    for name, spec in (desc.inputs or {}).items():
        if fmt == "parquet" and spec.feature is not None:
            problems.append(f"inputs.{name}: a Parquet input names a column, not a feature")
        if fmt == "tfrecord" and spec.column is not None:
            problems.append(f"inputs.{name}: a TFRecord input names a feature, not a column")
        if desc.features is not None and spec.feature is not None and spec.feature not in desc.features:
            problems.append(
                f"inputs.{name}.feature {spec.feature!r} is not one of the features {sorted(desc.features)}"
            )
        if (
            spec.decode is not None
            and desc.features is not None
            and spec.feature in desc.features
            and desc.features[spec.feature].dtype != "string"
        ):
            problems.append(f"inputs.{name}.decode needs a string feature; {spec.feature!r} is not one")
    if desc.features is not None and desc.label is not None and desc.label not in desc.features:
        problems.append(f"label {desc.label!r} is not one of the features {sorted(desc.features)}")
    if desc.label is not None and desc.inputs:
        taken = {s.feature or s.column for s in desc.inputs.values()}
        if desc.label in taken:
            problems.append(f"label {desc.label!r} is also an input: a model would see its own answer")
    return problems


class DatasetReference(DatasetDescription):
    """``POST /v1/datasets`` with ``application/json``: data registered by reference, read by the workers
    where it lies (bytes never pass through the API). Allowed prefixes: SECATEURS_DATASET_SOURCES."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"source": "s3://data/team-a/mnist/", "format": "tfrecord", "label": "label"},
                {
                    "source": "file:///mnt/datasets/flowers/",
                    "format": "image_folder",
                    "inputs": {"x": {"feature": "image", "decode": {"image": "jpeg", "channels": 3}}},
                },
                {
                    "source": "s3://data/team-a/tabular.parquet",
                    "format": "parquet",
                    "inputs": {"x": {"column": "pixels", "shape": [28, 28]}},
                    "label": "label",
                },
            ]
        },
    )

    source: str = Field(
        min_length=1,
        max_length=MAX_SOURCE_LENGTH,
        description='"s3://bucket/prefix/" or "file:///root/sub/" (a folder of shards or images, or one file)',
    )
    format: DatasetFormat  # required here: a reference has no file name to guess from
    name: Name | None = Field(None, description="display name; default: the source")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return normalise_source(value)


def normalise_source(source: str) -> str:
    """The source as stored and compared: ``s3://bucket/key...`` or ``file:///abs/path...``; ValueError names
    what is wrong (422). String checks only: no ``..``/``.``/empty segments, query, fragment, percent-escapes
    (which a reader might decode into ``..``), backslashes or control characters."""
    if "%" in source:
        raise ValueError("the source must not contain percent-escapes; write the path as it is")
    folder = source if source.endswith("/") else source + "/"
    problem = source_prefix_problem(folder)
    if problem:  # never the trailing "/" rule: ``folder`` ends in one
        raise ValueError(f"the source {problem}")
    if source.startswith("s3://") and "/" not in source[len("s3://") :]:
        return source + "/"  # the whole bucket is a folder
    return source


def source_allowed(source: str, prefixes: list[str]) -> bool:
    """Whether the normalised ``source`` lies under one of ``prefixes`` (each ends in "/"), on whole path
    segments: ``s3://data/team-a-evil/`` is not under ``s3://data/team-a/``; the folder itself
    (``s3://data/team-a``) is."""
    folder = source if source.endswith("/") else source + "/"
    return any(folder.startswith(prefix) for prefix in prefixes)


def allowed_prefixes(sources: dict[str, list[str]], tenant: str) -> list[str]:
    """The prefixes ``tenant`` may register from: its own and those listed for every tenant ("*")."""
    return [*sources.get(tenant, []), *sources.get("*", [])]
