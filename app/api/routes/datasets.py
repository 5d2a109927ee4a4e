"""Datasets: streamed `.npz` upload, checked without pickles before it is kept."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from app.api.deps import IdempotencyDep, IdempotencyKeyDep, SessionDep, SettingsDep, StorageDep, TenantDep
from app.api.idempotency import UPLOAD_LOCK_S, Attempt, upload_fingerprint
from app.api.multipart import Upload, receive_upload
from app.api.paging import set_next_link
from app.api.routes.models import ERRORS
from app.api.uploads import ensure_free_space, multipart_body
from app.config import Settings
from app.db import jobs, records
from app.db.engine import session_scope
from app.db.tables import DatasetRecord
from app.errors import Conflict, NotFound
from app.npz import NpzLimits, inspect_npz
from app.presenters import dataset_out
from app.schemas.resources import DatasetOut, Page
from app.storage import Storage

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def _check_and_register(
    request: Request, upload: Upload, storage: Storage, settings: Settings, tenant: str, attempt: Attempt
) -> tuple[dict[str, Any], dict[str, str]]:
    """Check the .npz, keep it, and record the dataset and (same transaction) its idempotent response."""
    try:
        info = inspect_npz(upload.path, NpzLimits(max_bytes_uncompressed=settings.max_uncompressed_bytes))
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    dataset_id = records.new_id("ds")
    upload.commit(storage, storage.dataset_key(dataset_id))  # a rename, or a streamed put into S3
    record = DatasetRecord(
        id=dataset_id,
        tenant=tenant,
        name=(upload.fields.get("name") or upload.filename or dataset_id)[:256],
        size_bytes=upload.size,
        sha256=upload.sha256,
        arrays=info.arrays,
        n_samples=info.n_samples,
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
    return body, headers


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses=ERRORS,
    openapi_extra=multipart_body("an .npz with arrays `x` (or `x.<input>`) and `y` (or `y.<output>`)"),
    summary="Upload an .npz dataset",
)
async def upload_dataset(
    request: Request,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: TenantDep,
    idempotency: IdempotencyDep,
    key: IdempotencyKeyDep,
) -> JSONResponse:
    attempt = await run_in_threadpool(
        idempotency.begin, tenant, key, "POST /v1/datasets", None, lock_seconds=UPLOAD_LOCK_S, retry_after=10
    )
    try:
        ensure_free_space(storage, settings)
        upload = await receive_upload(request, storage.tmp_dir, max_bytes=settings.max_dataset_bytes)
    except BaseException:  # not fully received: nothing to compare a retry with, so the key is released
        await run_in_threadpool(attempt.release)
        raise
    fingerprint = upload_fingerprint(upload)
    if attempt.previous is not None:
        upload.discard()
        return attempt.replay(fingerprint)
    try:
        await run_in_threadpool(attempt.bind_fingerprint, fingerprint)
        body, headers = await run_in_threadpool(
            _check_and_register, request, upload, storage, settings, tenant, attempt
        )
    except BaseException as exc:
        await run_in_threadpool(attempt.fail, exc)
        raise
    return JSONResponse(body, status_code=201, headers=headers)


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
    record = get_dataset_or_404(session, dataset_id, tenant)
    if jobs.active_jobs_using(session, dataset_id=dataset_id):
        raise Conflict("jobs that use this dataset are queued or running; cancel them or wait, then delete")
    session.delete(record)
    session.commit()
    storage.remove_dataset(dataset_id)
    return Response(status_code=204)
