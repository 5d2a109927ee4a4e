"""GET /v1/jobs/{id} (the status poll): same body as the resource everywhere else, and no pool deadlock when
many polls arrive at once (it used to answer 500 after the 30 s pool timeout with ~200 concurrent clients)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.api.deps import READ_THREADS
from app.auth import create_key_in
from app.config import Settings
from app.db import jobs
from app.db.engine import session_scope
from app.db.tables import JobRecord
from app.main import create_app
from app.presenters import job_out
from tests.app.helpers import app_of, create_job, upload_model

# Released at once (a barrier), far more than anyio's 40 worker threads plus the SQLAlchemy pool's 5 + 10
# connections: with the former handler (sync, TenantDep + SessionDep) this deadlocked here too, every thread
# waiting for a connection held by a request waiting for a thread, ending in 500s after the pool timeout.
CONCURRENT = 250


@pytest.fixture
def job_id(client: TestClient) -> str:
    return str(create_job(client, str(upload_model(client)["id"]))["id"])


def test_poll_body_is_the_job_resource(client: TestClient, job_id: str) -> None:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with session_scope(app_of(client).state.session_factory) as session:
        record = session.get(JobRecord, job_id)
        assert record is not None
        expected = job_out(record).model_dump(mode="json")
    body = response.json()
    assert body == expected
    assert body["status"] == "queued" and body["webhook_deliveries"] == []
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None


def test_poll_of_an_ended_job_with_a_webhook_shows_its_message(data_dir: Path) -> None:
    """The webhook query is skipped only while it cannot find anything (job not ended, or no URL)."""
    settings = Settings(data_dir=data_dir, min_free_bytes=0, webhook_allow="127.0.0.1/32")
    with TestClient(create_app(settings)) as client:
        job = create_job(client, str(upload_model(client)["id"]), webhook_url="http://127.0.0.1:9/hook")
        assert client.get(f"/v1/jobs/{job['id']}").json()["webhook_status"] is None
        with session_scope(app_of(client).state.session_factory) as session:
            jobs.request_cancel(session, job["id"])
        body = client.get(f"/v1/jobs/{job['id']}").json()
    assert body["status"] == "canceled"
    assert body["webhook_status"] == "pending" and body["webhook_id"].startswith("msg_")


def test_unknown_and_foreign_jobs_are_404(client: TestClient, job_id: str) -> None:
    assert client.get("/v1/jobs/job_0000").status_code == 404
    with session_scope(app_of(client).state.session_factory) as session:
        _, key = create_key_in(session, "other")
    foreign = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
    assert foreign.status_code == 404


@pytest.mark.parametrize("path", ["/v1/jobs/{job}", "/v1/jobs", "/v1/models", "/v1/models/{model}"])
def test_many_concurrent_reads_all_answer(client: TestClient, job_id: str, path: str) -> None:
    """More requests at once than anyio's 40 threads plus the old pool's 15 connections: with a bounded pool
    every thread ended up waiting for a connection held by a request waiting for a thread (500 after 30 s)."""
    assert CONCURRENT > 40 + 15 and READ_THREADS <= 15
    model_id = client.get(f"/v1/jobs/{job_id}").json()["model_id"]
    url = path.format(job=job_id, model=model_id)
    start = threading.Barrier(CONCURRENT)

    def poll(_: int) -> httpx.Response:
        start.wait()
        return client.get(url)

    with ThreadPoolExecutor(CONCURRENT) as pool:
        responses = list(pool.map(poll, range(CONCURRENT)))
    assert [r.status_code for r in responses] == [200] * CONCURRENT
    assert len({r.content for r in responses}) == 1
