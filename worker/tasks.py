"""Thin Celery tasks: claim the record, call the pipeline, record stage/progress/result.

The only place in worker/ that touches the store. Every way a task can end leaves the record in a terminal
state with a reason a person can act on; a redelivered message for a finished job is a no-op.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from celery import Task, current_app, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from app import job_files
from app.archive import ArchiveLimits, extract_archive
from app.config import Settings, get_settings
from app.db import datasets as dataset_status
from app.db import jobs, model_status
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import DatasetRecord, JobRecord, ModelRecord
from app.errors import SecateursError, StoreUnavailable
from app.observability.logs import bind, log_context
from app.queue import RUN_JOB, VALIDATE_DATASET, VALIDATE_MODEL
from app.schemas.metrics import MetricsDocument
from app.schemas.spec import PruneSpec
from app.schemas.vocabulary import JOB_KINDS
from app.storage import Storage
from app.storage.base import StoreMisconfigured
from app.storage.cache import CorruptBlob
from app.webhooks.delivery import publish_for_job
from worker.blobs import dataset_file, model_source, publish_job_files
from worker.evaluation.zip_size import shared_zip_size
from worker.lease import JobLease

log = logging.getLogger("secateurs.worker")
PROGRESS_INTERVAL_S = 1.0
SAME_DATASET_NOTE = (
    "the evaluation dataset is the training dataset: the eval scores are on training data, so they overstate "
    "how the model does on data it has not seen; pass a held-out eval_dataset_id for an honest estimate"
)


# Set by worker.trial_tasks when it is imported (worker.celery_worker imports it): takes a job whose kind runs
# as trials (a sweep), hands it over to them and returns True; False: run it here. A hook rather than an
# import because worker.trial_tasks builds on this module.
FanOut = Callable[[JobRecord, PruneSpec, int], bool]
fan_out_hook: FanOut | None = None


class JobCanceled(Exception):
    """Raised from the progress callback when the record says stop; unwinds the pipeline at a boundary."""


@cache
def _context() -> tuple[Settings, sessionmaker[Session], Storage]:
    settings = get_settings()
    engine = make_engine(settings.db_url)
    init_db(engine)
    return settings, make_session_factory(engine), Storage.from_settings(settings, worker=True)


def _worker_name() -> str:
    """Which process holds a job, for the operators' heartbeat metric (GET /metrics)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message[:2000]}


