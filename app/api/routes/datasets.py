"""Datasets: streamed `.npz` upload, checked without pickles before it is kept."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.api.deps import SessionDep, SettingsDep, StorageDep
from app.api.presenters import dataset_out
from app.api.routes.models import ERRORS
from app.api.uploads import ensure_free_space, multipart_body
from app.config import Settings
from app.errors import Conflict, NotFound
from app.npz import NpzLimits, inspect_npz
from app.schemas.resources import DatasetOut, Page
from app.storage import Storage, Upload, receive_upload
from app.store import repo
from app.store.db import session_scope
from app.store.tables import DatasetRecord

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def _check_and_register(
    request: Request, upload: Upload, storage: Storage, settings: Settings
) -> DatasetRecord:
    try:
        info = inspect_npz(upload.path, NpzLimits(max_bytes_uncompressed=settings.max_uncompressed_bytes))
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    dataset_id = repo.new_id("ds")
    upload.commit(storage.dataset_path(dataset_id))
    record = DatasetRecord(
        id=dataset_id,
        name=(upload.fields.get("name") or upload.filename or dataset_id)[:256],
        size_bytes=upload.size,
        sha256=upload.sha256,
        arrays=info.arrays,
        n_samples=info.n_samples,
    )
    with session_scope(request.app.state.session_factory) as session:
        repo.add(session, record)
    return record


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses=ERRORS,
    openapi_extra=multipart_body("an .npz with arrays `x` (or `x.<input>`) and `y` (or `y.<output>`)"),
    summary="Upload an .npz dataset",
)
async def upload_dataset(
    request: Request, response: Response, storage: StorageDep, settings: SettingsDep
) -> DatasetOut:
    ensure_free_space(storage, settings)
    upload = await receive_upload(request, storage.tmp_dir, max_bytes=settings.max_dataset_bytes)
    record = await run_in_threadpool(_check_and_register, request, upload, storage, settings)
    response.headers["Location"] = f"/v1/datasets/{record.id}"
    return dataset_out(record)


@router.get("", response_model=Page[DatasetOut], summary="List datasets, newest first")
def list_datasets(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Page[DatasetOut]:
    rows, next_cursor = repo.list_datasets(session, limit, cursor)
    return Page[DatasetOut](items=[dataset_out(r) for r in rows], next_cursor=next_cursor)


def get_dataset_or_404(session: SessionDep, dataset_id: str) -> DatasetRecord:
    record = session.get(DatasetRecord, dataset_id)
    if record is None:
        raise NotFound(f"no dataset with id {dataset_id!r}; list them with GET /v1/datasets")
    return record


@router.get("/{dataset_id}", response_model=DatasetOut, responses=ERRORS)
def get_dataset(dataset_id: str, session: SessionDep) -> DatasetOut:
    return dataset_out(get_dataset_or_404(session, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=ERRORS)
def delete_dataset(dataset_id: str, session: SessionDep, storage: StorageDep) -> Response:
    record = get_dataset_or_404(session, dataset_id)
    if repo.active_jobs_using(session, dataset_id=dataset_id):
        raise Conflict("jobs that use this dataset are queued or running; cancel them or wait, then delete")
    session.delete(record)
    session.commit()
    storage.remove_dataset(dataset_id)
    return Response(status_code=204)
