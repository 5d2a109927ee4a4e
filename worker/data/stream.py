"""A manifest's records as batches of model inputs: ``tf.data`` pipelines that never hold the dataset.

Element of ``StreamedSet.dataset(...)`` (always a tuple, so ``x, *rest = element`` works for every set):

- ``(x, y)`` for a labelled set, ``(x,)`` for an unlabelled one; ``with_hash=True`` appends ``bucket``.
- ``x``: dict input name -> tensor ``(batch, ...)``, keyed like the manifest's ``inputs`` (signature input
  names, or ``"x"`` for a single-input model). Images float32 in [0, 255], resized to the model's H, W when
  ``input_specs`` give them; numeric inputs cast to the model's dtype when ``input_specs`` give it.
- ``y``: ``(batch, ...)`` int64 class ids or float32 targets (npz / Parquet: the stored dtype).
- ``bucket``: float64 ``(batch,)`` ``split.record_bucket`` of each record (for K-fold bookkeeping).

How each stored form streams (ARCHITECTURE.md "Large data"):

- TFRecord: shard *paths* come from a generator for a remote source (one Python call per shard, fetched
  through the source only when the pipeline reaches that shard, so a 30 GB set is never on disk at once), or
  as constants for a local root (checked when a pass starts: no Python inside the pass). ``interleave``
  reads up to four shards at a time when shuffling (one, in manifest order, when not), records carry
  ``(shard index, record index)`` only when a pass filters or hashes them (the per-record map that attaches
  them cost ~20% of a pass's CPU), a bounded buffer shuffles serialized records, then records are parsed a
  whole batch at a time (``tf.io.parse_example``) and images decoded per record inside the batch (bench
  ``datasets``: a per-record parse in a parallel ``map`` before batching, as a hand-written pipeline does,
  took ~60% more CPU for the same records); serialized tensors of a batch are read by one ``decode_raw``
  when every record holds the plain ``serialize_tensor`` encoding (``_decode_tensor``).
- Parquet / npz: a generator yields whole column batches (pyarrow record batches with column projection; the
  npz arrays sliced), unbatched in ``tf.data`` for the keep filter and shuffle buffer, then batched again.

Bad records: ``on_bad_record="fail"`` keeps the fast batch-level parse; ``batches()`` / ``iterate()`` turn the
TensorFlow error into a ``RecordError`` naming shard key and record index by re-reading the shards one record
at a time (slow path only after a failure). ``"skip"`` parses record by record so ``ignore_errors`` drops
single records, and counts them (``skipped``) with two counters around the parse.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.data import parquet, split
from worker.data.description import Description, ImageDecode, InputSpec, TensorDecode, parse_description
from worker.data.errors import DataError, DescriptionError, RecordError, SourceError

CYCLE_LENGTH = 4  # shards read at once when shuffling: mixing across shards, bounded disk and memory
READ_ROWS = 1024  # rows per Python call for Parquet / npz
BAD_RECORD = "bad_record"


@dataclass(frozen=True)
class _Shard:
    """Duck-typed ``worker.data.sources.ObjectInfo`` (key, size, etag) when that module is not importable."""

    key: str
    size: int
    etag: str | None


def _object_info(shard: dict[str, Any]) -> Any:
    try:
        from worker.data.sources import ObjectInfo
    except ImportError:  # pragma: no cover - only before DATA-IO's sources.py is merged
        return _Shard(shard["key"], int(shard.get("size") or 0), shard.get("etag"))
    return ObjectInfo(key=shard["key"], size=int(shard.get("size") or 0), etag=shard.get("etag"))


def _tf() -> Any:
    import tensorflow as tf

    return tf


def _seed32(*parts: int) -> int:
    """A 32-bit seed derived from (seed, epoch): same inputs, same order; other epoch, other order."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__


# dtypes whose serialized tensors carry their values as raw little-endian bytes (``tensor_content``) that
# ``tf.io.decode_raw`` reads back: the fast path of a batch of serialized tensors (``_decode_tensor``).
_RAW_DTYPES = frozenset(
    {"uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64"}
)


def _tensor_header(dtype: str, shape: Sequence[int]) -> bytes | None:
    """The bytes ``tf.io.serialize_tensor`` writes before the raw values of a ``dtype`` tensor of ``shape``
    (a fixed shape with at least one value, on a little-endian host), or None when it stores them otherwise."""
    if dtype not in _RAW_DTYPES or sys.byteorder != "little" or not all(isinstance(d, int) for d in shape):
        return None
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size == 0:
        return None
    tf = _tf()
    with tf.init_scope():  # eagerly, also while a tf.data function is being traced
        serialized = tf.io.serialize_tensor(tf.zeros(shape, tf.as_dtype(dtype))).numpy()
    header, content = serialized[:-size], serialized[-size:]
    return header if content == bytes(size) else None


