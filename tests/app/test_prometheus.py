"""GET /metrics: HTTP series by route template, job/queue/heartbeat gauges and stage histograms from the store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.db import jobs
from app.db.engine import session_scope
from app.db.tables import JobRecord, utcnow
from app.main import create_app

TOKEN = "scrape-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def app_client(data_dir: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=data_dir, min_free_bytes=0, metrics_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        yield client


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def add_job(client: TestClient, job_id: str, status: str, **values: object) -> None:
    with session_scope(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        session.add(JobRecord(id=job_id, model_id="mdl_x", spec={}, status=status, **values))


def test_requests_are_counted_by_route_template_not_raw_path(app_client: TestClient) -> None:
    for job_id in ("job_aaa", "job_bbb", "job_ccc"):
        assert app_client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert app_client.get("/no/such/endpoint").status_code == 404
    assert app_client.get("/healthz").status_code == 200
    samples = scrape(app_client)
    route = (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404"))
    assert samples[("secateurs_http_requests_total", route)] == 3
    unmatched = (("method", "GET"), ("route", "<unmatched>"), ("status", "404"))
    assert samples[("secateurs_http_requests_total", unmatched)] == 1
    assert (
        samples[
            ("secateurs_http_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200")))
        ]
        == 1
    )
    assert not any("job_aaa" in str(labels) for _, labels in samples)
    count = samples[
        ("secateurs_http_request_duration_seconds_count", (("method", "GET"), ("route", "/v1/jobs/{job_id}")))
    ]
    assert count == 3
    inf = (("le", "+Inf"), ("method", "GET"), ("route", "/v1/jobs/{job_id}"))
    assert samples[("secateurs_http_request_duration_seconds_bucket", inf)] == 3


def test_token_is_required_when_configured(app_client: TestClient) -> None:
    missing = app_client.get("/metrics")
    assert missing.status_code == 401
    assert missing.headers["content-type"] == "application/problem+json"
    assert "SECATEURS_METRICS_TOKEN" in missing.json()["detail"]
    assert (
        app_client.get("/metrics", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code
        == 401
    )
    assert app_client.get("/metrics", headers=AUTH).status_code == 200


def test_without_token_only_loopback_clients_are_answered(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, min_free_bytes=0)
    app = create_app(settings)
    with TestClient(app, client=("203.0.113.7", 5000)) as remote:
        refused = remote.get("/metrics")
        assert refused.status_code == 403
        assert "SECATEURS_METRICS_TOKEN" in refused.json()["detail"]
    with TestClient(app, client=("127.0.0.1", 5000)) as local:
        assert local.get("/metrics").status_code == 200
    with TestClient(app, client=("::1", 5000)) as local6:
        assert local6.get("/metrics").status_code == 200


def test_jobs_queue_and_heartbeats_come_from_the_store(app_client: TestClient) -> None:
    now = utcnow()
    add_job(app_client, "job_q1", "queued", created_at=now - timedelta(seconds=120))
    add_job(app_client, "job_q2", "queued", created_at=now - timedelta(seconds=10))
    add_job(app_client, "job_r1", "running", worker="hostA:11", heartbeat_at=now - timedelta(seconds=30))
    add_job(app_client, "job_r2", "running", worker="hostA:11", heartbeat_at=now - timedelta(seconds=3))
    add_job(app_client, "job_r3", "running", worker="hostB:22", heartbeat_at=now - timedelta(seconds=50))
    add_job(app_client, "job_f1", "failed")
    samples = scrape(app_client)
    assert samples[("secateurs_database_up", ())] == 1
    assert samples[("secateurs_jobs", (("status", "queued"),))] == 2
    assert samples[("secateurs_jobs", (("status", "running"),))] == 3
    assert samples[("secateurs_jobs", (("status", "failed"),))] == 1
    assert samples[("secateurs_jobs", (("status", "succeeded"),))] == 0
    assert samples[("secateurs_queue_depth", ())] == 2
    assert 119 <= samples[("secateurs_queue_oldest_age_seconds", ())] < 600
    # the newest heartbeat of each worker: hostA's second job beat 3 s ago
    assert 2 <= samples[("secateurs_worker_heartbeat_age_seconds", (("worker", "hostA:11"),))] < 30
    assert 49 <= samples[("secateurs_worker_heartbeat_age_seconds", (("worker", "hostB:22"),))] < 600


def test_stage_histograms_count_each_finished_job_once(app_client: TestClient) -> None:
    now = utcnow()
    add_job(
        app_client,
        "job_s1",
        "succeeded",
        started_at=now - timedelta(seconds=40),
        finished_at=now - timedelta(seconds=10),
        timings={"loading": 0.3, "pruning": 7.0, "saving": 20.0, "total": 30.0},
    )
    first = scrape(app_client)
    pruning = (("stage", "pruning"),)
    assert first[("secateurs_job_stage_duration_seconds_count", pruning)] == 1
    assert first[("secateurs_job_stage_duration_seconds_sum", pruning)] == pytest.approx(7.0)
    assert first[("secateurs_job_stage_duration_seconds_bucket", (("le", "5.0"), ("stage", "pruning")))] == 0
    assert first[("secateurs_job_stage_duration_seconds_bucket", (("le", "10.0"), ("stage", "pruning")))] == 1
    assert ("secateurs_job_stage_duration_seconds_count", (("stage", "total"),)) not in first
    assert first[("secateurs_job_duration_seconds_sum", (("status", "succeeded"),))] == pytest.approx(
        30.0, abs=0.01
    )

    again = scrape(app_client)  # nothing new finished: nothing counted twice
    assert again[("secateurs_job_stage_duration_seconds_count", pruning)] == 1

    add_job(
        app_client,
        "job_s2",
        "failed",
        started_at=now - timedelta(seconds=5),
        finished_at=now - timedelta(seconds=20),  # stamped earlier than job_s1 (another worker's clock)
        timings={"loading": 1.0, "pruning": 2.0, "total": 3.0},
    )
    third = scrape(app_client)
    assert third[("secateurs_job_stage_duration_seconds_count", pruning)] == 2
    assert third[("secateurs_job_stage_duration_seconds_sum", pruning)] == pytest.approx(9.0)
    assert third[("secateurs_job_duration_seconds_count", (("status", "failed"),))] == 1


def test_database_down_still_scrapes_with_up_zero(app_client: TestClient) -> None:
    def broken() -> None:
        raise ConnectionError("database is down")

    app_client.app.state.metrics.store.sessions = broken  # type: ignore[attr-defined]
    assert app_client.get("/healthz").status_code == 200
    samples = scrape(app_client)
    assert samples[("secateurs_database_up", ())] == 0
    assert not any(name == "secateurs_jobs" for name, _ in samples)
    assert any(name == "secateurs_http_requests_total" for name, _ in samples)


def test_claim_and_finish_record_worker_and_timings(app_client: TestClient) -> None:
    add_job(app_client, "job_c1", "queued")
    with session_scope(app_client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        claim = jobs.claim_job(session, "job_c1", lease_seconds=60, max_attempts=3, worker="hostC:33")
        assert claim.claimed
    with session_scope(app_client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        assert jobs.finish_job(
            session, "job_c1", "failed", error={"code": "x", "message": "y"}, timings={"loading": 2.5}
        )
    with session_scope(app_client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        job = session.get(JobRecord, "job_c1")
        assert job is not None and job.worker == "hostC:33" and job.timings == {"loading": 2.5}
    samples = scrape(app_client)
    assert samples[("secateurs_job_stage_duration_seconds_count", (("stage", "loading"),))] == 1


def test_multiprocess_mode_sums_the_processes(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR (several uvicorn workers): any process answers the sum of all of them."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    count = (
        "from app.observability.prometheus import Metrics; m = Metrics(); "
        "m.http.requests.labels('GET', '/healthz', '200').inc({n})"
    )
    for n in (2, 3):  # two "workers", each its own process
        subprocess.run([sys.executable, "-c", count.format(n=n)], env=env, check=True, timeout=60)
    render = "from app.observability.prometheus import Metrics; print(Metrics().render().decode())"
    out = subprocess.run([sys.executable, "-c", render], env=env, check=True, capture_output=True, text=True)
    values = {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(out.stdout)
        for s in family.samples
        if s.name == "secateurs_http_requests_total"
    }
    assert values == {(("method", "GET"), ("route", "/healthz"), ("status", "200")): 5.0}
