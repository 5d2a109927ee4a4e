"""Datasets: uploads (a small ``.npz`` checked and ready at once; TFRecord, Parquet, archives of shards or of an
image folder, and large ``.npz`` kept as sent and validated by a worker) and references to data the workers read
where it lies (``application/json``: ``s3://`` or ``file://`` under SECATEURS_DATASET_SOURCES)."""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.api.deps import (
    CeleryDep,
    IdempotencyDep,
    IdempotencyKeyDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    TenantDep,
)
from app.api.idempotency import UPLOAD_LOCK_S, Attempt, json_fingerprint, upload_fingerprint
from app.api.multipart import Upload, receive_upload
from app.api.paging import set_next_link
from app.api.routes.models import ERRORS
from app.api.uploads import ensure_free_space, multipart_body, send_or_undo
from app.archive import DATASET_ARCHIVES, ArchiveLimits, inspect_dataset_archive
from app.config import Settings
from app.db import jobs, records
from app.db.engine import session_scope
from app.db.tables import DatasetRecord, utcnow
from app.errors import (
    Conflict,
    Forbidden,
    NotFound,
    Unprocessable,
    UnsupportedFormat,
    UnsupportedMediaType,
)
from app.npz import NpzLimits, inspect_npz
from app.presenters import dataset_out
from app.queue import VALIDATE_DATASET
from app.schemas.datasets import (
    DatasetDescription,
    DatasetReference,
    allowed_prefixes,
    source_allowed,
)
from app.schemas.resources import DatasetOut, Page, Problem
from app.storage import Storage

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
DATASET_ERRORS = {
    **ERRORS,
    403: {
        "model": Problem,
        "description": "the source is outside the prefixes SECATEURS_DATASET_SOURCES allows",
    },
}
# File name endings -> (stored extension, format). Longest first: ".tfrecord.gz" before ".gz" kinds.
UPLOAD_KINDS: tuple[tuple[str, str, str], ...] = (
    (".tfrecord.gz", ".tfrecord.gz", "tfrecord"),
    (".tfrecords", ".tfrecord", "tfrecord"),
    (".tfrecord", ".tfrecord", "tfrecord"),
    (".parquet", ".parquet", "parquet"),
    (".npz", ".npz", "npz"),
    (".tar", ".tar", "archive"),
    (".zip", ".zip", "archive"),
)
ACCEPTED = (
    "an .npz (arrays x and y), a .tfrecord / .tfrecord.gz / .tfrecords file, a .parquet file, or "
    + DATASET_ARCHIVES
    + " (with form field 'description' as needed); or register data by reference with an application/json "
    'body {"source", "format", ...}'
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrecord.gz")
_JUNK = ("__MACOSX/", ".DS_Store", "Thumbs.db")
_MAX_DESCRIPTION_BYTES = 64 << 10


def _errors_of(exc: ValidationError, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "loc": ".".join([prefix, *(str(p) for p in e["loc"])]).strip("."),
            "msg": e["msg"],
            "type": e["type"],
        }
        for e in exc.errors(include_url=False)
    ]


def _unprocessable(what: str, errors: list[dict[str, Any]]) -> Unprocessable:
    summary = "; ".join(f"{e['loc'] or 'body'}: {e['msg']}" for e in errors[:5])
    return Unprocessable(f"{what}: {summary}", extra={"errors": errors})


def _description(upload: Upload) -> DatasetDescription:
    raw = upload.fields.get("description")
    if not raw:
        return DatasetDescription()
    try:
        return DatasetDescription.model_validate_json(raw)
    except ValidationError as exc:
        raise _unprocessable(
            "the form field 'description' is not a valid dataset description", _errors_of(exc, "description")
        ) from exc


