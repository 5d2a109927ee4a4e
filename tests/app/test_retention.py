"""Retention (app.retention.sweep) on SQLite and PostgreSQL: what goes when, what an active job protects, 410
on expired outputs, leftovers, idempotence and two sweepers at once, and ``secateurs cleanup``."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import inspect, update

from app import retention
from app.api.artifacts import ArtifactResponse, open_output
from app.cli import main as cli_main
from app.client import Client
from app.client.errors import Gone
from app.config import Settings
from app.db.engine import init_db, make_engine, session_scope
from app.db.tables import DatasetRecord, JobRecord, ModelRecord, utcnow
from app.errors import ArtifactExpired
from app.main import create_app
from app.retention import RetentionReport, sweep
from app.storage import Storage
from tests.app.auth_helpers import ARTIFACT, ENGINES, database_url, succeed
from tests.app.helpers import (
    app_of,
    assert_problem,
    create_job,
    files_under,
    upload_dataset,
    upload_model,
)

DAY = timedelta(days=1)


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from database_url(request, tmp_path)


@pytest.fixture
def settings(data_dir: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        min_free_bytes=0,
        database_url=db_url,
        model_ttl_days=30,
        dataset_ttl_days=20,
        artifact_ttl_days=7,
        tmp_ttl_s=3600,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def run_sweep(client: TestClient, now: datetime | None = None, **overrides: Any) -> RetentionReport:
    app = app_of(client)
    settings = app.state.settings.model_copy(update=overrides) if overrides else app.state.settings
    return sweep(settings, app.state.session_factory, app.state.storage, now=now)


def age(app: FastAPI, table: type[Any], record_id: str, **when: timedelta) -> None:
    """Move a record's timestamps ``when`` into the past (created_at=..., finished_at=...)."""
    with session_scope(app.state.session_factory) as session:
        session.execute(
            update(table).where(table.id == record_id).values({k: utcnow() - v for k, v in when.items()})
        )


def set_status(app: FastAPI, job_id: str, status: str) -> None:
    with session_scope(app.state.session_factory) as session:
        session.execute(update(JobRecord).where(JobRecord.id == job_id).values(status=status))


def finished_job(client: TestClient, model_id: str, ended_ago: timedelta) -> str:
    app = app_of(client)
    job_id = create_job(client, model_id)["id"]
    succeed(app, job_id)
    age(app, JobRecord, job_id, finished_at=ended_ago)
    return job_id


# --- models and datasets ------------------------------------------------------------------------------------


def test_old_models_and_datasets_go_record_and_files(client: TestClient) -> None:
    app = app_of(client)
    storage: Storage = app.state.storage
    old_model, new_model = upload_model(client)["id"], upload_model(client)["id"]
    old_data, new_data = upload_dataset(client)["id"], upload_dataset(client)["id"]
    age(app, ModelRecord, old_model, created_at=31 * DAY)
    age(app, ModelRecord, new_model, created_at=29 * DAY)
    age(app, DatasetRecord, old_data, created_at=21 * DAY)
    age(app, DatasetRecord, new_data, created_at=19 * DAY)

    report = run_sweep(client)

    assert (report.models, report.datasets, report.artifacts) == (1, 1, 0)
    assert_problem(client.get(f"/v1/models/{old_model}"), 404)
    assert_problem(client.get(f"/v1/datasets/{old_data}"), 404)
    assert client.get(f"/v1/models/{new_model}").status_code == 200
    assert client.get(f"/v1/datasets/{new_data}").status_code == 200
    assert not storage.model_dir(old_model).exists()
    assert not storage.dataset_path(old_data).exists()
    assert files_under(storage.model_dir(new_model)) and storage.dataset_path(new_data).is_file()
    assert files_under(storage.tmp_dir) == []  # deletes pass through tmp/ and leave nothing there


@pytest.mark.parametrize("status", ["queued", "running"])
def test_an_active_job_protects_its_model_and_datasets_until_it_ends(client: TestClient, status: str) -> None:
    app = app_of(client)
    model, unused_model = upload_model(client)["id"], upload_model(client)["id"]
    train, evaluation, unused_data = (upload_dataset(client)["id"] for _ in range(3))
    job = create_job(client, model, train_dataset_id=train, eval_dataset_id=evaluation)["id"]
    set_status(app, job, status)
    for model_id in (model, unused_model):
        age(app, ModelRecord, model_id, created_at=90 * DAY)
    for dataset in (train, evaluation, unused_data):
        age(app, DatasetRecord, dataset, created_at=90 * DAY)

    first = run_sweep(client)  # the job protects only what it uses
    assert (first.models, first.datasets) == (1, 1)
    assert_problem(client.get(f"/v1/models/{unused_model}"), 404)
    assert_problem(client.get(f"/v1/datasets/{unused_data}"), 404)
    assert client.get(f"/v1/models/{model}").status_code == 200
    assert client.get(f"/v1/datasets/{train}").status_code == 200
    assert client.get(f"/v1/datasets/{evaluation}").status_code == 200
    assert run_sweep(client).total == 0

    set_status(app, job, "failed")
    report = run_sweep(client)
    assert (report.models, report.datasets) == (1, 2)
    assert_problem(client.get(f"/v1/models/{model}"), 404)
    assert client.get(f"/v1/jobs/{job}").json()["model_id"] == model  # the job's record is not touched


