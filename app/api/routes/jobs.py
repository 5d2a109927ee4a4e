"""Jobs: create (202 + Location), poll, list, cancel, and the two outputs (metrics JSON, artifact zip)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from app.api.artifacts import ensure_kept, open_output, serve_file
from app.api.deps import (
    CeleryDep,
    IdempotencyDep,
    IdempotencyKeyDep,
    JsonFingerprintDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    TenantDep,
    TenantReadDep,
)
from app.api.paging import set_next_link
from app.api.routes.datasets import get_dataset_or_404
from app.api.routes.models import ERRORS, get_model_or_404
from app.api.uploads import send_or_503
from app.config import Settings
from app.db import jobs, records
from app.db import webhooks as webhook_store
from app.db.tables import TERMINAL_JOB_STATUSES, DatasetRecord, JobRecord, ModelRecord, utcnow
from app.errors import Conflict, NotFound, TooManyRequests, Unprocessable
from app.job_files import SAVED_MODEL, find_file, job_files
from app.presenters import job_out
from app.queue import RUN_JOB
from app.report import CONTENT_SECURITY_POLICY, render_report  # matplotlib is imported per report
from app.schemas.fit import dataset_fit_errors, label_loss_errors
from app.schemas.presets import resolve as resolve_preset
from app.schemas.resources import ArtifactItem, ArtifactList, JobCreate, JobOut, Page, Problem
from app.schemas.spec import unsupported_features
from app.schemas.vocabulary import JOB_KINDS, kind_of
from app.webhooks import delivery, tenants
from app.webhooks.guard import AllowList, UnsafeWebhookUrl, check_url

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
# Seconds a client should wait before polling a job it just created or asked to cancel (RFC 9110 10.2.3).
POLL_AFTER_S = 2


def _validate(body: JobCreate, session: Session, tenant: str) -> None:
    """Everything knowable before a worker touches TensorFlow is refused here, with the field named.

    Models and datasets are looked up within the caller's tenant: another tenant's id is 404, as if unknown.
    """
    errors: list[dict[str, Any]] = unsupported_features(body.spec)
    if errors:
        raise Unprocessable(
            "the spec asks for features this version does not implement: "
            + "; ".join(e["msg"] for e in errors),
            extra={"errors": errors},
        )
    model = get_model_or_404(session, body.model_id, tenant)
    if model.status == "invalid":
        reason = (model.error or {}).get("message", "unknown reason")
        raise Unprocessable(f"model {model.id} is invalid and cannot be pruned: {reason}")
    train = get_dataset_or_404(session, body.train_dataset_id, tenant) if body.train_dataset_id else None
    evaluation = get_dataset_or_404(session, body.eval_dataset_id, tenant) if body.eval_dataset_id else None
    calibration = (
        get_dataset_or_404(session, body.calibration_dataset_id, tenant)
        if body.calibration_dataset_id
        else None
    )
    datasets = (
        ("train_dataset_id", train),
        ("eval_dataset_id", evaluation),
        ("calibration_dataset_id", calibration),
    )
    for loc, dataset in datasets:
        if dataset is not None:
            _check_dataset_usable(loc, dataset)
    if body.spec.needs_calibration_data() and train is None and calibration is None:
        what = f"criterion {body.spec.criterion!r}" if not body.spec.reconstruct else "reconstruct"
        msg = (
            f"{what} reads calibration inputs: give calibration_dataset_id (inputs only) or train_dataset_id"
        )
        raise Unprocessable(
            msg,
            extra={
                "errors": [
                    {"loc": "calibration_dataset_id", "msg": msg},
                    {"loc": "train_dataset_id", "msg": msg},
                ]
            },
        )
    if body.spec.augmentation and train is None:
        msg = "augmentation applies to training batches: give train_dataset_id, or remove spec.augmentation"
        raise Unprocessable(msg, extra={"errors": [{"loc": "spec.augmentation", "msg": msg}]})
    if body.spec.needs_train_dataset() and train is None:
        raise Unprocessable(
            "this spec needs labelled training data (fine_tune, criterion gradient/taylor/l1/l2, or "
            "evaluation.cross_validation): give train_dataset_id",
            extra={"errors": [{"loc": "train_dataset_id", "msg": "required by the spec"}]},
        )
    if body.spec.export is not None and body.spec.export.needs_train_dataset() and train is None:
        msg = "int8 export is calibrated on train inputs: give train_dataset_id, or drop int8 from export.tflite"
        raise Unprocessable(
            f"export.tflite asks for int8, which needs a train dataset ({msg})",
            extra={"errors": [{"loc": "train_dataset_id", "msg": msg}]},
        )
    _check_kind_datasets(body, train, evaluation)
    if train is not None and train.arrays is not None and not _labelled(train):
        raise Unprocessable(
            f"train dataset {train.id} has no labels: {_how_to_label(train)}",
            extra={"errors": [{"loc": "train_dataset_id", "msg": "dataset has no 'y' array"}]},
        )
    if model.status == "ready" and model.signatures is not None:
        if body.spec.signature not in model.signatures:  # the worker needs it even without datasets
            msg = f"model {model.id} has no signature {body.spec.signature!r}; it has {sorted(model.signatures)}"
            raise Unprocessable(msg, extra={"errors": [{"loc": "spec.signature", "msg": msg}]})
        for loc, dataset in datasets:
            if dataset is None or dataset.arrays is None:  # not known for this dataset: the worker checks
                continue
            problems = dataset_fit_errors(model.signatures, body.spec.signature, dataset.arrays)
            if problems:
                raise Unprocessable(
                    f"{loc} {dataset.id} does not fit model {model.id}: " + "; ".join(problems),
                    extra={"errors": [{"loc": loc, "msg": p} for p in problems]},
                )
        if train is not None and train.arrays is not None:  # a loss the labels cannot train with (mse on ids)
            problems = label_loss_errors(model.signatures, body.spec.signature, train.arrays, body.spec.loss)
            if problems:
                raise Unprocessable(
                    f"train_dataset_id {train.id} does not fit spec.loss for model {model.id}: "
                    + "; ".join(problems),
                    extra={"errors": [{"loc": "spec.loss", "msg": p} for p in problems]},
                )


def _labelled(dataset: DatasetRecord) -> bool:
    return any(k == "y" or k.startswith("y.") for k in dataset.arrays or {})


def _how_to_label(dataset: DatasetRecord) -> str:
    if dataset.format in (None, "npz"):
        return "add an array 'y' to the .npz"
    return 'register it again naming its label feature or column ("label")'


def _check_dataset_usable(loc: str, dataset: DatasetRecord) -> None:
    """Only ``ready`` data can be trained or evaluated on: pending is 409 (wait), invalid is 422 (its error)."""
    if dataset.status in ("validating", "converting"):
        msg = f"dataset {dataset.id} is {dataset.status}; wait until its status is ready (GET /v1/datasets/{dataset.id})"
        raise Conflict(msg, extra={"errors": [{"loc": loc, "msg": msg}]}, retry_after=POLL_AFTER_S * 5)
    if dataset.status == "invalid":
        reason = (dataset.error or {}).get("message", "unknown reason")
        msg = f"dataset {dataset.id} is invalid and cannot be used: {reason}"
        raise Unprocessable(msg, extra={"errors": [{"loc": loc, "msg": msg}]})


def _check_kind_datasets(body: JobCreate, train: Any, evaluation: Any) -> None:
    """Searches and sensitivity sweeps decide on a labelled metric: the data they choose on must exist."""
    spec, kind = body.spec, body.spec.kind()
    choose_on_train = spec.search is not None and spec.search.validation_fraction is not None
    if choose_on_train and train is None:
        msg = "search.validation_fraction splits the train dataset: give train_dataset_id (with labels)"
        raise Unprocessable(msg, extra={"errors": [{"loc": "train_dataset_id", "msg": msg}]})
    if spec.needs_eval_dataset():
        if evaluation is None:
            msg = (
                f"a {kind} job compares a metric with the baseline's on labelled data: give eval_dataset_id "
                "(arrays 'x' and 'y')"
                + (
                    " or set search.validation_fraction to choose on part of the train set"
                    if kind == "search"
                    else ""
                )
            )
            raise Unprocessable(msg, extra={"errors": [{"loc": "eval_dataset_id", "msg": msg}]})
        if evaluation.arrays is not None and not _labelled(evaluation):
            msg = f"eval dataset {evaluation.id} has no labels, which a {kind} job needs: {_how_to_label(evaluation)}"
            raise Unprocessable(msg, extra={"errors": [{"loc": "eval_dataset_id", "msg": msg}]})


def _webhook_url(body: JobCreate, session: Session, tenant: str, settings: Settings) -> str | None:
    """The job's webhook URL: the one in the request (checked now: 422 naming why it is refused), else the
    tenant's default (checked when it was set). An explicit ``"webhook_url": null`` opts out of the default."""
    if "webhook_url" not in body.model_fields_set:
        return tenants.default_url(session, tenant)
    if body.webhook_url is None:
        return None
    try:
        check_url(body.webhook_url, AllowList.parse(settings.webhook_allow))
    except UnsafeWebhookUrl as exc:
        raise Unprocessable(
            f"webhook_url is refused: {exc}", extra={"errors": [{"loc": "webhook_url", "msg": str(exc)}]}
        ) from exc
    return body.webhook_url