def _upload_kind(upload: Upload, description: DatasetDescription, settings: Settings) -> tuple[str, str]:
    """(stored extension, kind: npz | tfrecord | parquet | archive) from the name, confirmed by the bytes."""
    name = upload.filename.lower()
    match = next(((ext, kind) for suffix, ext, kind in UPLOAD_KINDS if name.endswith(suffix)), None)
    if match is None:
        shown = repr(upload.filename) if upload.filename else "the upload (no file name)"
        raise UnsupportedFormat(f"{shown} is not a dataset file this service reads; accepted: {ACCEPTED}")
    ext, kind = match
    with upload.path.open("rb") as f:
        head = f.read(512)
        f.seek(max(upload.size - 4, 0))
        tail = f.read(4)
    bad = None
    if kind == "npz" and upload.size > settings.convert_above_bytes and not head.startswith(b"PK"):
        # (a small one is inspected whole by inspect_npz, whose messages name what the file is instead)
        bad = "named .npz but is not a zip file (save it with numpy.savez or savez_compressed)"
    elif kind == "parquet" and not (head.startswith(b"PAR1") and tail == b"PAR1" and upload.size >= 12):
        bad = "named .parquet but lacks the PAR1 magic at both ends (truncated, or not Parquet)"
    elif ext == ".tfrecord.gz" or (ext == ".tfrecord" and description.compression == "GZIP"):
        if not head.startswith(b"\x1f\x8b"):
            bad = "not gzip-compressed although named .tfrecord.gz / described with compression GZIP"
    elif ext == ".tfrecord" and description.compression is None:
        # A TFRecord starts with the first record's length (uint64 LE) and that length's CRC: the record
        # must fit in the file. (The CRCs are the worker's to check.)
        length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
        if length is None or 16 + length > upload.size:
            bad = "not a TFRecord file (its first record's length does not fit the file; compressed? set compression)"
    if bad:
        raise UnsupportedFormat(f"{upload.filename!r} is {bad}; accepted: {ACCEPTED}")
    if description.format is not None:
        expected = {"npz": ("npz",), "tfrecord": ("tfrecord",), "parquet": ("parquet",)}.get(
            kind, ("tfrecord", "parquet", "image_folder")
        )
        if description.format not in expected:
            msg = f"description.format {description.format!r} does not match the file {upload.filename!r} ({kind})"
            raise Unprocessable(msg, extra={"errors": [{"loc": "description.format", "msg": msg}]})
    return ext, kind


def _archive_format(files: tuple[str, ...], description: DatasetDescription) -> str:
    """What an archive holds: description.format, else guessed from its files (the worker checks them)."""
    if description.format is not None:
        return description.format
    files = tuple(
        f for f in files if not any(j in f for j in _JUNK) and not f.rsplit("/", 1)[-1].startswith(".")
    )
    lower = [f.lower() for f in files]
    if lower and all(f.endswith(".parquet") for f in lower):
        return "parquet"
    if lower and all(f.endswith(_TFRECORD_SUFFIXES) for f in lower):
        return "tfrecord"
    if any("/" in f and f.endswith(_IMAGE_SUFFIXES) for f in lower):
        return "image_folder"
    msg = (
        "the archive holds neither only .parquet / .tfrecord shards nor an image folder (<class>/<image>.jpg|png); "
        'say what it holds with the form field description, e.g. {"format": "tfrecord"}'
    )
    raise Unprocessable(msg, extra={"errors": [{"loc": "description.format", "msg": msg}]})


def _check_and_register(
    request: Request, upload: Upload, storage: Storage, settings: Settings, tenant: str, attempt: Attempt
) -> tuple[DatasetRecord, dict[str, Any], dict[str, str]]:
    """Check the upload, keep it, and record the dataset and (same transaction) its idempotent response.

    A small .npz is inspected whole and ready at once (as before); everything else is kept as sent under
    ``datasets/<id>/upload<ext>`` with status ``validating`` for the worker (``pending`` in the record)."""
    try:
        description = _description(upload)
        ext, kind = _upload_kind(upload, description, settings)
        dataset_format = kind
        info = None
        if kind == "npz" and upload.size <= settings.convert_above_bytes:
            info = inspect_npz(upload.path, NpzLimits(max_bytes_uncompressed=settings.max_uncompressed_bytes))
        elif kind == "archive":
            limits = ArchiveLimits(
                max_members=settings.dataset_max_objects + settings.max_archive_members,  # files + folders
                max_uncompressed_bytes=max(settings.max_uncompressed_bytes, settings.max_dataset_bytes),
                max_ratio=settings.max_compression_ratio,
            )
            dataset_format = _archive_format(inspect_dataset_archive(upload.path, limits).files, description)
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    dataset_id = records.new_id("ds")
    name = (upload.fields.get("name") or upload.filename or dataset_id)[:256]
    if info is not None:
        upload.commit(storage, storage.dataset_key(dataset_id))  # a rename, or a streamed put into S3
        record = DatasetRecord(
            id=dataset_id,
            tenant=tenant,
            name=name,
            size_bytes=upload.size,
            sha256=upload.sha256,
            arrays=info.arrays,
            n_samples=info.n_samples,
            format="npz",
            status="ready",
        )
    else:
        upload.commit(storage, storage.dataset_upload_key(dataset_id, ext))
        stored = description.stored()
        if ext == ".tfrecord.gz" and stored.get("compression") is None:
            stored["compression"] = "GZIP"
        record = DatasetRecord(
            id=dataset_id,
            tenant=tenant,
            name=name,
            size_bytes=upload.size,
            sha256=upload.sha256,
            format=dataset_format,
            status="validating",
            description=stored,
            dispatched_at=utcnow(),
        )
    try:
        with session_scope(request.app.state.session_factory) as session:
            records.add(session, record)
            body = dataset_out(record).model_dump(mode="json")
            headers = {"Location": f"/v1/datasets/{record.id}"}
            attempt.complete(session, 201, body, headers)
    except BaseException:
        storage.remove_dataset(dataset_id)
        raise
    return record, body, headers