def test_ttl_zero_keeps_everything_forever(client: TestClient) -> None:
    app = app_of(client)
    model, dataset = upload_model(client)["id"], upload_dataset(client)["id"]
    job = finished_job(client, model, ended_ago=3650 * DAY)
    age(app, ModelRecord, model, created_at=3650 * DAY)
    age(app, DatasetRecord, dataset, created_at=3650 * DAY)

    report = run_sweep(client, model_ttl_days=0, dataset_ttl_days=0, artifact_ttl_days=0)

    assert report.total == 0
    assert client.get(f"/v1/models/{model}").status_code == 200
    assert client.get(f"/v1/datasets/{dataset}").status_code == 200
    assert client.get(f"/v1/jobs/{job}/artifact").content == ARTIFACT


# --- job outputs --------------------------------------------------------------------------------------------


def test_expired_outputs_answer_410_and_the_job_says_when(client: TestClient) -> None:
    app = app_of(client)
    model = upload_model(client)["id"]
    old_job = finished_job(client, model, ended_ago=8 * DAY)
    new_job = finished_job(client, model, ended_ago=6 * DAY)
    etag = client.get(f"/v1/jobs/{old_job}/artifact").headers["etag"]
    assert client.get(f"/v1/jobs/{old_job}").json()["expired_at"] is None

    report = run_sweep(client)

    assert report.artifacts == 1
    job = client.get(f"/v1/jobs/{old_job}").json()
    assert job["status"] == "succeeded" and job["expired_at"] is not None
    for path in ("artifact", "metrics"):
        body = assert_problem(client.get(f"/v1/jobs/{old_job}/{path}"), 410)
        assert body["type"].endswith("/artifact-expired")
        assert body["expired_at"] == job["expired_at"]
        assert "retention" in body["detail"] and job["expired_at"][:10] in body["detail"]
    # a cached copy is not "current" any more either: 410, not 304
    assert_problem(client.get(f"/v1/jobs/{old_job}/artifact", headers={"If-None-Match": etag}), 410)
    assert not app.state.storage.job_dir(old_job).exists()
    assert client.get(f"/v1/jobs/{new_job}/artifact").content == ARTIFACT
    assert client.get(f"/v1/jobs/{new_job}").json()["expired_at"] is None
    assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [new_job, old_job]


def test_the_python_client_raises_gone_and_writes_nothing(client: TestClient, tmp_path: Path) -> None:
    job = finished_job(client, upload_model(client)["id"], ended_ago=8 * DAY)
    run_sweep(client)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    dest = downloads / "pruned.zip"
    with Client("http://testserver", transport=client._transport) as api:
        with pytest.raises(Gone) as raised:
            api.download_artifact(job, dest)
        with pytest.raises(Gone):
            api.metrics(job)
        assert api.get_job(job).raw["expired_at"] == raised.value.body["expired_at"]
    assert raised.value.status == 410 and "retention" in raised.value.detail
    assert list(downloads.iterdir()) == []


def test_failed_and_canceled_jobs_lose_their_files_too(client: TestClient) -> None:
    """A job canceled while saving can keep outputs on disk; they expire like any others."""
    app = app_of(client)
    model = upload_model(client)["id"]
    job = create_job(client, model)["id"]
    succeed(app, job)
    set_status(app, job, "canceled")
    age(app, JobRecord, job, finished_at=30 * DAY)

    assert run_sweep(client).artifacts == 1
    assert not app.state.storage.job_dir(job).exists()
    # still a 409 (it never succeeded), which says more than 410 would
    assert_problem(client.get(f"/v1/jobs/{job}/artifact"), 409)


def test_active_jobs_never_expire(client: TestClient) -> None:
    app = app_of(client)
    job = create_job(client, upload_model(client)["id"])["id"]
    age(app, JobRecord, job, created_at=60 * DAY, finished_at=60 * DAY)  # a stray finished_at
    assert run_sweep(client).artifacts == 0
    assert client.get(f"/v1/jobs/{job}").json()["expired_at"] is None


