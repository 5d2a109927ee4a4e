"""A sweep's trials at the API (no worker: the records are set as worker.trial_tasks leaves them): the job body
lists them; cancel ends queued trials at once, and the job too when none is running."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.db import jobs, trials
from app.db.engine import session_scope
from app.db.tables import JobRecord
from tests.app.helpers import app_of, create_job, upload_model

SWEEP = {"sweep": {"targets": [0.9, 0.5]}}


def _fan_out(app: FastAPI, job_id: str, running: int = 0) -> None:
    with session_scope(app.state.session_factory) as s:
        attempt = jobs.claim_job(s, job_id, lease_seconds=600, max_attempts=3).attempts
        job = s.get(JobRecord, job_id)
        assert job is not None
        specs = [trials.TrialSpec(0, "sparsity-0.50", 0.5), trials.TrialSpec(1, "sparsity-0.90", 0.9)]
        trials.create_trials(s, job, "sweep", specs)
        assert trials.enter_trials_stage(s, job_id, attempt)
    for index in range(running):
        with session_scope(app.state.session_factory) as s:
            claim = trials.claim_trial(s, f"{job_id}.{index}", max_attempts=3, worker="secateurs-7@h")
            assert claim.claimed


def test_the_job_body_lists_a_sweeps_trials(client: TestClient) -> None:
    model_id = str(upload_model(client)["id"])
    job = create_job(client, model_id, SWEEP)
    assert client.get(f"/v1/jobs/{job['id']}").json()["trials"] == []  # not sent to its trials yet
    prune = create_job(client, model_id, {"target_sparsity": 0.5})
    assert prune["trials"] is None
    _fan_out(app_of(client), job["id"], running=1)
    body = client.get(f"/v1/jobs/{job['id']}").json()
    assert (body["status"], body["stage"]) == ("running", "trials")
    first, second = body["trials"]
    assert first["label"] == "sparsity-0.50" and first["target"] == 0.5 and first["index"] == 0
    assert (first["status"], first["worker"], first["attempts"]) == ("running", "secateurs-7@h", 1)
    assert first["started_at"] is not None and first["seconds"] is None
    assert (second["status"], second["worker"], second["attempts"]) == ("queued", None, 0)
    assert client.get("/v1/jobs").json()["items"][0]["trials"] is None  # lists do not read trials

    canceled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 202
    body = canceled.json()
    assert body["status"] == "running" and body["cancel_requested"]  # one trial still runs
    assert [t["status"] for t in body["trials"]] == ["running", "canceled"]


def test_cancel_with_no_trial_running_ends_the_sweep_at_once(client: TestClient) -> None:
    model_id = str(upload_model(client)["id"])
    job = create_job(client, model_id, SWEEP)
    _fan_out(app_of(client), job["id"])
    body = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert body["status"] == "canceled"
    assert [t["status"] for t in body["trials"]] == ["canceled", "canceled"]