CREATE_ERRORS = {
    **ERRORS,
    429: {
        "model": Problem,
        "description": "the tenant has max_active_jobs_per_tenant jobs queued or running",
    },
}


def _check_quota(session: Session, tenant: str, settings: Settings) -> None:
    """A per-tenant cap on queued + running jobs, so one caller cannot fill the queue for everyone."""
    active = jobs.count_active_jobs(session, tenant)
    if active >= settings.max_active_jobs_per_tenant:
        raise TooManyRequests(
            f"tenant {tenant!r} already has {active} queued or running jobs (the limit, "
            "SECATEURS_MAX_ACTIVE_JOBS_PER_TENANT, is "
            f"{settings.max_active_jobs_per_tenant}); wait for one to end or cancel one, then retry",
            retry_after=POLL_AFTER_S * 5,
            extra={"active_jobs": active, "limit": settings.max_active_jobs_per_tenant},
        )


@router.post(
    "", status_code=202, response_model=JobOut, responses=CREATE_ERRORS, summary="Start a pruning job"
)
def create_job(
    body: JobCreate,
    session: SessionDep,
    celery: CeleryDep,
    tenant: TenantDep,
    settings: SettingsDep,
    idempotency: IdempotencyDep,
    key: IdempotencyKeyDep,
    fingerprint: JsonFingerprintDep,
) -> JSONResponse:
    """With a ``webhook_url`` (or the tenant's default, see /v1/webhooks) the job's ending is POSTed there,
    signed per Standard Webhooks; attempts show in ``webhook_deliveries``."""
    attempt = idempotency.begin(tenant, key, "POST /v1/jobs", fingerprint)
    if attempt.previous is not None:
        return attempt.replay(fingerprint)
    try:
        # The preset is resolved here, once: the record, the job body and the metrics show what runs.
        spec = resolve_preset(
            body.spec,
            has_train=body.train_dataset_id is not None,
            has_calibration=body.calibration_dataset_id is not None,
        )
        body = body.model_copy(update={"spec": spec})
        _validate(body, session, tenant)
        _check_quota(session, tenant, settings)
        webhook_url = _webhook_url(body, session, tenant, settings)
        record = records.add(
            session,
            JobRecord(
                id=records.new_id("job"),
                tenant=tenant,
                model_id=body.model_id,
                train_dataset_id=body.train_dataset_id,
                eval_dataset_id=body.eval_dataset_id,
                calibration_dataset_id=body.calibration_dataset_id,
                spec=body.spec.model_dump(mode="json"),
                status="queued",
                progress=0.0,
                attempts=0,
                cancel_requested=False,
                webhook_url=webhook_url,
                dispatched_at=utcnow(),
            ),
        )
        payload = job_out(record).model_dump(mode="json")
        headers = {"Location": f"/v1/jobs/{record.id}", "Retry-After": str(POLL_AFTER_S)}
        attempt.complete(session, 202, payload, headers)  # same transaction as the job
        session.commit()
        try:
            send_or_503(celery, RUN_JOB, record.id)
        except BaseException:
            session.delete(record)
            session.commit()
            raise
    except BaseException as exc:
        attempt.fail(exc)
        raise
    return JSONResponse(payload, status_code=202, headers=headers)