def test_a_download_that_opened_the_file_finishes_after_the_sweep(client: TestClient) -> None:
    app = app_of(client)
    job = finished_job(client, upload_model(client)["id"], ended_ago=8 * DAY)
    with app.state.session_factory() as session:
        record = session.get(JobRecord, job)
        assert record is not None
        files = [
            open_output(session, record, app.state.storage, "pruned.zip", app.state.settings) for _ in "ab"
        ]

    assert run_sweep(client).artifacts == 1
    assert not app.state.storage.job_dir(job).exists()

    status, body = asgi_get(ArtifactResponse(files[0], media_type="application/zip", filename="p.zip"))
    assert (status, body) == (200, ARTIFACT)
    ranged = ArtifactResponse(files[1], media_type="application/zip", filename="p.zip")
    assert asgi_get(ranged, [(b"range", b"bytes=10-19")]) == (206, ARTIFACT[10:20])
    assert files[0].closed and files[1].closed


def test_a_download_racing_the_sweep_gets_410_not_404(client: TestClient) -> None:
    """It read the record before the sweep marked it, and looks for the file after the files went."""
    app = app_of(client)
    job = finished_job(client, upload_model(client)["id"], ended_ago=8 * DAY)
    with app.state.session_factory() as session:
        stale = session.get(JobRecord, job)
        assert stale is not None and stale.expired_at is None
        assert run_sweep(client).artifacts == 1
        with pytest.raises(ArtifactExpired) as raised:
            open_output(session, stale, app.state.storage, "metrics.json", app.state.settings)
    assert raised.value.status == 410 and raised.value.extra["expired_at"]


