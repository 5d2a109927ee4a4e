"""Datasets on the worker side: registration (for ``secateurs.validate_dataset`` in ``worker.tasks``) and
opening one for a job. No Celery here: the task records what ``register`` returns or raises.

Registration turns what the client gave -- an uploaded TFRecord / Parquet file, an archive of shards or of an
image folder, a large ``.npz``, or a ``file://`` / ``s3://`` reference -- into one streamed form: a manifest
(shards with sizes, ETags and record counts; features; the decoded per-sample shapes the API checks jobs
against). Image folders and large ``.npz`` files are converted once, here, into TFRecord shards in the blob
store (status ``converting`` with progress), so every job streams the same way.

Opening for a job (``open_for_job``): below ``SECATEURS_DATASET_MEMORY_BYTES`` of decoded inputs the records are
read into arrays and every stage runs exactly as for an ``.npz``; above it the job gets a bounded sample plus
the stream (``worker.stages.feed.Streamed``), so worker memory does not grow with the dataset.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from app.config import Settings
from app.db.tables import DatasetRecord
from app.storage import Storage

log = logging.getLogger("secateurs.worker.datasets")

# Archives hold shards (kept as they are) or an image folder (converted); these suffixes are shards.
_TFRECORD = (".tfrecord", ".tfrecords", ".tfrecord.gz", ".tfrecords.gz")
_PARQUET = (".parquet",)


def _allowed(settings: Settings, tenant: str) -> list[str]:
    """The prefixes a tenant's references may name (checked again here: the API is not the only writer)."""
    sources = settings.dataset_sources
    return [*sources.get(tenant, []), *sources.get("*", [])]


def _upload_key(storage: Storage, dataset_id: str) -> str:
    prefix = f"datasets/{dataset_id}/upload"
    found = [b.key for b in storage.blobs.list(f"datasets/{dataset_id}/") if b.key.startswith(prefix)]
    if not found:
        raise FileNotFoundError(f"dataset {dataset_id}'s upload is not in the store")
    return found[0]


def _publish_shards(storage: Storage, dataset_id: str, files: list[Path], base: Path) -> str:
    """Put shard files into ``datasets/<id>/shards/`` (names relative to ``base``); returns the blob root."""
    prefix = storage.dataset_shard_prefix(dataset_id)
    for path in files:
        storage.publish(prefix + path.relative_to(base).as_posix(), path)
    return f"blob:{prefix}"


# How often, as a fraction of SECATEURS_REDISPATCH_AFTER_S, a registration says it is alive while it lists or
# builds a manifest (single calls that report nothing themselves: a listing of a million keys can take longer
# than the 900 s after which the reaper sends the registration again, and it would be read twice).
HEARTBEAT_FRACTION = 0.2