def get_job_or_404(session: Session, job_id: str, tenant: str) -> JobRecord:
    """Another tenant's job is 404 like a missing one: its existence is not theirs to learn."""
    record = records.get_owned(session, JobRecord, job_id, tenant)
    if record is None:
        raise NotFound(f"no job with id {job_id!r}; list them with GET /v1/jobs")
    return record


@router.get("", response_model=Page[JobOut], responses=ERRORS, summary="List jobs, newest first")
def list_jobs(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    model_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Page[JobOut]:
    rows, next_cursor = records.list_jobs(
        session, limit, cursor, status=status, model_id=model_id, tenant=tenant
    )
    set_next_link(request, response, next_cursor, limit)
    states = webhook_store.states_for_jobs(session, [r.id for r in rows])
    return Page[JobOut](items=[job_out(r, states.get(r.id)) for r in rows], next_cursor=next_cursor)


def _job_body(session: Session, record: JobRecord) -> JobOut:
    """A job has a webhook message only once it ended, and only with a URL (written in the same transaction
    as its ending: jobs.finish_job), so polls of running jobs or jobs without webhooks skip that query."""
    if not record.webhook_url or record.status not in TERMINAL_JOB_STATUSES:
        return job_out(record)
    return job_out(record, webhook_store.states_for_jobs(session, [record.id]).get(record.id))


# The status poll, the hottest endpoint (no docstring: it would become the public OpenAPI description).
# Authentication, the queries and the JSON rendering run in one worker-thread hop (see TenantRead), and the
# body goes out as rendered, not validated a second time against response_model (kept for the OpenAPI doc).
@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
async def get_job(job_id: str, read: TenantReadDep) -> Response:
    def render(session: Session, tenant: str) -> bytes:
        return _job_body(session, get_job_or_404(session, job_id, tenant)).model_dump_json().encode()

    return Response(await read(render), media_type="application/json")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses=ERRORS)