def _unexpected(exc: BaseException, job_id: str, tries: int = 1) -> dict[str, str]:
    """``internal_error``: a bug or an outage, not the user's mistake; the message points at the traceback."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:500]
    times = f" in each of {tries} tries" if tries > 1 else ""
    return _error(
        "internal_error",
        f"unexpected {type(exc).__name__}{times}: {first_line}; the traceback is in the worker log (search it "
        f"for {job_id}); submit the job again, and report it with that traceback if it fails the same way",
    )


# --- models -------------------------------------------------------------------------------------------------


def prepared_model_dir(record: ModelRecord, storage: Storage, settings: Settings) -> Path:
    """The SavedModel directory the pipeline reads; extracted (or converted from .keras) once, idempotently."""
    from worker.models import keras_to_saved_model

    model_dir = storage.model_dir(record.id)
    target = model_dir / "saved_model"
    if (target / "saved_model.pb").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    if record.format == "keras":
        keras_to_saved_model(model_source(record, storage), target)
        return target
    upload = model_source(record, storage)  # the data directory's file, or the host cache's copy from S3
    limits = ArchiveLimits(
        max_members=settings.max_archive_members,
        max_uncompressed_bytes=settings.max_uncompressed_bytes,
        max_ratio=settings.max_compression_ratio,
    )
    extract_archive(upload, target, limits)  # re-checks everything; renames into place in one step
    return target


def _validate(model_id: str) -> dict[str, Any] | None:
    """Load the model with TensorFlow and audit it. Returns the error it recorded, or None when ready."""
    from worker.errors import PipelineError
    from worker.models import audit_saved_model, describe, keep_for_next_job, load_model

    settings, sessions, storage = _context()
    with session_scope(sessions) as session:
        record = session.get(ModelRecord, model_id)
        if record is None:
            return _error("missing", f"model {model_id} was deleted")
        if record.status != "validating":
            return record.error
        bind(tenant=record.tenant)
        session.expunge(record)
    error: dict[str, str] | None = None
    try:
        saved_model = prepared_model_dir(record, storage, settings)
        # Audit the graph BEFORE loading: loading already runs the model's initialisers.
        denied = audit_saved_model(saved_model)
        if denied:
            error = _error(
                "unsafe_model",
                f"the model's signatures run operations that are not allowed here: {', '.join(sorted(denied))}",
            )
        elif not _begin_load(sessions, model_id, settings.max_attempts):
            error = _error(
                "validation_crashed",
                f"the worker stopped while loading this model {settings.max_attempts} times (killed, most "
                "likely out of memory: a one-shot job needs about 2x the model's bytes, fine-tuning more); "
                "give the workers more memory and upload it again",
            )
        else:
            handle = load_model(saved_model)
            info = describe(handle)
            keep_for_next_job(saved_model, handle)
            del handle
            shared_zip_size(saved_model)  # the baseline zip size its jobs report, meanwhile (worker.evaluation.zip_size)
    except PipelineError as exc:
        error = _error(exc.code, exc.message)
    except StoreUnavailable:
        raise  # not the model's fault: it stays 'validating' and is validated again (validate_model)
    except SecateursError as exc:
        error = _error("invalid_archive", exc.detail)
    except Exception as exc:
        log.exception("model %s failed to load", model_id)
        first = (str(exc).strip().splitlines() or [""])[0][:500]
        error = _error(
            "model_load_failed", f"TensorFlow could not load the model ({type(exc).__name__}: {first})"
        )
    with session_scope(sessions) as session:
        if error:
            model_status.set_model_result(session, model_id, status="invalid", error=error)
        else:
            model_status.set_model_result(
                session, model_id, status="ready", signatures=info["signatures"], params=info["params"]
            )
    return error


def _begin_load(sessions: sessionmaker[Session], model_id: str, max_attempts: int) -> bool:
    """Committed before TensorFlow loads anything, so a crash in the load still counts."""
    with session_scope(sessions) as session:
        return model_status.begin_model_load(session, model_id, max_attempts)


@shared_task(name=VALIDATE_MODEL, acks_late=True)
def validate_model(model_id: str) -> None:
    with log_context(model_id=model_id, stage="validating"):
        try:
            _validate(model_id)
        except StoreUnavailable as exc:  # the reaper re-sends a validation left 'validating' (app.maintenance)
            log.error("model %s not validated, the blob store did not answer: %s", model_id, exc.detail)


# --- datasets -----------------------------------------------------------------------------------------------


def _validate_dataset(dataset_id: str) -> None:
    from worker.data.errors import DataError
    from worker.datasets import register

    settings, sessions, storage = _context()
    with session_scope(sessions) as session:
        record = session.get(DatasetRecord, dataset_id)
        if record is None or record.status not in ("validating", "converting"):
            return
        bind(tenant=record.tenant)
        if not dataset_status.begin_dataset_validation(session, dataset_id, settings.max_attempts):
            dataset_status.set_dataset_result(
                session,
                dataset_id,
                status="invalid",
                error=_error(
                    "validation_crashed",
                    f"the worker stopped while reading this dataset {settings.max_attempts} times (killed, "
                    "most likely out of memory); check the worker logs and register it again",
                ),
            )
            return
        session.expunge(record)

    def report(status: str, fraction: float | None) -> None:  # None: alive, progress unknown (a heartbeat)
        with session_scope(sessions) as session:
            progress = None if fraction is None else round(float(fraction), 4)
            dataset_status.set_dataset_progress(session, dataset_id, status, progress)

    try:
        manifest = register(record, settings, storage, report)
    except StoreUnavailable:
        raise  # not the data's fault: left validating, the reaper sends it again
    except DataError as exc:
        with session_scope(sessions) as session:
            dataset_status.set_dataset_result(
                session, dataset_id, status="invalid", error=_error(exc.code, exc.message)
            )
        return
    except Exception as exc:
        log.exception("dataset %s could not be registered", dataset_id)
        first = (str(exc).strip().splitlines() or [""])[0][:500]
        with session_scope(sessions) as session:
            dataset_status.set_dataset_result(
                session,
                dataset_id,
                status="invalid",
                error=_error(
                    "dataset_unreadable", f"the dataset could not be read ({type(exc).__name__}: {first})"
                ),
            )
        return
    with session_scope(sessions) as session:
        recorded = dataset_status.set_dataset_result(
            session,
            dataset_id,
            status="ready",
            manifest=manifest,
            shards=len(manifest["shards"]),
            n_samples=manifest.get("n_samples"),
            size_bytes=sum(int(s["size"]) for s in manifest["shards"]),
            features=manifest.get("features"),
            class_names=manifest.get("class_names"),
            arrays=manifest.get("arrays"),
        )
    if not recorded:  # deleted while it was read: the shards a conversion wrote must not outlive it
        storage.blobs.delete_prefix(storage.dataset_shard_prefix(dataset_id))


@shared_task(name=VALIDATE_DATASET, acks_late=True)
def validate_dataset(dataset_id: str) -> None:
    with log_context(dataset_id=dataset_id, stage="validating"):
        try:
            _validate_dataset(dataset_id)
        except StoreUnavailable as exc:  # the reaper re-sends a registration left 'validating'
            log.error("dataset %s not registered, the blob store did not answer: %s", dataset_id, exc.detail)


# --- jobs ---------------------------------------------------------------------------------------------------


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _job_dataset(
    record: DatasetRecord, spec: PruneSpec, model: ModelRecord, storage: Storage, settings: Settings
) -> tuple[Any, list[str]]:
    """A small ``.npz`` as arrays (as always); any other dataset through its manifest (``worker.datasets``),
    decoded onto the model's input shapes. With the notes of reading it."""
    if record.manifest is None:
        return _load_npz(dataset_file(record, storage)), []
    from worker.datasets import open_for_job

    inputs = ((model.signatures or {}).get(spec.signature) or {}).get("inputs")
    return open_for_job(record, storage, settings, on_bad_record=spec.on_bad_record, input_specs=inputs)