def _reference_body() -> dict[str, Any]:
    """DatasetReference's JSON Schema with its definitions inlined (the route parses the body itself)."""
    schema = DatasetReference.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline({**defs[ref.split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def _openapi_body() -> dict[str, Any]:
    body = multipart_body(
        "an .npz with arrays `x` (or `x.<input>`) and `y` (or `y.<output>`); a .tfrecord / .tfrecord.gz / "
        ".tfrecords or .parquet file; or a .tar / .zip of shards or of an image folder (<class>/<image>)"
    )
    form = body["requestBody"]["content"]["multipart/form-data"]["schema"]
    description = DatasetDescription.model_json_schema()
    form["properties"]["description"] = {
        "type": "string",
        "contentMediaType": "application/json",
        "description": "optional JSON object: format, compression, features, inputs, label (as in the "
        "application/json registration, without source)",
        "maxLength": _MAX_DESCRIPTION_BYTES,
    }
    del description
    body["requestBody"]["content"]["application/json"] = {"schema": _reference_body()}
    return body


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses=DATASET_ERRORS,
    openapi_extra=_openapi_body(),
    summary="Upload a dataset file, or register data by reference (application/json)",
)
async def upload_dataset(
    request: Request,
    storage: StorageDep,
    settings: SettingsDep,
    celery: CeleryDep,
    tenant: TenantDep,
    idempotency: IdempotencyDep,
    key: IdempotencyKeyDep,
) -> JSONResponse:
    """``multipart/form-data`` with ``file`` (and ``name``, ``description``), or ``application/json`` with a
    source: s3:// or file:// under a prefix SECATEURS_DATASET_SOURCES allows the caller's tenant. Every kind
    but a small .npz starts ``validating``: poll GET /v1/datasets/{id} until ``ready`` or ``invalid``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        return await _register_reference(request, settings, celery, tenant, idempotency, key)
    if content_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"POST /v1/datasets takes multipart/form-data (field 'file': a dataset file) or application/json "
            f'(a reference: {{"source", "format", ...}}), not {content_type or "a body without Content-Type"!r}'
        )
    attempt = await run_in_threadpool(
        idempotency.begin, tenant, key, "POST /v1/datasets", None, lock_seconds=UPLOAD_LOCK_S, retry_after=10
    )
    try:
        ensure_free_space(storage, settings)
        upload = await receive_upload(
            request,
            storage.tmp_dir,
            text_fields=frozenset({"name", "description"}),
            max_bytes=settings.max_dataset_bytes,
            max_text_bytes=_MAX_DESCRIPTION_BYTES,
        )
    except BaseException:  # not fully received: nothing to compare a retry with, so the key is released
        await run_in_threadpool(attempt.release)
        raise
    fingerprint = upload_fingerprint(upload)
    if attempt.previous is not None:
        upload.discard()
        return attempt.replay(fingerprint)
    try:
        await run_in_threadpool(attempt.bind_fingerprint, fingerprint)
        record, body, headers = await run_in_threadpool(
            _check_and_register, request, upload, storage, settings, tenant, attempt
        )
        if record.status != "ready":
            await send_or_undo(celery, VALIDATE_DATASET, record.id, lambda: _forget(request, storage, record.id))
    except BaseException as exc:
        await run_in_threadpool(attempt.fail, exc)
        raise
    return JSONResponse(body, status_code=201, headers=headers)


async def _register_reference(
    request: Request, settings: Settings, celery: Any, tenant: str, idempotency: Any, key: str | None
) -> JSONResponse:
    raw = await request.body()
    fingerprint = json_fingerprint(raw)
    attempt = await run_in_threadpool(idempotency.begin, tenant, key, "POST /v1/datasets", fingerprint)
    if attempt.previous is not None:
        return attempt.replay(fingerprint)
    try:
        reference = _parse_reference(raw)
        _check_access(reference.source, settings, tenant)
        record, body, headers = await run_in_threadpool(
            _record_reference, request, reference, tenant, attempt
        )
        await send_or_undo(celery, VALIDATE_DATASET, record.id, lambda: _forget(request, None, record.id))
    except BaseException as exc:
        await run_in_threadpool(attempt.fail, exc)
        raise
    return JSONResponse(body, status_code=201, headers=headers)


def _parse_reference(raw: bytes) -> DatasetReference:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        msg = f"the body is not valid JSON ({exc})"
        raise Unprocessable(msg, extra={"errors": [{"loc": "body", "msg": msg}]}) from exc
    if not isinstance(data, dict):
        msg = 'the body must be a JSON object such as {"source": "s3://bucket/prefix/", "format": "tfrecord"}'
        raise Unprocessable(msg, extra={"errors": [{"loc": "body", "msg": msg}]})
    try:
        return DatasetReference.model_validate(data)
    except ValidationError as exc:
        raise _unprocessable("the dataset reference is not valid", _errors_of(exc, "")) from exc


def _check_access(source: str, settings: Settings, tenant: str) -> None:
    prefixes = allowed_prefixes(settings.dataset_sources, tenant)
    if source_allowed(source, prefixes):
        return
    if not settings.dataset_sources:
        why = "this server allows no dataset references (SECATEURS_DATASET_SOURCES is not set)"
    elif not prefixes:
        why = f"SECATEURS_DATASET_SOURCES allows no source prefix for tenant {tenant!r}"
    else:
        why = (
            f"it is not under a prefix SECATEURS_DATASET_SOURCES allows tenant {tenant!r}: {sorted(prefixes)}"
        )
    raise Forbidden(
        f"the source {source!r} may not be read: {why}. Ask the operator to add its prefix to "
        "SECATEURS_DATASET_SOURCES, or upload the data instead",
        extra={"setting": "SECATEURS_DATASET_SOURCES"},
    )


def _record_reference(
    request: Request, reference: DatasetReference, tenant: str, attempt: Attempt
) -> tuple[DatasetRecord, dict[str, Any], dict[str, str]]:
    record = DatasetRecord(
        id=records.new_id("ds"),
        tenant=tenant,
        name=(reference.name or reference.source)[:256],
        format=reference.format,
        source=reference.source,
        status="validating",
        description=reference.stored(),
        dispatched_at=utcnow(),
    )
    with session_scope(request.app.state.session_factory) as session:
        records.add(session, record)
        body = dataset_out(record).model_dump(mode="json")
        headers = {"Location": f"/v1/datasets/{record.id}"}
        attempt.complete(session, 201, body, headers)
    return record, body, headers


def _forget(request: Request, storage: Storage | None, dataset_id: str) -> None:
    """The task could not be sent: nothing is kept (the client retries the whole request)."""
    with session_scope(request.app.state.session_factory) as session:
        record = session.get(DatasetRecord, dataset_id)
        if record is not None:
            session.delete(record)
    if storage is not None:
        storage.remove_dataset(dataset_id)


@router.get("", response_model=Page[DatasetOut], responses=ERRORS, summary="List datasets, newest first")
def list_datasets(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Page[DatasetOut]:
    rows, next_cursor = records.list_datasets(session, limit, cursor, tenant=tenant)
    set_next_link(request, response, next_cursor, limit)
    return Page[DatasetOut](items=[dataset_out(r) for r in rows], next_cursor=next_cursor)


def get_dataset_or_404(session: Session, dataset_id: str, tenant: str) -> DatasetRecord:
    """Another tenant's dataset is 404 like a missing one: its existence is not theirs to learn."""
    record = records.get_owned(session, DatasetRecord, dataset_id, tenant)
    if record is None:
        raise NotFound(f"no dataset with id {dataset_id!r}; list them with GET /v1/datasets")
    return record


@router.get("/{dataset_id}", response_model=DatasetOut, responses=ERRORS)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    return dataset_out(get_dataset_or_404(session, dataset_id, tenant))


@router.delete("/{dataset_id}", status_code=204, responses=ERRORS)
def delete_dataset(dataset_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> Response:
    """A dataset still validating may be deleted: the worker's writes are conditional on the record, so its
    validation finds the record gone, stops and removes what it wrote (app.db.datasets)."""
    record = get_dataset_or_404(session, dataset_id, tenant)
    if jobs.active_jobs_using(session, dataset_id=dataset_id):
        raise Conflict("jobs that use this dataset are queued or running; cancel them or wait, then delete")
    session.delete(record)
    session.commit()
    storage.remove_dataset(dataset_id)
    return Response(status_code=204)