def cancel_job(
    job_id: str, session: SessionDep, celery: CeleryDep, tenant: TenantDep, response: Response
) -> JobOut:
    """202 with Retry-After: a running job stops at its next stage boundary, so the client polls for it.
    A queued job ends here, and no worker will touch it again: its webhook is published from here."""
    record = get_job_or_404(session, job_id, tenant)
    if record.status not in ("queued", "running"):
        raise Conflict(f"job {job_id} already ended with status {record.status!r}; nothing to cancel")
    jobs.request_cancel(session, job_id)
    session.commit()
    session.refresh(record)
    if record.status == "canceled":
        delivery.publish_for_job(celery, session, job_id)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    response.headers["Retry-After"] = str(POLL_AFTER_S)
    return _job_body(session, record)


def _require_success(record: JobRecord) -> None:
    if record.status != "succeeded":
        hint = "poll GET /v1/jobs/{id} until status is 'succeeded'"
        if record.status in ("failed", "canceled"):
            hint = f"the job ended {record.status!r}; see its 'error'"
        raise Conflict(f"job {record.id} is {record.status!r}, so it has no output yet: {hint}")


EXPIRED = {
    410: {"model": Problem, "description": "deleted under the retention policy (`expired_at` says when)"}
}


@router.get("/{job_id}/metrics", responses={**ERRORS, **EXPIRED}, summary="Baseline vs pruned metrics (JSON)")
def get_metrics(
    job_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep, settings: SettingsDep
) -> JSONResponse:
    record = get_job_or_404(session, job_id, tenant)
    _require_success(record)
    with open_output(session, record, storage, "metrics.json", settings) as file:
        return JSONResponse(json.load(file))