class Progress:
    """The pipeline's report(stage, progress) callback: throttled writes that renew the lease and carry cancel.
    ``_write`` says where the progress goes (the job's record here; a trial's in ``worker.trial_tasks``)."""

    def __init__(self, sessions: sessionmaker[Session], record_id: str, lease: JobLease) -> None:
        self.sessions, self.record_id, self.lease = sessions, record_id, lease
        self.stage: str | None = None
        self.last: float | None = None  # monotonic time of the last write; None: nothing written yet

    def __call__(self, stage: str, progress: float) -> None:
        bind(stage=stage)
        self.lease.entered(stage)
        self.lease.check_time()
        if self.lease.lost:
            raise JobCanceled
        now = time.monotonic()
        if stage == self.stage and self.last is not None and now - self.last < PROGRESS_INTERVAL_S:
            return
        self.stage, self.last = stage, now
        with session_scope(self.sessions) as session:
            ours, stop = self._write(session, stage, progress)
        if stop or not ours:
            raise JobCanceled

    def _write(self, session: Session, stage: str, progress: float) -> tuple[bool, bool]:
        """(the record is still this attempt's, it must stop)."""
        running, cancel = jobs.report_progress(session, self.record_id, stage, progress, self.lease.attempt)
        return running, cancel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _move_extra_files(work: Path, job_dir: Path) -> list[dict[str, Any]]:
    """The pipeline's other downloadable files (``work/artifacts/<name>.<ext>``: TFLite exports, ...) into
    ``job_dir/artifacts/``, replacing an earlier attempt's, and their entries for ``JobRecord.artifacts``."""
    source, target = work / "artifacts", job_dir / "artifacts"
    shutil.rmtree(target, ignore_errors=True)
    if not source.is_dir():
        return []
    os.replace(source, target)
    return [
        job_files.entry(path.stem, f"artifacts/{path.name}", path.stat().st_size, _sha256(path))
        for path in sorted(target.iterdir())
        if path.is_file()
    ]