class _Heartbeat:
    """``report`` for ``_register``: passes every report on and remembers it; a thread repeats the last one
    (at first ``("validating", None)``: alive, progress unknown) every ``every`` seconds until the end, so the
    record's ``dispatched_at`` stays fresh through listing, sampling and manifest building too."""

    def __init__(self, report: Any, every: float) -> None:
        self._report, self._every = report, every
        self._last: tuple[str, float | None] = ("validating", None)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="dataset-heartbeat", daemon=True)

    def __call__(self, status: str, fraction: float | None) -> None:
        with self._lock:
            self._last = (status, fraction)
            self._report(status, fraction)

    def _beat(self) -> None:
        while not self._done.wait(self._every):
            with self._lock:
                try:
                    self._report(*self._last)
                except Exception:  # a database hiccup: the next beat or report tries again
                    log.warning("dataset heartbeat failed", exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def register(record: DatasetRecord, settings: Settings, storage: Storage, report: Any) -> dict[str, Any]:
    """The manifest of ``record``'s data, converting or unpacking into shards first where needed.

    ``report(status, fraction)`` (``fraction`` None: alive, progress unknown) is called as the work goes and,
    by a heartbeat, at least every ``HEARTBEAT_FRACTION`` x ``redispatch_after_s`` seconds."""
    with _Heartbeat(report, max(0.05, settings.redispatch_after_s * HEARTBEAT_FRACTION)) as beat:
        return _register(record, settings, storage, beat)


def _register(record: DatasetRecord, settings: Settings, storage: Storage, report: Any) -> dict[str, Any]:
    from worker.data.convert import convert_image_folder, convert_npz, detect_layout, unpack_archive
    from worker.data.manifest import build_manifest
    from worker.data.sources import open_source

    description: dict[str, Any] = {k: v for k, v in (record.description or {}).items() if v is not None}
    description.setdefault("format", record.format)
    max_objects = settings.dataset_max_objects
    if record.source:  # a reference: nothing is copied (but an image folder, converted once into shards)
        allowed = _allowed(settings, record.tenant)
        source = open_source(record.source, storage=storage, settings=settings, allowed=allowed)
        if record.format == "image_folder":
            return _convert_folder_reference(record, source, settings, storage, report)
        return build_manifest(source, description, max_objects=max_objects)

    key = _upload_key(storage, record.id)
    suffix = key[len(f"datasets/{record.id}/upload") :]
    if suffix in (*_TFRECORD, *_PARQUET):  # one shard: the upload itself
        source = open_source(f"blob:{key}", storage=storage, settings=settings, allowed=None)
        return build_manifest(source, description, max_objects=max_objects)

    work = Path(tempfile.mkdtemp(prefix=f"dataset-{record.id}-", dir=storage.tmp_dir))
    try:
        upload_source = open_source(f"blob:{key}", storage=storage, settings=settings, allowed=None)
        (upload,) = upload_source.list(1)
        path = upload_source.fetch(upload)
        shards_dir = work / "shards"
        class_names: list[str] | None = None
        if suffix == ".npz":  # a large .npz: once into shards, so jobs stream it like any other dataset
            report("converting", 0.0)
            conversion = convert_npz(
                path,
                shards_dir,
                shard_bytes=settings.dataset_shard_bytes,
                report=lambda f: report("converting", f),
            )
            files, base, description = conversion.shards, shards_dir, {**conversion.description}
        else:
            unpacked = work / "unpacked"
            unpack_archive(path, unpacked)
            layout = detect_layout(unpacked)
            if layout.kind == "image_folder":
                report("converting", 0.0)
                conversion = convert_image_folder(
                    layout.root,
                    shards_dir,
                    shard_bytes=settings.dataset_shard_bytes,
                    report=lambda f: report("converting", f),
                )
                files, base = conversion.shards, shards_dir
                description = dict(
                    conversion.description
                )  # stored as TFRecord; the record keeps image_folder
                class_names = conversion.class_names
            else:
                files, base = layout.files, layout.root
                description["format"] = layout.kind
        root = _publish_shards(storage, record.id, files, base)
        source = open_source(root, storage=storage, settings=settings, allowed=None)
        manifest = build_manifest(source, description, max_objects=max_objects)
        if class_names is not None:
            manifest["class_names"] = class_names
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert_folder_reference(
    record: DatasetRecord, source: Any, settings: Settings, storage: Storage, report: Any
) -> dict[str, Any]:
    """An image folder by reference (``file://`` or ``s3://``) into TFRecord shards in the blob store: jobs
    then read a few large shards instead of one file or GET per image. An ``s3://`` folder is listed (its keys
    name the classes, as folders do) and its images read a few at a time while the shards are written."""
    from worker.data.convert import convert_image_folder, convert_images, image_listing
    from worker.data.manifest import build_manifest
    from worker.data.sources import open_source

    objects = source.list(settings.dataset_max_objects)  # limits, containment, emptiness: before reading
    work = Path(tempfile.mkdtemp(prefix=f"dataset-{record.id}-", dir=storage.tmp_dir))
    try:
        report("converting", 0.0)

        def progress(fraction: float) -> None:
            report("converting", fraction)

        if getattr(source, "local", False):
            conversion = convert_image_folder(
                Path(urlsplit(source.root).path), work, shard_bytes=settings.dataset_shard_bytes, report=progress
            )
        else:
            by_key = {obj.key: obj for obj in objects}
            listing = image_listing(list(by_key))
            conversion = convert_images(
                listing,
                lambda rels: source.read_many(by_key[listing.prefix + rel] for rel in rels),
                work,
                shard_bytes=settings.dataset_shard_bytes,
                report=progress,
            )
        root = _publish_shards(storage, record.id, conversion.shards, work)
        shards = open_source(root, storage=storage, settings=settings, allowed=None)
        manifest = build_manifest(
            shards, dict(conversion.description), max_objects=settings.dataset_max_objects
        )
        manifest["class_names"] = conversion.class_names
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- opening a dataset for a job ----------------------------------------------------------------------------


STRING_BYTES = 64  # a string value's bytes when sizing a dataset against SECATEURS_DATASET_MEMORY_BYTES


def _sample_bytes(arrays: dict[str, Any]) -> int:
    """Decoded bytes per sample of every array (the manifest's per-sample shapes and dtypes)."""
    total = 0
    for info in arrays.values():
        try:
            itemsize = np.dtype(info["dtype"]).itemsize
        except TypeError:  # "string" (token text, encoded bytes): counted as a short string each
            itemsize = STRING_BYTES
        total += math.prod(max(1, int(d or 1)) for d in info["shape"][1:]) * itemsize
    return total


def open_for_job(
    record: DatasetRecord,
    storage: Storage,
    settings: Settings,
    *,
    on_bad_record: str,
    input_specs: dict[str, Any] | None,
) -> tuple[Any, list[str]]:
    """What the pipeline takes for ``record`` -- npz-style arrays (small enough to hold) or ``Streamed`` -- and
    the notes of reading it into memory (images resized, bad records skipped); a streamed set's notes are the
    pipeline's to write (``worker.pipeline``), once the stream has been read."""
    from worker.data.sources import open_source
    from worker.data.stream import StreamedSet
    from worker.stages.feed import SAMPLE_RECORDS, Streamed

    manifest = record.manifest
    assert manifest is not None
    allowed = _allowed(settings, record.tenant) if record.source else None
    source = open_source(manifest["root"], storage=storage, settings=settings, allowed=allowed)
    reader = StreamedSet(manifest, source, on_bad_record=on_bad_record, input_specs=input_specs)
    n = manifest.get("n_samples")
    arrays = manifest.get("arrays") or {}
    if n is not None and n * _sample_bytes(arrays) <= settings.dataset_memory_bytes:
        held = reader.take(n)
        notes = list(reader.notes)
        if reader.skipped:
            notes.append(f"on_bad_record=skip: {reader.skipped} records of dataset {record.id} could not be read and "
                         "were left out")
        return held, notes
    return Streamed(reader.take(SAMPLE_RECORDS), reader), []
