"""worker.tasks end to end without Celery or a broker: the job task on a real SQLite store and data directory
with a tiny zoo model. How a job ends when a try raises (before, while or after claiming), the same dataset as
train and eval set, and label shapes that do not fit the loss."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import jobs, records
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import DatasetRecord, JobRecord, ModelRecord, utcnow
from app.storage import Storage
from tests.support import model_zoo
from tests.support.model_factory import write_npz
from worker import tasks

FAST = {"latency": {"batch_sizes": [1], "runs": 3, "warmup": 1}}
MAX_ATTEMPTS = 3


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Input 'x' (16,), a 4-class softmax head: untrained, enough for the task's bookkeeping."""
    return model_zoo.build("dense", tmp_path_factory.mktemp("zoo") / "dense")


class World:
    """The worker's context (settings, sessions, storage) and helpers to seed records as the API would."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.settings = Settings(data_dir=root / "data", max_attempts=MAX_ATTEMPTS, min_free_bytes=0)
        engine = make_engine(f"sqlite:///{root / 'db.sqlite'}")
        init_db(engine)
        self.sessions: sessionmaker[Session] = make_session_factory(engine)
        self.storage = Storage(self.settings.data_dir)
        self.model_id = records.new_id("mdl")
        shutil.copytree(model_dir, self.storage.model_dir(self.model_id) / "saved_model")
        with session_scope(self.sessions) as s:
            records.add(
                s,
                ModelRecord(
                    id=self.model_id,
                    name="dense",
                    format="saved_model",
                    filename="dense.zip",
                    size_bytes=1,
                    sha256="0" * 64,
                    status="ready",
                ),
            )

    def dataset(self, arrays: dict[str, np.ndarray]) -> str:
        dataset_id = records.new_id("ds")
        path = write_npz(self.storage.dataset_path(dataset_id), arrays)
        info = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}
        with session_scope(self.sessions) as s:
            records.add(
                s,
                DatasetRecord(
                    id=dataset_id,
                    name="d.npz",
                    size_bytes=path.stat().st_size,
                    sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                    arrays=info,
                    n_samples=len(arrays["x"]),
                ),
            )
        return dataset_id

    def job(
        self,
        spec: dict[str, Any],
        train: str | None = None,
        evaluation: str | None = None,
        calibration: str | None = None,
    ) -> str:
        with session_scope(self.sessions) as s:
            job = records.add(
                s,
                JobRecord(
                    id=records.new_id("job"),
                    model_id=self.model_id,
                    train_dataset_id=train,
                    eval_dataset_id=evaluation,
                    calibration_dataset_id=calibration,
                    spec={"evaluation": FAST, **spec},
                    status="queued",
                    progress=0.0,
                    attempts=0,
                    cancel_requested=False,
                    dispatched_at=utcnow(),
                ),
            )
            return job.id

    def record(self, job_id: str) -> JobRecord:
        with session_scope(self.sessions) as s:
            job = s.get(JobRecord, job_id)
            assert job is not None
            s.expunge(job)
            return job


@pytest.fixture
def world(tmp_path: Path, dense_model: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    w = World(tmp_path, dense_model)
    monkeypatch.setattr(tasks, "_context", lambda: (w.settings, w.sessions, w.storage))
    return w


def digits_like(n: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    train, _ = model_zoo.datasets("dense", seed)
    return {"x": train["x"][:n], "y": train["y"][:n]}


# --- the same dataset as train and eval set ---------------------------------------------------------------


@pytest.mark.parametrize("uploads", ["one", "same file twice"])
def test_one_dataset_as_train_and_eval_set_runs_and_says_so(world: World, uploads: str) -> None:
    """Used to stay queued forever: the one DatasetRecord was expunged twice and the claim rolled back. The
    same file uploaded twice (two ids, the same bytes) gets the same note."""
    data = world.dataset(digits_like())
    other = data if uploads == "one" else world.dataset(digits_like())
    job_id = world.job({"target_sparsity": 0.5, "fine_tune": {"epochs": 1, "batch_size": 16}}, data, other)
    tasks._run(job_id)
    job = world.record(job_id)
    assert (job.status, job.error, job.attempts) == ("succeeded", None, 1)
    metrics = json.loads((world.storage.job_dir(job_id) / "metrics.json").read_text())
    assert tasks.SAME_DATASET_NOTE in metrics["notes"]
    assert metrics["pruned"]["metrics"]["accuracy"] is not None  # scored, on the training data


def test_distinct_datasets_get_no_training_data_note(world: World) -> None:
    job_id = world.job(
        {"target_sparsity": 0.5}, world.dataset(digits_like(seed=0)), world.dataset(digits_like(seed=1))
    )
    tasks._run(job_id)
    assert world.record(job_id).status == "succeeded"
    metrics = json.loads((world.storage.job_dir(job_id) / "metrics.json").read_text())
    assert tasks.SAME_DATASET_NOTE not in metrics["notes"]


def test_a_calibration_dataset_reaches_the_pipeline_inputs_only(world: World) -> None:
    """calibration_dataset_id is read through the same path as a train set; its labels are never looked at
    (here they could not fit the model's output at all)."""
    inputs = digits_like(n=40, seed=2)
    calibration = world.dataset({"x": inputs["x"], "y": np.zeros((40, 7, 3))})
    spec = {"target_sparsity": 0.5, "criterion": "sparsegpt", "calibration": {"samples": 32, "batch_size": 8}}
    job_id = world.job(spec, evaluation=world.dataset(digits_like(seed=1)), calibration=calibration)
    tasks._run(job_id)
    job = world.record(job_id)
    assert (job.status, job.error) == ("succeeded", None)
    metrics = json.loads((world.storage.job_dir(job_id) / "metrics.json").read_text())
    assert "calibrated on 32 input records (the calibration dataset" in "\n".join(metrics["notes"])
    assert {row["method"] for row in metrics["layers"] if "skipped" not in row} == {"sparsegpt"}
    missing = world.job(spec, calibration="ds_gone")
    tasks._run(missing)
    assert world.record(missing).error["code"] == "missing_dataset"  # type: ignore[index]


# --- unexpected exceptions end the job --------------------------------------------------------------------


def _boom(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("injected failure\nsecond line not shown")


def _assert_internal_error(job: JobRecord, tries: int) -> None:
    assert job.status == "failed" and job.error is not None and job.finished_at is not None
    assert job.error["code"] == "internal_error"
    message = job.error["message"]
    assert "RuntimeError" in message and "injected failure" in message and "second line" not in message
    assert "worker log" in message and job.id in message
    assert job.attempts == tries


@pytest.mark.parametrize(
    "where",
    [
        "claim_job",  # while claiming: the claim transaction rolls back, nothing counted the try
        "records",  # after the claim committed, reading the records (where the double expunge raised)
        "lease",  # after the claim, before the pipeline's own error handling
    ],
)
def test_an_exception_outside_the_pipeline_ends_the_job_after_max_attempts(
    world: World, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    job_id = world.job({"target_sparsity": 0.5}, evaluation=world.dataset(digits_like()))
    if where == "claim_job":
        monkeypatch.setattr(tasks.jobs, "claim_job", _boom)
    elif where == "records":
        real_get = Session.get

        def get(self: Session, entity: Any, *args: Any, **kwargs: Any) -> Any:
            return _boom() if entity is DatasetRecord else real_get(self, entity, *args, **kwargs)

        monkeypatch.setattr(Session, "get", get)
    else:
        monkeypatch.setattr(tasks, "JobLease", _boom)
    for attempt in range(1, MAX_ATTEMPTS):
        tasks._run(job_id)  # never raises: the try is recorded
        job = world.record(job_id)
        assert (job.status, job.attempts, job.error) == ("queued", attempt, None)
        assert job.dispatched_at is None  # the reaper re-sends it on its next pass, not in 15 min
        with session_scope(world.sessions) as s:  # ... as it does
            reaped = jobs.reap(s, lease_seconds=60, max_attempts=MAX_ATTEMPTS, redispatch_after_s=900)
        assert reaped.resend_jobs == [job_id]
    tasks._run(job_id)
    _assert_internal_error(world.record(job_id), MAX_ATTEMPTS)
    tasks._run(job_id)  # a late duplicate message changes nothing
    _assert_internal_error(world.record(job_id), MAX_ATTEMPTS)


def test_an_exception_inside_the_pipeline_fails_the_job_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline is deterministic given its inputs: one try, no re-run of the TensorFlow work."""
    import worker.pipeline

    monkeypatch.setattr(worker.pipeline, "run_pipeline", _boom)
    job_id = world.job({"target_sparsity": 0.5}, evaluation=world.dataset(digits_like()))
    tasks._run(job_id)
    _assert_internal_error(world.record(job_id), 1)


def test_a_crash_is_not_recorded_over_another_workers_live_claim(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A duplicate message whose claim raised must leave the job a live worker holds alone."""
    job_id = world.job({"target_sparsity": 0.5})
    with session_scope(world.sessions) as s:  # another worker holds it, heartbeat fresh
        assert jobs.claim_job(s, job_id, lease_seconds=60, max_attempts=MAX_ATTEMPTS).claimed
    monkeypatch.setattr(tasks.jobs, "claim_job", _boom)
    tasks._run(job_id)
    job = world.record(job_id)
    assert (job.status, job.attempts, job.error) == ("running", 1, None)


# --- label shapes against the loss ------------------------------------------------------------------------


def test_mse_on_class_ids_fails_invalid_spec_naming_both_shapes(world: World) -> None:
    """Issue 11: used to fail with 'internal: unexpected ValueError: in user code'."""
    spec = {"target_sparsity": 0.5, "loss": "mse", "fine_tune": {"epochs": 1}}
    job_id = world.job(spec, world.dataset(digits_like()))
    tasks._run(job_id)
    job = world.record(job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error["code"] == "invalid_spec"
    message = job.error["message"]
    assert "'mse'" in message and "(48,)" in message and "(None, 4)" in message
    assert "sparse_categorical_crossentropy" in message


# --- a validation whose worker dies while loading -----------------------------------------------------------


def _set_validating(world: World, load_attempts: int) -> None:
    with session_scope(world.sessions) as s:
        record = s.get(ModelRecord, world.model_id)
        assert record is not None
        record.status, record.load_attempts = "validating", load_attempts


def _model(world: World) -> ModelRecord:
    with session_scope(world.sessions) as s:
        record = s.get(ModelRecord, world.model_id)
        assert record is not None
        s.expunge(record)
        return record


def test_a_validation_counts_its_load_and_succeeds(world: World) -> None:
    _set_validating(world, 0)
    assert tasks._validate(world.model_id) is None
    record = _model(world)
    assert (record.status, record.load_attempts) == ("ready", 1)


def test_a_model_whose_loads_all_died_is_invalid_not_reloaded(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_attempts loads begun and none ended (the process was killed each time): the next delivery of the
    validation marks the model invalid with a reason instead of loading it into the same crash again."""
    _set_validating(world, MAX_ATTEMPTS)
    import worker.models

    def must_not_load(path: Path) -> None:
        raise AssertionError("loaded a model whose loads all crashed")

    monkeypatch.setattr(worker.models, "load_model", must_not_load)
    error = tasks._validate(world.model_id)
    record = _model(world)
    assert record.status == "invalid" and error is not None
    assert record.error == error and error["code"] == "validation_crashed"
    assert f"{MAX_ATTEMPTS} times" in error["message"] and "memory" in error["message"]
