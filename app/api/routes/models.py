"""Models: streamed upload, structural checks at once, TensorFlow validation on a worker."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
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
from app.api.idempotency import UPLOAD_LOCK_S, Attempt, upload_fingerprint
from app.api.multipart import Upload, receive_upload
from app.api.paging import set_next_link
from app.api.uploads import ensure_free_space, multipart_body, send_or_undo
from app.archive import ArchiveLimits, inspect_archive, inspect_keras, sniff_format
from app.config import Settings
from app.db import jobs, records
from app.db.engine import session_scope
from app.db.tables import ModelRecord, utcnow
from app.errors import Conflict, NotFound
from app.presenters import model_out
from app.queue import VALIDATE_MODEL
from app.schemas.resources import ModelOut, Page, Problem
from app.storage import Storage

router = APIRouter(prefix="/v1/models", tags=["models"])
ERRORS = {
    code: {"model": Problem, "description": desc}
    for code, desc in (
        (400, "malformed upload or Idempotency-Key"),
        (401, "an API key is required, or the one sent is unknown or revoked"),
        (404, "no such model (or it belongs to another tenant)"),
        (409, "in use, or the Idempotency-Key's first request is still running"),
        (413, "too large"),
        (415, "not multipart or not an accepted archive"),
        (422, "unsafe or incomplete archive, or the Idempotency-Key was used for another request"),
        (503, "queue down"),
        (507, "disk full"),
    )
}
SUFFIX = {"zip": "upload.zip", "tar.gz": "upload.tar.gz", "keras": "model.keras"}


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(
        max_members=settings.max_archive_members,
        max_uncompressed_bytes=settings.max_uncompressed_bytes,
        max_ratio=settings.max_compression_ratio,
    )


def _check_and_register(
    request: Request, upload: Upload, storage: Storage, settings: Settings, tenant: str, attempt: Attempt
) -> tuple[ModelRecord, dict[str, Any], dict[str, str]]:
    """Check the archive, keep it, and record the model and (same transaction) its idempotent response."""
    try:
        kind = sniff_format(upload.path, upload.filename)
        if kind == "keras":
            inspect_keras(upload.path, archive_limits(settings))
        else:
            inspect_archive(upload.path, archive_limits(settings))
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    model_id = records.new_id("mdl")
    upload.commit(storage, storage.model_key(model_id, SUFFIX[kind]))  # a rename, or a put into S3
    record = ModelRecord(
        id=model_id,
        tenant=tenant,
        name=(upload.fields.get("name") or upload.filename or model_id)[:256],
        format="keras" if kind == "keras" else "saved_model",
        filename=upload.filename[:256],
        size_bytes=upload.size,
        sha256=upload.sha256,
        status="validating",
        dispatched_at=utcnow(),
    )
    try:
        with session_scope(request.app.state.session_factory) as session:
            records.add(session, record)
            body = model_out(record).model_dump(mode="json")
            headers = {"Location": f"/v1/models/{record.id}"}
            attempt.complete(session, 201, body, headers)
    except BaseException:
        storage.remove_model(model_id)
        raise
    return record, body, headers


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses=ERRORS,
    openapi_extra=multipart_body("a .zip or .tar.gz of a SavedModel directory, or a .keras file"),
    summary="Upload a SavedModel archive or .keras file",
)
async def upload_model(
    request: Request,
    storage: StorageDep,
    settings: SettingsDep,
    celery: CeleryDep,
    tenant: TenantDep,
    idempotency: IdempotencyDep,
    key: IdempotencyKeyDep,
) -> JSONResponse:
    attempt = await run_in_threadpool(
        idempotency.begin, tenant, key, "POST /v1/models", None, lock_seconds=UPLOAD_LOCK_S, retry_after=10
    )
    try:
        ensure_free_space(storage, settings)
        upload = await receive_upload(request, storage.tmp_dir, max_bytes=settings.max_model_bytes)
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
        await send_or_undo(celery, VALIDATE_MODEL, record.id, lambda: _forget(request, storage, record.id))
    except BaseException as exc:
        await run_in_threadpool(attempt.fail, exc)
        raise
    return JSONResponse(body, status_code=201, headers=headers)


def _forget(request: Request, storage: Storage, model_id: str) -> None:
    with session_scope(request.app.state.session_factory) as session:
        record = session.get(ModelRecord, model_id)
        if record is not None:
            session.delete(record)
    storage.remove_model(model_id)


@router.get("", response_model=Page[ModelOut], responses=ERRORS, summary="List models, newest first")
def list_models(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Page[ModelOut]:
    rows, next_cursor = records.list_models(session, limit, cursor, tenant=tenant)
    set_next_link(request, response, next_cursor, limit)
    return Page[ModelOut](items=[model_out(r) for r in rows], next_cursor=next_cursor)


def get_model_or_404(session: Session, model_id: str, tenant: str) -> ModelRecord:
    """Another tenant's model is 404 like a missing one: its existence is not theirs to learn."""
    record = records.get_owned(session, ModelRecord, model_id, tenant)
    if record is None:
        raise NotFound(f"no model with id {model_id!r}; list them with GET /v1/models")
    return record


@router.get("/{model_id}", response_model=ModelOut, responses=ERRORS)
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelOut:
    return model_out(get_model_or_404(session, model_id, tenant))


@router.delete("/{model_id}", status_code=204, responses=ERRORS)
def delete_model(model_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep) -> Response:
    record = get_model_or_404(session, model_id, tenant)
    if jobs.active_jobs_using(session, model_id=model_id):
        raise Conflict("jobs that use this model are queued or running; cancel them or wait, then delete")
    session.delete(record)
    session.commit()
    storage.remove_model(model_id)
    return Response(status_code=204)