def _run(job_id: str) -> None:
    """One delivery of the job. An exception ``_run_once`` could not record (while claiming, or around the
    pipeline: a bug or an outage) ends this try here, so no job stays queued or running forever: it is
    re-queued for the reaper to re-send, and fails with ``internal_error`` once ``max_attempts`` tries are used.
    """
    settings, sessions, _ = _context()
    claimed: list[int] = []
    try:
        _run_once(job_id, claimed)
    except Exception as exc:
        log.exception("job %s: unexpected error outside the pipeline", job_id)
        attempt = claimed[0] if claimed else None
        try:
            with session_scope(sessions) as session:
                record = session.get(JobRecord, job_id)
                tries = attempt if attempt is not None else (record.attempts + 1 if record else 1)
                outcome = jobs.end_crashed_try(
                    session,
                    job_id,
                    attempt=attempt,
                    max_attempts=settings.max_attempts,
                    error=_unexpected(exc, job_id, tries),
                )
            log.warning("job %s: this try ended by an unexpected error; %s", job_id, outcome)
        except Exception:  # the database is down too: the reaper re-sends the job once it is back
            log.exception("job %s: could not record the unexpected error", job_id)


def _run_once(job_id: str, claimed: list[int]) -> None:
    """Claim the job and run it; ``claimed`` gets the attempt number once the claim is committed."""
    settings, sessions, _ = _context()
    with session_scope(sessions) as session:
        claim = jobs.claim_job(
            session,
            job_id,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            worker=_worker_name(),
        )
        if claim.reason == "exhausted":
            jobs.finish_job(
                session,
                job_id,
                "failed",
                error=_error(
                    "attempts_exhausted",
                    f"the job was started {claim.attempts} times and never "
                    "finished (worker crashes or restarts); check worker memory/logs and resubmit",
                ),
                from_statuses=("queued", "running"),
            )
    if not claim.claimed:
        log.info("job %s not run: %s", job_id, claim.reason)
        return
    claimed.append(claim.attempts)  # committed: from here on this try counts
    with session_scope(sessions) as session:
        job = session.get(JobRecord, job_id)
        assert job is not None
        bind(tenant=job.tenant)
        model = session.get(ModelRecord, job.model_id)
        train = session.get(DatasetRecord, job.train_dataset_id) if job.train_dataset_id else None
        evaluation = session.get(DatasetRecord, job.eval_dataset_id) if job.eval_dataset_id else None
        calibration = (
            session.get(DatasetRecord, job.calibration_dataset_id) if job.calibration_dataset_id else None
        )
        # One train/eval dataset is one object in the session: expunge each object once (twice raised
        # InvalidRequestError, which rolled the claim back and left the job queued forever).
        for obj in {id(o): o for o in (job, model, train, evaluation, calibration) if o is not None}.values():
            session.expunge(obj)

    leases: list[JobLease] = []  # the lease, once it exists: its stage timings go on the record

    def fail(error: dict[str, str], status: str = "failed") -> None:
        timings = leases[0].stage_seconds() if leases else None
        with session_scope(sessions) as session:
            jobs.finish_job(
                session,
                job_id,
                status,
                error=error,
                attempt=claim.attempts,
                timings=timings,  # type: ignore[arg-type]
            )

    def hard_limit(timings: str) -> None:
        fail(
            _error(
                "timeout",
                f"the job ran past the {settings.task_hard_time_limit} s hard limit inside one operation and "
                f"its worker was restarted (timings so far: {timings}); lower fine_tune.epochs or the dataset "
                "size, or raise SECATEURS_TASK_SOFT_TIME_LIMIT / SECATEURS_TASK_HARD_TIME_LIMIT",
            )
        )
        with session_scope(sessions) as session:
            publish_for_job(current_app, session, job_id)

    with JobLease(sessions, job_id, claim.attempts, settings, hard_limit) as lease:
        leases.append(lease)
        _run_claimed(job_id, job, model, train, evaluation, lease, fail, calibration)