@dataclass(frozen=True)
class _Target:
    """What the model wants for one input: static (H, W) to resize images to, channels, dtype."""

    size: tuple[int, int] | None
    channels: int | None
    dtype: str | None


class StreamedSet:
    """One dataset manifest read through a ``Source``; see the module docstring for what it yields."""

    def __init__(
        self,
        manifest: dict[str, Any],
        source: Any,
        *,
        on_bad_record: str = "fail",
        input_specs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if on_bad_record not in ("fail", "skip"):
            raise ValueError(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
        self.manifest = manifest
        self.source = source
        self.on_bad_record = on_bad_record
        self.shards: list[dict[str, Any]] = list(manifest.get("shards") or [])
        if not self.shards:
            raise SourceError("source_empty", "the dataset manifest lists no shards")
        self._recent: collections.deque[int] = collections.deque(maxlen=4 * CYCLE_LENGTH)
        npz_keys = None
        if manifest.get("format") == "npz" and not manifest.get("inputs") and not manifest.get("arrays"):
            with np.load(self._fetch(0), allow_pickle=False) as z:  # reads the zip directory only
                npz_keys = list(z.files)
        self.description: Description = parse_description(manifest, npz_keys=npz_keys)
        self.n: int | None = manifest.get("n_samples")
        self.notes: list[str] = []
        self._targets = self._resolve_targets(input_specs or {})
        self._gen_error: DataError | None = None
        self._columns: dict[str, parquet.ColumnSpec] | None = None
        self._npz: dict[str, np.ndarray] | None = None
        self._counters: Any = None
        self._lost = 0

    # --- public --------------------------------------------------------------------------------------------

    @property
    def labelled(self) -> bool:
        return self.description.label is not None

    @property
    def skipped(self) -> int:
        """Bad records skipped (``on_bad_record="skip"``) by complete passes so far."""
        if self._counters is None:
            return self._lost
        seen_in, seen_out = self._counters
        return int(seen_in.numpy() - seen_out.numpy()) + self._lost

    def dataset(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        shuffle_buffer: int = 10_000,
        keep: split.KeepFn | None = None,
        augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        drop_remainder: bool = False,
        prefetch: int = 2,
        with_hash: bool = False,
    ) -> Any:
        """A ``tf.data.Dataset`` of batches (module docstring). Shard order and record shuffle are seeded by
        ``(seed, epoch)``; ``keep`` (a ``split.Subset`` or a predicate on the bucket) selects records."""
        tf = _tf()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = self._order(shuffle, seed, epoch, keep)
        # TFRecord ids (shard, record index) only when something reads them: the per-record map that attaches
        # them costs ~15% of a plain pass's CPU. Column batches carry theirs from the generator at no cost.
        ids = (
            with_hash
            or self.on_bad_record == "skip"
            or self.description.format != "tfrecord"
            or not (keep is None or self._whole(keep))
        )
        records = self._records(order, cycle=min(CYCLE_LENGTH, len(order)) if shuffle else 1, ids=ids)
        records = self._filter(records, keep)
        if shuffle:
            records = records.shuffle(
                shuffle_buffer, seed=_seed32(seed, epoch), reshuffle_each_iteration=False
            )
        hseed = split.split_seed(keep)

        def element(ids: Any, x: dict[str, Any], y: Any) -> tuple[Any, ...]:
            out: tuple[Any, ...] = (x,) if y is None else (x, y)
            if with_hash:
                out = (*out, split.record_bucket(ids[0], ids[1], hseed))
            return out

        if self.on_bad_record == "skip":
            seen_in, seen_out = self._skip_counters()
            records = records.map(lambda i, r, p: (seen_in.assign_add(1), (i, r, p))[1])
            parsed = records.map(self._record_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            parsed = parsed.ignore_errors().map(lambda *item: (seen_out.assign_add(1), item)[1])
            batched = parsed.padded_batch(batch_size, drop_remainder=drop_remainder)
            ds = batched.map(lambda ids, x, y=None: element(ids, x, y))
        elif ids:
            batched = records.batch(batch_size, drop_remainder=drop_remainder)
            ds = batched.map(
                lambda i, r, p: element((i, r), *self._finish(self._parse_batch(p), batched=True)),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
        else:  # the common evaluation / training pass: no per-record work before the batch-level parse
            batched = records.batch(batch_size, drop_remainder=drop_remainder)
            ds = batched.map(
                lambda p: element(None, *self._finish(self._parse_batch(p), batched=True)),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
        if augment is not None:
            ds = ds.map(
                lambda x, *rest: (augment(x), *rest), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
            )
        if prefetch:
            ds = ds.prefetch(prefetch)
        return ds

    def batches(self, batch_size: int, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        """Iterate ``dataset(batch_size, **kwargs)``, turning TensorFlow's parse/decode/read errors into a
        ``RecordError`` that names the shard and record (``on_bad_record="fail"``), and counting records lost to
        damaged shards in ``skipped`` (``"skip"``, when the manifest knows each shard's record count)."""
        yield from self.iterate(self.dataset(batch_size, **kwargs), keep=kwargs.get("keep"))

    def iterate(
        self, dataset: Any, *, keep: split.KeepFn | None = None, iterator: Any = None
    ) -> Iterator[tuple[Any, ...]]:
        """``batches`` for a dataset built earlier by ``dataset`` (and extended by the caller), so a pass that
        repeats (every evaluation of a job) does not build and trace its pipeline again: ~0.2 s a pass, as
        much as scoring 5000 small images. Shards of a local root are checked again first (their paths are
        fixed in the pipeline); remote ones are fetched as the pass reaches them. ``iterator``: go on with
        an iterator of ``dataset`` made earlier (a pipeline that repeats its passes keeps one: making an
        iterator instantiates every function of the pipeline again, ~20 ms a pass)."""
        tf = _tf()
        if getattr(self.source, "local", False):
            for index in split.kept_shards(keep, len(self.shards)):
                self._fetch(index)
        self._gen_error = None
        before = self._counter_values()
        if iterator is None:
            iterator = iter(dataset)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                break
            except (tf.errors.InvalidArgumentError, tf.errors.DataLossError, tf.errors.UnknownError) as exc:
                if self._gen_error is not None:
                    raise self._gen_error from exc
                raise self._locate(exc, keep) from exc
            yield item
        if self.on_bad_record == "skip" and keep is None:
            expected = [s.get("records") for s in self.shards]
            if all(isinstance(e, int) for e in expected):
                read = self._counter_values()[0] - before[0]
                self._lost += max(0, sum(expected) - read)

    def take(
        self, n: int, *, keep: split.KeepFn | None = None, seed: int = 0, shuffle: bool = False
    ) -> dict[str, np.ndarray]:
        """The first ``n`` records (after ``keep``; shuffled by ``seed`` when ``shuffle``) as npz-style arrays
        ``x`` / ``x.<input>`` and ``y`` (labelled sets), so ``worker.models.inputs.bind_inputs`` works as for an
        uploaded ``.npz``. Fewer when the set is smaller. Memory O(n)."""
        parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        got = 0
        for item in self.batches(min(max(n, 1), 256), keep=keep, seed=seed, shuffle=shuffle, prefetch=0):
            x = item[0]
            for name, spec in self.description.inputs.items():
                parts[spec.array_key].append(x[name].numpy())
            if self.labelled:
                parts["y"].append(item[1].numpy())
            got += int(next(iter(x.values())).shape[0])
            if got >= n:
                break
        if not parts:
            keys = [spec.array_key for spec in self.description.inputs.values()] + (
                ["y"] if self.labelled else []
            )
            return {key: np.zeros((0,)) for key in keys}
        return {key: np.concatenate(chunks)[:n] for key, chunks in parts.items()}

    def count(self, subsets: Sequence[split.Subset]) -> list[int]:
        """Records each subset selects, exactly. Whole-shard subsets of a manifest that counted every shard
        add the counts up (no read); otherwise one pass over the record ids (shard bytes are read, nothing is
        parsed or decoded) buckets every record once for all the subsets. Records a damaged shard loses count
        as stored: with ``on_bad_record="skip"`` a pass may read fewer."""
        counts = [s.get("records") for s in self.shards]
        if all(sub.whole_shards for sub in subsets) and all(isinstance(c, int) for c in counts):
            return [sum(int(counts[i]) for i in split.kept_shards(sub, len(counts))) for sub in subsets]
        tf = _tf()
        self._gen_error = None
        totals = [0] * len(subsets)
        ids = self._records(list(range(len(self.shards))), cycle=1).map(lambda i, r, p: (i, r))
        try:
            for shard, record in ids.batch(65_536).as_numpy_iterator():
                buckets: dict[int, np.ndarray] = {}
                for j, sub in enumerate(subsets):
                    kept = np.ones(len(shard), bool) if sub.shards is None else np.isin(shard, list(sub.shards))
                    if not sub.whole_shards:
                        if sub.seed not in buckets:
                            buckets[sub.seed] = split.record_bucket_np(shard, record, sub.seed)
                        kept &= np.asarray(sub(buckets[sub.seed]), bool)
                    totals[j] += int(np.count_nonzero(kept))
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError, tf.errors.UnknownError) as exc:
            if self._gen_error is not None:
                raise self._gen_error from exc
            raise self._locate(exc, None) from exc
        return totals

    def part(self, keep: split.Subset, n: int | None = None) -> StreamedPart:
        """The records ``keep`` selects, read like a whole set (a K-fold or validation split of a streamed
        train set); ``n`` is their count when known (``count``)."""
        return StreamedPart(self, keep, n)

    # --- targets (the model's input specs) -----------------------------------------------------------------

    def _resolve_targets(self, input_specs: dict[str, dict[str, Any]]) -> dict[str, _Target]:
        targets: dict[str, _Target] = {}
        for name, spec in self.description.inputs.items():
            model = input_specs.get(name)
            if model is None and name == "x" and len(input_specs) == 1:
                model = next(iter(input_specs.values()))
            if model is None:
                continue
            shape = model.get("shape")
            size = channels = None
            if isinstance(spec.decode, ImageDecode) and shape is not None and len(shape) == 4:
                if shape[1] is not None and shape[2] is not None:
                    size = (int(shape[1]), int(shape[2]))
                channels = shape[3]
                if (
                    spec.decode.channels is not None
                    and channels is not None
                    and spec.decode.channels != channels
                ):
                    raise DataError(
                        "dataset_mismatch",
                        f"input {name!r} decodes images with {spec.decode.channels} channels; the model takes {channels}",
                    )
            targets[name] = _Target(size, channels, model.get("dtype"))
            if size is not None:
                stored = ((self.manifest.get("arrays") or {}).get(spec.array_key) or {}).get("shape")
                if stored is None or len(stored) != 4:
                    self.notes.append(
                        f"input {name!r}: images are resized to {size[0]}x{size[1]} when their size differs"
                    )
                elif None in stored[1:3]:
                    self.notes.append(
                        f"input {name!r}: images (of varying sizes in the sample) are resized to the model's "
                        f"{size[0]}x{size[1]} (tf.image.resize, bilinear)"
                    )
                elif tuple(stored[1:3]) != size:
                    self.notes.append(
                        f"input {name!r}: images ({stored[1]}x{stored[2]} in the sample) are resized to the model's "
                        f"{size[0]}x{size[1]} (tf.image.resize, bilinear)"
                    )
        return targets

    # --- shard order, fetching, record streams -------------------------------------------------------------

    def _order(self, shuffle: bool, seed: int, epoch: int, keep: split.KeepFn | None) -> list[int]:
        order = list(split.kept_shards(keep, len(self.shards)))
        if shuffle and len(order) > 1:
            rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF])
            order = [order[j] for j in rng.permutation(len(order))]
        return order

    def _fetch(self, index: int) -> Path:
        self._recent.append(index)
        return Path(self.source.fetch(_object_info(self.shards[index])))

    def _where(self, index: int) -> str:
        return f"shard {self.shards[index]['key']!r}"

    @staticmethod
    def _whole(keep: split.KeepFn) -> bool:
        return isinstance(keep, split.Subset) and keep.whole_shards

    def _records(self, order: list[int], *, cycle: int, ids: bool = True) -> Any:
        """Dataset of ``(shard index, record index, payload)``: payload = serialized Example or column dict.
        ``ids=False`` (read by TFRecord only): the payloads alone."""
        if self.description.format == "tfrecord":
            return self._tfrecord_records(order, cycle, ids)
        return self._column_records(order)

    def _tfrecord_records(self, order: list[int], cycle: int, ids: bool = True) -> Any:
        tf = _tf()

        def paths() -> Iterator[tuple[int, str]]:
            for index in order:
                yield index, str(self._fetch(index))

        compression = self.description.compression or ""
        skip = self.on_bad_record == "skip"

        def read(index: Any, path: Any) -> Any:
            records = tf.data.TFRecordDataset(path, compression_type=compression)
            if skip:  # a damaged shard is read up to the damage (the loss is counted by batches())
                records = records.ignore_errors()
            if not ids:
                return records
            return records.enumerate().map(lambda r, payload: (index, r, payload))

        if getattr(self.source, "local", False):  # files here already: checked now, no Python in the pass
            shard_paths = tf.data.Dataset.from_tensor_slices(
                (tf.constant(order, tf.int64), tf.constant([str(self._fetch(i)) for i in order], tf.string))
            )
        else:  # fetched (downloaded into the cache) only when the pass reaches the shard
            shard_paths = tf.data.Dataset.from_generator(
                paths, output_signature=(tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string))
            )
        if cycle <= 1:
            return shard_paths.flat_map(read)
        return shard_paths.interleave(
            read, cycle_length=cycle, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    def _column_specs(self) -> dict[str, parquet.ColumnSpec]:
        if self._columns is None:
            d = self.description
            if d.format == "npz":
                arrays = self._npz_arrays()
                self._columns = {
                    name: parquet.ColumnSpec(
                        name,
                        np.dtype(object) if arrays[name].dtype.kind in "US" else arrays[name].dtype,
                        arrays[name].shape[1:],
                    )
                    for name in d.sources
                }
            else:
                wanted: dict[str, tuple[int, ...] | None] = {s.source: s.shape for s in d.inputs.values()}
                if d.label is not None:
                    wanted.setdefault(d.label, None)
                self._columns = parquet.column_specs(self._fetch(0), wanted)
        return self._columns

    def _npz_arrays(self) -> dict[str, np.ndarray]:
        """The npz shard's arrays (small uploads only: larger ``.npz`` are converted to TFRecord shards)."""
        if self._npz is None:
            path = self._fetch(0)
            with np.load(path, allow_pickle=False) as z:
                missing = [name for name in self.description.sources if name not in z.files]
                if missing:
                    raise DescriptionError(
                        "input_invalid", f"the .npz has no arrays {missing}; it has {sorted(z.files)}"
                    )
                self._npz = {name: z[name] for name in self.description.sources}
            lengths = {name: len(a) for name, a in self._npz.items()}
            if len(set(lengths.values())) > 1:
                raise DataError(
                    "dataset_mismatch", f"npz arrays have different numbers of samples: {lengths}"
                )
        return self._npz

    def _column_batches(self, index: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        if self.description.format == "npz":
            arrays = self._npz_arrays()
            total = len(next(iter(arrays.values())))
            for start in range(0, total, READ_ROWS):
                yield start, {name: a[start : start + READ_ROWS] for name, a in arrays.items()}
            return
        yield from parquet.iter_batches(
            self._fetch(index), self._column_specs(), READ_ROWS, self.shards[index]["key"]
        )

    def _column_records(self, order: list[int]) -> Any:
        tf = _tf()
        specs = self._column_specs()

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
            try:
                for index in order:
                    for start, columns in self._column_batches(index):
                        rows = len(next(iter(columns.values())))
                        yield (
                            np.full(rows, index, np.int64),
                            np.arange(start, start + rows, dtype=np.int64),
                            columns,
                        )
            except DataError as exc:  # surfaces as a TF error; batches() re-raises ours
                self._gen_error = exc
                raise

        def tf_dtype(spec: parquet.ColumnSpec) -> Any:
            return tf.string if spec.dtype == np.dtype(object) else tf.as_dtype(spec.dtype)

        signature = (
            tf.TensorSpec((None,), tf.int64),
            tf.TensorSpec((None,), tf.int64),
            {name: tf.TensorSpec((None, *spec.shape), tf_dtype(spec)) for name, spec in specs.items()},
        )
        return tf.data.Dataset.from_generator(batches, output_signature=signature).unbatch()

    def _filter(self, records: Any, keep: split.KeepFn | None) -> Any:
        if keep is None or (isinstance(keep, split.Subset) and keep.whole_shards):
            return records
        hseed = split.split_seed(keep)
        return records.filter(lambda i, r, p: keep(split.record_bucket(i, r, hseed)))

    # --- parsing and decoding ------------------------------------------------------------------------------

    def _parse_batch(self, payload: Any) -> dict[str, Any]:
        if self.description.format != "tfrecord":
            return payload
        tf = _tf()
        d = self.description
        return tf.io.parse_example(payload, {name: d.features[name].tf_spec() for name in d.sources})

    def _parse_one(self, payload: Any) -> dict[str, Any]:
        if self.description.format != "tfrecord":
            return payload
        tf = _tf()
        d = self.description
        return tf.io.parse_single_example(payload, {name: d.features[name].tf_spec() for name in d.sources})

    def _dense(self, name: str, value: Any, batched: bool) -> Any:
        """Densify a var_len feature (fill = its default), padded or cut to its declared length."""
        tf = _tf()
        if not isinstance(value, tf.SparseTensor):
            return value
        feature = self.description.features[name]
        dense = tf.sparse.to_dense(value, default_value=tf.constant(feature.fill, tf.as_dtype(feature.dtype)))
        if feature.shape:
            length = feature.shape[0]
            dense = dense[..., :length]
            pad = [[0, 0]] * (dense.shape.rank - 1) + [[0, length - tf.shape(dense)[-1]]]
            dense = tf.pad(dense, pad, constant_values=feature.fill)
            dense = tf.ensure_shape(dense, ([None] if batched else []) + [length])
        return dense

    def _record_shape(self, spec: InputSpec) -> list[int | None]:
        decode, target = spec.decode, self._targets.get(spec.name)
        if isinstance(decode, TensorDecode):
            return list(decode.shape)
        assert isinstance(decode, ImageDecode)
        channels = decode.channels or (target.channels if target else None)
        size = target.size if target else None
        return [*(size or (None, None)), channels]

    def _decode(self, spec: InputSpec, value: Any) -> Any:
        """One record's bytes -> tensor: image (float32 [0, 255], resized to the model's H, W) or tensor."""
        tf = _tf()
        decode = spec.decode
        if isinstance(decode, TensorDecode):
            return tf.ensure_shape(
                tf.io.parse_tensor(value, out_type=tf.as_dtype(decode.dtype)), decode.shape
            )
        assert isinstance(decode, ImageDecode)
        target = self._targets.get(spec.name)
        channels = decode.channels or (target.channels if target else None) or 0
        if decode.format == "jpeg":
            image = tf.io.decode_jpeg(value, channels=channels)
        elif decode.format == "png":
            image = tf.io.decode_png(value, channels=channels)
        else:
            image = tf.io.decode_image(value, channels=channels, expand_animations=False)
        image = tf.cast(image, tf.float32)
        if target is not None and target.size is not None:
            size = tf.constant(target.size, tf.int32)
            same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
            image = tf.cond(same, lambda: image, lambda: tf.image.resize(image, size))
        return tf.ensure_shape(image, self._record_shape(spec))

    def _cast(self, spec: InputSpec, value: Any) -> Any:
        tf = _tf()
        target = self._targets.get(spec.name)
        if target is None or target.dtype is None or value.dtype == tf.string:
            return value
        return tf.cast(value, tf.as_dtype(target.dtype))

    def _record_map(self, index: Any, record: Any, payload: Any) -> tuple[Any, ...]:
        """One record -> ((shard index, record index), x[, y]): the record-at-a-time path."""
        x, y = self._finish(self._parse_one(payload), batched=False)
        return ((index, record), x) if y is None else ((index, record), x, y)

    def _finish(self, raw: dict[str, Any], *, batched: bool) -> tuple[dict[str, Any], Any]:
        """Parsed features / columns -> (x keyed by input name, y or None)."""
        tf = _tf()
        x: dict[str, Any] = {}
        for name, spec in self.description.inputs.items():
            value = self._dense(spec.source, raw[spec.source], batched)
            if spec.decode is not None:
                if batched and isinstance(spec.decode, TensorDecode):
                    value = self._decode_tensor(spec.decode, value, batched=True)
                elif batched:
                    value = tf.map_fn(
                        lambda v, spec=spec: self._decode(spec, v),
                        value,
                        fn_output_signature=tf.TensorSpec(self._record_shape(spec), tf.float32),
                    )
                else:
                    value = self._decode(spec, value)
            x[name] = self._cast(spec, value)
        y = None
        label, decode = self.description.label, self.description.label_decode
        if label is not None:
            y = self._dense(label, raw[label], batched)
            if decode is not None:
                y = self._decode_tensor(decode, y, batched)
        return x, y

    def _decode_tensor(self, decode: TensorDecode, value: Any, batched: bool) -> Any:
        """Serialized tensors (``tf.io.serialize_tensor``) -> values; a batch of them at once when it can."""
        tf = _tf()
        dtype = tf.as_dtype(decode.dtype)

        def one(v: Any) -> Any:
            return tf.ensure_shape(tf.io.parse_tensor(v, out_type=dtype), decode.shape)

        if not batched:
            return one(value)

        def each() -> Any:
            return tf.map_fn(one, value, fn_output_signature=tf.TensorSpec(decode.shape, dtype))

        header = _tensor_header(decode.dtype, decode.shape)
        if header is None:
            return each()
        # Fast path (bench ``datasets``: ``map_fn`` of ``parse_tensor`` per record was most of an evaluation
        # pass's reader CPU): a fixed-shape numeric tensor serializes as one constant header (dtype, shape,
        # content length) followed by its raw bytes. When every record of the batch is exactly that header plus
        # that many bytes, ``decode_raw`` of the whole batch gives what ``parse_tensor`` would; any other
        # encoding (values in typed fields, other fields, another shape) takes the per-record parse, which also
        # raises the same errors as before.
        size = int(np.prod(decode.shape, dtype=np.int64)) * dtype.size
        total = len(header) + size
        uniform = tf.reduce_all(
            (tf.strings.length(value) == total) & (tf.strings.substr(value, 0, len(header)) == header)
        )

        def raw() -> Any:
            flat = tf.io.decode_raw(tf.strings.substr(value, len(header), size), dtype)
            return tf.reshape(flat, [-1, *decode.shape])

        return tf.ensure_shape(tf.cond(uniform, raw, each), [None, *decode.shape])

    # --- skip counting and error location ------------------------------------------------------------------

    def _skip_counters(self) -> tuple[Any, Any]:
        if self._counters is None:
            tf = _tf()
            self._counters = (
                tf.Variable(0, dtype=tf.int64, trainable=False),
                tf.Variable(0, dtype=tf.int64, trainable=False),
            )
        return self._counters

    def _counter_values(self) -> tuple[int, int]:
        if self._counters is None:
            return 0, 0
        return int(self._counters[0].numpy()), int(self._counters[1].numpy())

    def _locate(self, exc: BaseException, keep: split.KeepFn | None) -> DataError:
        """Find the first bad record by reading shards one record at a time: the shards the failing pass opened
        last first, then the rest."""
        candidates = list(
            dict.fromkeys([*reversed(self._recent), *split.kept_shards(keep, len(self.shards))])
        )
        for index in candidates:
            found = self._scan_shard(index, keep)
            if found is not None:
                return found
        hint = ""
        if any(isinstance(s.decode, ImageDecode) for s in self.description.inputs.values()) and not any(
            t.size for t in self._targets.values()
        ):
            hint = " (images of different sizes batch only when the model's input size is known to resize to)"
        return RecordError(BAD_RECORD, f"reading the dataset failed: {_reason(exc)}{hint}")

    def _bad(self, index: int, record: int, code: str, reason: str) -> RecordError:
        key = self.shards[index]["key"]
        return RecordError(
            code,
            f"shard {key!r} record {record} (counting from 0) cannot be read: {reason}. Fix or remove it, or "
            "read the dataset with on_bad_record 'skip'",
            shard=key,
            index=record,
        )

    def _scan_shard(self, index: int, keep: split.KeepFn | None) -> DataError | None:
        """The first bad record of one shard (within ``keep``), or None when every record reads."""
        tf = _tf()
        self._gen_error = None
        if self.description.format == "tfrecord":
            raw = tf.data.TFRecordDataset(
                str(self._fetch(index)), compression_type=self.description.compression or ""
            )
            good = int(raw.ignore_errors().reduce(np.int64(0), lambda n, _: n + 1))
            try:
                raw.reduce(np.int64(0), lambda n, _: n + 1)
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as exc:
                return self._bad(index, good, BAD_RECORD, f"the file is damaged there ({_reason(exc)})")
        records = self._filter(self._records([index], cycle=1), keep)
        try:
            wanted = [int(r) for r in records.map(lambda i, r, p: r).as_numpy_iterator()]
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as exc:
            if self._gen_error is not None:
                return self._gen_error
            return RecordError(BAD_RECORD, f"{self._where(index)} cannot be read: {_reason(exc)}")
        ok = records.map(self._record_map).ignore_errors()
        seen = {int(ids[1]) for ids, *_ in ok.as_numpy_iterator()}
        for record in wanted:
            if record not in seen:
                return self._why(index, record)
        return None

    def _why(self, index: int, record: int) -> RecordError:
        """The error of one record read again on its own: ``bad_record`` when it does not parse, ``bad_image``
        when it parses but an image does not decode."""
        tf = _tf()
        errors = (tf.errors.InvalidArgumentError, tf.errors.DataLossError)
        for _, _, payload in self._records([index], cycle=1).skip(record).take(1):
            try:
                raw = self._parse_one(payload)
            except errors as exc:
                return self._bad(index, record, BAD_RECORD, _reason(exc))
            try:
                self._finish(raw, batched=False)
            except errors as exc:
                images = any(isinstance(s.decode, ImageDecode) for s in self.description.inputs.values())
                return self._bad(index, record, "bad_image" if images else BAD_RECORD, _reason(exc))
        return self._bad(index, record, BAD_RECORD, "it does not parse or decode")


class StreamedPart:
    """Part of a ``StreamedSet`` (a fold, a validation split) with the reader interface the stages use:
    ``n``, ``batches``, ``dataset``, ``take``, ``notes``, ``skipped``. Every pass filters with ``keep`` (whole
    shards outside it are never fetched), so a fold streams through exactly the path of a whole set."""

    def __init__(self, base: StreamedSet, keep: split.Subset, n: int | None) -> None:
        self.base, self.keep, self.n = base, keep, n

    @property
    def labelled(self) -> bool:
        return self.base.labelled

    @property
    def notes(self) -> list[str]:
        return self.base.notes

    @property
    def skipped(self) -> int:
        return self.base.skipped

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.base.shards

    def dataset(self, batch_size: int, **kwargs: Any) -> Any:
        return self.base.dataset(batch_size, keep=self.keep, **kwargs)

    def batches(self, batch_size: int, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        return self.base.batches(batch_size, keep=self.keep, **kwargs)

    def iterate(self, dataset: Any, *, iterator: Any = None) -> Iterator[tuple[Any, ...]]:
        return self.base.iterate(dataset, keep=self.keep, iterator=iterator)

    @property
    def on_bad_record(self) -> str:
        return self.base.on_bad_record

    def take(self, n: int, **kwargs: Any) -> dict[str, np.ndarray]:
        return self.base.take(n, keep=self.keep, **kwargs)


def sample_arrays(manifest: dict[str, Any], source: Any, n: int = 8) -> dict[str, dict[str, Any]]:
    """The manifest's ``arrays`` entry: per npz-style key, ``{"shape": [n_samples or -1, ...per sample],
    "dtype"}`` after decoding the first ``n`` records (a per-sample size that varies in the sample is null)."""
    tf = _tf()
    streamed = StreamedSet(manifest, source)
    d = streamed.description
    records = streamed._records(list(range(len(streamed.shards))), cycle=1)
    decoded = records.take(n).map(streamed._record_map)
    shapes: dict[str, list[tuple[int, ...]]] = collections.defaultdict(list)
    dtypes: dict[str, str] = {}
    try:
        for _, x, *rest in decoded:
            y = rest[0] if rest else None
            for name, spec in d.inputs.items():
                shapes[spec.array_key].append(tuple(x[name].shape))
                dtypes[spec.array_key] = x[name].dtype.name
            if y is not None:
                shapes["y"].append(tuple(y.shape))
                dtypes["y"] = y.dtype.name
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError, tf.errors.UnknownError) as exc:
        if streamed._gen_error is not None:
            raise streamed._gen_error from exc
        raise streamed._locate(exc, None) from exc
    if not shapes:
        raise SourceError("source_empty", "the dataset holds no records")
    first = manifest.get("n_samples")
    lead = first if isinstance(first, int) else -1
    out: dict[str, dict[str, Any]] = {}
    for key, seen in shapes.items():
        ranks = {len(s) for s in seen}
        if len(ranks) > 1:
            raise RecordError(BAD_RECORD, f"array {key!r}: records have different ranks {sorted(ranks)}")
        dims = [seen[0][k] if all(s[k] == seen[0][k] for s in seen) else None for k in range(len(seen[0]))]
        out[key] = {"shape": [lead, *dims], "dtype": dtypes[key]}
    return out


def n_records(manifest: dict[str, Any]) -> int | None:
    """Sum of the shards' record counts when every one is known (else None)."""
    counts = [s.get("records") for s in manifest.get("shards") or []]
    return sum(counts) if counts and all(isinstance(c, int) for c in counts) else None