def asgi_get(
    response: ArtifactResponse, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, bytes]:
    """Run a response as a server would, outside any app: (status, body)."""
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "GET", "headers": headers or [], "asgi": {"spec_version": "2.4"}}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(response(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


# --- tmp and leftovers --------------------------------------------------------------------------------------


def test_old_temp_files_go_fresh_ones_stay(client: TestClient) -> None:
    storage: Storage = app_of(client).state.storage
    stale_upload, stale_trash = storage.tmp_dir / "upload-1.part", storage.tmp_dir / "trash-1"
    stale_upload.write_bytes(b"half an upload")
    stale_trash.mkdir()
    (stale_trash / "variables").mkdir()
    (stale_trash / "variables" / "v").write_bytes(b"x")
    fresh = storage.tmp_dir / "upload-2.part"
    fresh.write_bytes(b"an upload in flight")
    two_hours_ago = time.time() - 2 * 3600
    for path in (stale_upload, stale_trash):
        os.utime(path, (two_hours_ago, two_hours_ago))

    assert run_sweep(client).tmp == 2
    assert sorted(p.name for p in storage.tmp_dir.iterdir()) == ["upload-2.part"]
    assert run_sweep(client).tmp == 0


def test_leftovers_without_a_record_go_once_old_enough(client: TestClient) -> None:
    """A crash between deleting a record and its files leaves blobs nobody owns; a fresh one is an upload
    whose record is being written, so it stays."""
    app = app_of(client)
    storage: Storage = app.state.storage
    kept = upload_model(client)["id"]
    (storage.model_dir("mdl_orphan") / "variables").mkdir(parents=True)
    (storage.model_dir("mdl_orphan") / "upload.zip").write_bytes(b"zip")
    storage.dataset_path("ds_orphan").write_bytes(b"npz")
    storage.job_dir("job_orphan").mkdir()
    (storage.datasets_dir / "not-a-dataset.txt").write_bytes(b"someone else's")

    assert run_sweep(client).leftovers == 0  # fresh: an upload between its commit and its record

    later = utcnow() + timedelta(seconds=3601)
    assert run_sweep(client, now=later).leftovers == 3
    assert not storage.model_dir("mdl_orphan").exists()
    assert not storage.dataset_path("ds_orphan").exists()
    assert not storage.job_dir("job_orphan").exists()
    assert (storage.datasets_dir / "not-a-dataset.txt").exists()
    assert files_under(storage.model_dir(kept))
    assert client.get(f"/v1/models/{kept}").status_code == 200


def test_an_expired_jobs_files_left_by_a_crash_go_next_time(client: TestClient) -> None:
    app = app_of(client)
    job = finished_job(client, upload_model(client)["id"], ended_ago=DAY)
    with session_scope(app.state.session_factory) as session:  # marked, then the process died
        session.execute(update(JobRecord).where(JobRecord.id == job).values(expired_at=utcnow()))
    assert app.state.storage.job_dir(job).exists()

    report = run_sweep(client)

    assert (report.artifacts, report.leftovers) == (0, 1)
    assert not app.state.storage.job_dir(job).exists()


# --- idempotence and concurrency ----------------------------------------------------------------------------


def test_running_twice_is_harmless(client: TestClient) -> None:
    app = app_of(client)
    model = upload_model(client)["id"]
    dataset = upload_dataset(client)["id"]
    job = finished_job(client, model, ended_ago=8 * DAY)
    age(app, ModelRecord, model, created_at=31 * DAY)
    age(app, DatasetRecord, dataset, created_at=31 * DAY)

    first = run_sweep(client)
    expired_at = client.get(f"/v1/jobs/{job}").json()["expired_at"]
    second = run_sweep(client)

    assert (first.models, first.datasets, first.artifacts) == (1, 1, 1)
    assert second.total == 0
    assert client.get(f"/v1/jobs/{job}").json()["expired_at"] == expired_at  # not moved by the second pass


def test_stale_candidates_are_rechecked_in_the_statement(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process may act between reading the candidates and deleting them: a job that started using the
    model, a record already deleted, or a job already expired. The conditional statement sees it; the files
    stay with whoever owns them."""
    app = app_of(client)
    storage: Storage = app.state.storage
    in_use, deleted = upload_model(client)["id"], upload_model(client)["id"]
    job = finished_job(client, in_use, ended_ago=8 * DAY)
    for model in (in_use, deleted):
        age(app, ModelRecord, model, created_at=31 * DAY)
    with session_scope(app.state.session_factory) as session:
        session.execute(update(JobRecord).where(JobRecord.id == job).values(expired_at=utcnow()))
    create_job(client, in_use)  # queued after the candidates were read
    storage.remove_model(deleted)
    with session_scope(app.state.session_factory) as session:
        session.execute(update(ModelRecord).where(ModelRecord.id == deleted).values(created_at=utcnow()))
    candidates = {ModelRecord.id: [in_use, deleted], JobRecord.id: [job], DatasetRecord.id: []}
    monkeypatch.setattr(retention, "_ids", lambda _sessions, column, _where: iter(candidates[column]))

    report = run_sweep(client)

    assert (report.models, report.artifacts) == (0, 0)
    assert files_under(storage.model_dir(in_use))
    assert client.get(f"/v1/models/{in_use}").status_code == 200


def test_two_sweepers_at_once_remove_each_thing_once(client: TestClient) -> None:
    app = app_of(client)
    storage: Storage = app.state.storage
    models = [upload_model(client)["id"] for _ in range(6)]
    jobs = [finished_job(client, models[0], ended_ago=8 * DAY) for _ in range(4)]
    for model in models[1:]:
        age(app, ModelRecord, model, created_at=31 * DAY)
    reports: list[RetentionReport] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def one() -> None:
        try:
            start.wait()
            reports.append(run_sweep(client))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sum(r.models for r in reports) == 5
    assert sum(r.artifacts for r in reports) == 4
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == [models[0]]
    assert all(not storage.job_dir(j).exists() for j in jobs)
    assert files_under(storage.models_dir) == files_under(storage.model_dir(models[0]))


# --- schema and CLI -----------------------------------------------------------------------------------------


def test_init_db_adds_expired_at_to_an_older_jobs_table(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        init_db(engine)
        with engine.begin() as conn:  # the jobs table as it was before retention
            conn.exec_driver_sql("DROP INDEX ix_jobs_retention")
            conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN expired_at")
        assert "expired_at" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        init_db(engine)
        init_db(engine)  # idempotent
        assert "expired_at" in {c["name"] for c in inspect(engine).get_columns("jobs")}
        assert "ix_jobs_retention" in {i["name"] for i in inspect(engine).get_indexes("jobs")}
    finally:
        engine.dispose()


def test_cleanup_command_runs_one_pass(
    client: TestClient,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = app_of(client)
    model = upload_model(client)["id"]
    job = finished_job(client, model, ended_ago=8 * DAY)
    age(app, ModelRecord, model, created_at=31 * DAY)
    for name, value in {
        "DATABASE_URL": settings.db_url,
        "MODEL_TTL_DAYS": "30",
        "DATASET_TTL_DAYS": "20",
        "ARTIFACT_TTL_DAYS": "7",
    }.items():
        monkeypatch.setenv(f"SECATEURS_{name}", value)

    assert cli_main(["cleanup", "--data-dir", str(settings.data_dir), "--json"]) == 0

    counts = json.loads(capsys.readouterr().out)
    assert counts == {"models": 1, "datasets": 0, "artifacts": 1, "tmp": 0, "leftovers": 0}
    assert_problem(client.get(f"/v1/models/{model}"), 404)
    assert_problem(client.get(f"/v1/jobs/{job}/artifact"), 410)
    assert cli_main(["cleanup", "--data-dir", str(settings.data_dir)]) == 0
    assert "removed: 0 models" in capsys.readouterr().out
