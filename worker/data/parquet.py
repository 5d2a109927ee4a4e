"""Parquet shards as NumPy column batches (pyarrow record batches, column projection), no TensorFlow here.

The stream turns each batch into one ``tf.data`` element (one Python call per batch, never per record: the
per-element ``from_generator`` path is >10x slower, ARCHITECTURE.md). Fixed-size list columns (and plain list
columns whose rows all hold the same number of values) become arrays of the input's ``shape``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.data.errors import DescriptionError, RecordError


@dataclass(frozen=True)
class ColumnSpec:
    """How one column reads: NumPy dtype of its values (object = bytes/str) and the per-row shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def _value_type(arrow_type):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    dims: list[int] = []
    t = arrow_type
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        dims.append(t.list_size if pa.types.is_fixed_size_list(t) else -1)
        t = t.value_type
    return t, dims


def column_specs(path: Path, wanted: dict[str, tuple[int, ...] | None]) -> dict[str, ColumnSpec]:
    """Column name -> spec from the file footer; ``wanted`` maps a column to the shape the description gives
    (None: scalar, or the fixed-size list's own sizes). Missing columns and unknown sizes raise
    ``DescriptionError`` naming them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(path).schema_arrow
    specs: dict[str, ColumnSpec] = {}
    for name, shape in wanted.items():
        if name not in schema.names:
            raise DescriptionError(
                "feature_mismatch", f"column {name!r} is not in the Parquet schema {schema.names}"
            )
        value, dims = _value_type(schema.field(name).type)
        if (
            pa.types.is_binary(value)
            or pa.types.is_large_binary(value)
            or pa.types.is_string(value)
            or pa.types.is_large_string(value)
        ):
            dtype = np.dtype(object)
        elif pa.types.is_floating(value) or pa.types.is_integer(value) or pa.types.is_boolean(value):
            dtype = np.dtype(value.to_pandas_dtype())
        else:
            raise DescriptionError(
                "feature_mismatch", f"column {name!r} has type {value}, which the stream cannot read"
            )
        if shape is None:
            if any(d < 0 for d in dims):
                raise DescriptionError(
                    "feature_mismatch",
                    f"column {name!r} is a variable-length list: give its input a shape",
                )
            shape = tuple(dims)
        elif not dims:
            raise DescriptionError(
                "feature_mismatch", f"column {name!r} is a scalar column; it takes no shape"
            )
        elif all(d >= 0 for d in dims) and math.prod(shape) != math.prod(dims):
            raise DescriptionError(
                "feature_mismatch",
                f"column {name!r} holds {math.prod(dims)} values per row; shape {list(shape)} needs {math.prod(shape)}",
            )
        specs[name] = ColumnSpec(name, dtype, tuple(shape))
    return specs


def column_to_numpy(array, spec: ColumnSpec, where: str, key: str, start: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """One Arrow column chunk -> (rows, *shape) NumPy array; nulls and ragged rows raise ``RecordError``
    (``index``: the chunk's first row)."""
    import pyarrow as pa

    def bad(message: str) -> RecordError:
        return RecordError("bad_record", message, shard=key, index=start)

    n = len(array)
    if array.null_count:
        raise bad(f"{where}: column {spec.name!r} has null values")
    flat = array
    while (
        pa.types.is_list(flat.type)
        or pa.types.is_large_list(flat.type)
        or pa.types.is_fixed_size_list(flat.type)
    ):
        if flat.null_count:
            raise bad(f"{where}: column {spec.name!r} has null list items")
        flat = flat.flatten()
    values = flat.to_numpy(zero_copy_only=False)
    per_row = math.prod(spec.shape)
    if values.size != n * per_row:
        raise bad(
            f"{where}: column {spec.name!r} holds {values.size} values for {n} rows; shape {list(spec.shape)} "
            f"needs {per_row} per row",
        )
    if spec.dtype != np.dtype(object):
        values = values.astype(spec.dtype, copy=False)
    return values.reshape((n, *spec.shape))


def iter_batches(
    path: Path, specs: dict[str, ColumnSpec], rows: int, key: str
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first row index, column arrays) per record batch of at most ``rows`` rows, reading only ``specs``."""
    import pyarrow.parquet as pq

    columns: Sequence[str] = list(specs)
    start = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns):
        where = f"shard {key!r} rows {start}..{start + batch.num_rows - 1}"
        yield (
            start,
            {name: column_to_numpy(batch.column(name), specs[name], where, key, start) for name in columns},
        )
        start += batch.num_rows