@dataclass
class JobArrays:
    """A job's datasets as the pipeline takes them (arrays, or a streamed set), and what reading them noted."""

    train: Any
    evaluation: Any
    calibration: Any
    notes: list[str]
    same_data: bool

    def add_notes(self, document: dict[str, Any]) -> None:
        notes = document.setdefault("notes", [])
        notes.extend(note for note in self.notes if note not in notes)
        if self.same_data:
            notes.append(SAME_DATASET_NOTE)


def job_arrays(
    spec: PruneSpec,
    model: ModelRecord,
    train: DatasetRecord | None,
    evaluation: DatasetRecord | None,
    calibration: DatasetRecord | None,
    storage: Storage,
    settings: Settings,
) -> JobArrays:
    """Read a job's datasets (the job task and every trial task alike): a train set also given as the eval set
    (the same id, or the same bytes uploaded twice, e.g. the CLI's --train f --eval f) is read once; the
    calibration set goes through the same path (a large set streams: the pipeline uses its sample)."""
    train_arrays, notes = _job_dataset(train, spec, model, storage, settings) if train else (None, [])
    same_data = (
        train is not None
        and evaluation is not None
        and (train.id == evaluation.id or (train.sha256 is not None and train.sha256 == evaluation.sha256))
    )
    if same_data:
        eval_arrays = train_arrays  # the stages only read the arrays
    else:
        eval_arrays, eval_notes = (
            _job_dataset(evaluation, spec, model, storage, settings) if evaluation else (None, [])
        )
        notes += eval_notes
    calibration_arrays = None
    if calibration is not None:
        calibration_arrays, calibration_notes = _job_dataset(calibration, spec, model, storage, settings)
        notes += calibration_notes
    return JobArrays(train_arrays, eval_arrays, calibration_arrays, notes, same_data)


