"""SECATEURS_LOG_FORMAT=json: one JSON object per line, with the job, tenant and stage of the work it concerns."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.deps import TenantDep
from app.config import Settings
from app.main import create_app
from app.observability.logs import JsonFormatter, bind, configure_logging, current_fields, log_context

log = logging.getLogger("secateurs.test")


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """Everything logged to 'secateurs.test' while the test runs, formatted by JsonFormatter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        log.removeHandler(handler)


def records(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_worker_context_fields_and_stage_changes(lines: io.StringIO) -> None:
    with log_context(job_id="job_1"):
        bind(tenant="acme")
        log.info("claimed")
        bind(stage="pruning")
        log.warning("pruning %d variables", 3)
    log.info("outside")
    first, second, outside = records(lines)
    assert first["job_id"] == "job_1" and first["tenant"] == "acme" and "stage" not in first
    assert second["stage"] == "pruning" and second["message"] == "pruning 3 variables"
    assert second["level"] == "warning" and second["logger"] == "secateurs.test"
    assert "job_id" not in outside and "tenant" not in outside
    assert first["ts"].endswith("+00:00")


def test_contexts_do_not_leak_between_threads(lines: io.StringIO) -> None:
    seen: dict[str, dict[str, str]] = {}

    def job(job_id: str) -> None:
        with log_context(job_id=job_id):
            bind(stage=f"stage-of-{job_id}")
            seen[job_id] = current_fields()

    threads = [threading.Thread(target=job, args=(f"job_{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {f"job_{i}": {"job_id": f"job_{i}", "stage": f"stage-of-job_{i}"} for i in range(4)}
    assert current_fields() == {}


def test_exceptions_are_one_line_with_the_traceback(lines: io.StringIO) -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("failed")
    (entry,) = records(lines)
    assert len(lines.getvalue().splitlines()) == 1
    assert "ValueError: bad" in entry["exc"]


def test_request_lines_carry_the_tenant_and_the_job_id_of_the_path(
    data_dir: Path, lines: io.StringIO
) -> None:
    app = create_app(Settings(data_dir=data_dir, min_free_bytes=0))

    def probe(job_id: str, tenant: TenantDep) -> dict[str, str]:  # a sync route: FastAPI runs it in a thread
        log.info("probing")
        return {"ok": job_id}

    app.add_api_route("/v1/jobs/{job_id}/probe", probe)
    with TestClient(app) as client:
        assert client.get("/v1/jobs/job_77/probe").status_code == 200
        assert client.get("/healthz").status_code == 200
    (entry,) = records(lines)
    assert entry["job_id"] == "job_77"
    assert entry["tenant"] == "default"  # bound by the tenant dependency (in another thread) and seen here


def test_configure_logging_switches_the_root_handler() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        configure_logging("json")
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert logging.getLogger("uvicorn.access").propagate
        configure_logging("text")
        assert not isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)


def test_log_format_setting_is_checked() -> None:
    assert Settings(log_format="json").log_format == "json"
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")  # type: ignore[arg-type]