def _download_responses(content: dict[str, Any], what: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a file download (``/artifact`` and ``/artifacts/{name}`` serve files one way)."""
    return {
        **ERRORS,
        200: {"content": content, "description": what},
        206: {"description": "the requested byte range(s) (Range, If-Range)"},
        304: {"description": "If-None-Match matched the ETag"},
        416: {"model": Problem, "description": "no requested range lies inside the file"},
        **EXPIRED,
    }


@router.get(
    "/{job_id}/artifact",
    responses=_download_responses({"application/zip": {}}, "the pruned SavedModel"),
    summary="Download the pruned SavedModel as a zip",
)
def get_artifact(
    job_id: str,
    session: SessionDep,
    storage: StorageDep,
    tenant: TenantDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """ETag and Repr-Digest (RFC 9530: the SHA-256 of the whole zip, also on a 206, so a client that resumed
    a download with Range can check what it assembled); Range/If-Range for resumable downloads."""
    record = get_job_or_404(session, job_id, tenant)
    _require_success(record)
    return serve_file(session, record, storage, settings, _job_file(record, SAVED_MODEL), if_none_match)


def _job_file(record: JobRecord, name: str) -> dict[str, Any]:
    item = find_file(record, name)
    spec = record.spec or {}
    keeps_model = JOB_KINDS[kind_of(lambda field, _section: spec.get(field) is not None)].keeps_model
    if name == SAVED_MODEL and not keeps_model:
        raise Conflict(
            f"job {record.id} is a sensitivity analysis: it measures each variable and keeps no model, so it has "
            "no artifact; read its metrics (sensitivity.layer_sparsity) or report, and run a job with that "
            "layer_sparsity for a pruned model"
        )
    if item is None:
        names = [f["name"] for f in job_files(record)]
        raise NotFound(
            f"job {record.id} has no artifact {name[:80]!r}; it has {names} (GET /v1/jobs/{record.id}/artifacts)",
            extra={"artifacts": names},
        )
    return item


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactList,
    responses={**ERRORS, **EXPIRED},
    summary="Every downloadable file of the job",
)
def list_artifacts(
    job_id: str, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> ArtifactList:
    """The SavedModel zip (``saved_model``) first, then the job's other files (``tflite_int8``, ...), each
    with the SHA-256 its download's ETag and Repr-Digest carry."""
    record = get_job_or_404(session, job_id, tenant)
    _require_success(record)
    ensure_kept(record, settings)
    return ArtifactList(
        items=[
            ArtifactItem(
                name=f["name"],
                media_type=f["media_type"],
                size_bytes=f["size_bytes"],
                sha256=f["sha256"],
                href=f"/v1/jobs/{job_id}/artifacts/{f['name']}",
            )
            for f in job_files(record)
        ]
    )


@router.get(
    "/{job_id}/artifacts/{name}",
    responses=_download_responses(
        {"application/zip": {}, "application/octet-stream": {}},
        "the file (saved_model: the zip; tflite_*: the .tflite flatbuffer)",
    ),
    summary="Download one file of the job by name",
)
def get_named_artifact(
    job_id: str,
    name: str,
    session: SessionDep,
    storage: StorageDep,
    tenant: TenantDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Same headers as ``/artifact``; 404 (listing the job's names) for a name the job does not have."""
    record = get_job_or_404(session, job_id, tenant)
    _require_success(record)
    ensure_kept(record, settings)
    return serve_file(session, record, storage, settings, _job_file(record, name), if_none_match)


@router.get(
    "/{job_id}/report",
    responses={
        **ERRORS,
        200: {"content": {"text/html": {}}, "description": "one self-contained HTML page"},
        **EXPIRED,
    },
    summary="The job's report: one self-contained HTML page",
)
def get_report(
    job_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep, settings: SettingsDep
) -> Response:
    """Rendered from the metrics document (no TensorFlow): spec, baseline vs pruned, confusion matrices,
    per-layer sparsity, sizes/MACs/latency, notes, and the search/sweep/sensitivity plots. No script, no outside
    resource: served with a strict Content-Security-Policy."""
    record = get_job_or_404(session, job_id, tenant)
    _require_success(record)
    with open_output(session, record, storage, "metrics.json", settings) as file:
        document = json.load(file)
    model = records.get_owned(session, ModelRecord, record.model_id, tenant)
    page = render_report(document, title=model.name if model is not None else None)
    return Response(
        page,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "private, no-cache",
        },
    )