def _run_claimed(
    job_id: str,
    job: JobRecord,
    model: ModelRecord | None,
    train: DatasetRecord | None,
    evaluation: DatasetRecord | None,
    lease: JobLease,
    fail: Callable[..., None],
    calibration: DatasetRecord | None = None,
) -> None:
    from worker.errors import PipelineError
    from worker.pipeline import run_pipeline

    settings, sessions, storage = _context()
    report = Progress(sessions, job_id, lease)
    # One work directory per attempt: a worker the reaper gave up on (frozen, not dead) may still be writing
    # or cleaning up its own; it must not delete the directory of the attempt that replaced it.
    work = storage.job_dir(job_id) / f"work-{lease.attempt}"
    try:
        report("loading", 0.0)
        if model is None:
            return fail(_error("missing_model", f"model {job.model_id} was deleted before the job ran"))
        missing = [
            d
            for d, rec in (
                (job.train_dataset_id, train),
                (job.eval_dataset_id, evaluation),
                (job.calibration_dataset_id, calibration),
            )
            if d and not rec
        ]
        if missing:
            return fail(_error("missing_dataset", f"dataset(s) {missing} were deleted before the job ran"))
        if model.status == "validating":
            problem = _validate(model.id)
            if problem:
                return fail(_error("invalid_model", f"model {model.id} is invalid: {problem['message']}"))
        elif model.status == "invalid":
            return fail(
                _error("invalid_model", f"model {model.id} is invalid: {(model.error or {}).get('message')}")
            )
        spec = PruneSpec.model_validate(job.spec)
        if fan_out_hook is not None and fan_out_hook(job, spec, lease.attempt):
            return  # the job runs on as trials, each a task of its own (worker.trial_tasks)
        saved_model = prepared_model_dir(model, storage, settings)
        data = job_arrays(spec, model, train, evaluation, calibration, storage, settings)
        for stale in storage.job_dir(job_id).glob("work*"):  # earlier attempts' leftovers: a re-run overwrites
            shutil.rmtree(stale, ignore_errors=True)
        work.mkdir(parents=True)
        metrics = run_pipeline(saved_model, spec, data.train, data.evaluation, work, report, data.calibration)
        data.add_notes(metrics)
        report("saving", 0.99)
        job_dir = storage.job_dir(job_id)
        document = {"job_id": job_id, "model_id": model.id, **metrics}
        MetricsDocument.model_validate(document)  # what GET /v1/schemas/metrics promises, checked per job
        tmp_metrics = work / "metrics.json"
        tmp_metrics.write_text(json.dumps(document, indent=2, allow_nan=False))
        artifact = job_dir / "pruned.zip"
        if not lease.confirm():  # a worker the reaper gave up on must not replace the new run's files
            raise JobCanceled
        keeps_model = JOB_KINDS[spec.kind()].keeps_model  # a sensitivity job measures and keeps no model
        if keeps_model:
            os.replace(work / "pruned.zip", artifact)
        extra_files = _move_extra_files(work, job_dir)
        os.replace(tmp_metrics, job_dir / "metrics.json")
        shutil.rmtree(work, ignore_errors=True)
        artifact_sha256 = _sha256(artifact) if keeps_model else None
        size = artifact.stat().st_size if keeps_model else None
        saved = [job_files.entry(job_files.SAVED_MODEL, "pruned.zip", size or 0, artifact_sha256 or "")]
        files = [*(saved if keeps_model else []), *extra_files]
        # In the store before the record says succeeded: a succeeded job never lacks a file.
        publish_job_files(storage, job_id, [f["file"] for f in files] + ["metrics.json"])
        with session_scope(sessions) as session:
            done = jobs.finish_job(
                session,
                job_id,
                "succeeded",
                artifact_sha256=artifact_sha256,
                artifact_bytes=size,
                attempt=lease.attempt,
                timings=lease.stage_seconds(),
                artifacts=files,
            )
        if not done:  # canceled (or taken over) while saving: the record already says so
            log.info("job %s finished after it was canceled or taken over; not recorded", job_id)
    except JobCanceled:
        fail(_error("canceled", "canceled by request"), "canceled")
    except SoftTimeLimitExceeded:
        fail(
            _error(
                "timeout",
                f"the job ran past the {settings.task_soft_time_limit} s limit (timings so far: "
                f"{lease.timings()}); lower fine_tune.epochs or the dataset size, or raise "
                "SECATEURS_TASK_SOFT_TIME_LIMIT",
            )
        )
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            log.exception("job %s failed", job_id)
            fail(_unexpected(exc, job_id))
        else:
            fail(
                _error(
                    "disk_full",
                    "the worker's disk filled up while the job wrote its outputs (nothing was kept); "
                    "free space or delete old jobs/models, then submit the job again",
                )
            )
    except PipelineError as exc:
        fail(_error(exc.code, exc.message))
    except StoreUnavailable as exc:
        fail(_error("store_unavailable", f"{exc.detail}; nothing was recorded as done: submit the job again"))
    except (StoreMisconfigured, CorruptBlob) as exc:
        fail(_error("store_error", str(exc)))
    except SecateursError as exc:
        fail(_error("invalid_input", exc.detail))
    except MemoryError:
        fail(_error("out_of_memory", "the worker ran out of memory; use a smaller batch_size or dataset"))
    except Exception as exc:
        log.exception("job %s failed", job_id)
        fail(_unexpected(exc, job_id))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@shared_task(name=RUN_JOB, bind=True, acks_late=True)
def run_job(self: Task, job_id: str) -> None:
    try:
        with log_context(job_id=job_id):
            _run(job_id)
    finally:
        # Every way _run ends the job records its webhook message in that same transaction (finish_job);
        # publish its first attempt now that it is committed. A no-op without a webhook or when the message
        # was published already (a queued job canceled by the API).
        _, sessions, _ = _context()
        with session_scope(sessions) as session:
            publish_for_job(self.app, session, job_id)
