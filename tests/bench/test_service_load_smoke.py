"""The service load benchmark's smoke run end to end (real `secateurs serve`, real load-generator process, real
streamed upload), so it cannot rot. Asserts structure and consistency only: no timing thresholds, the machine
is shared."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench import service_load

pytestmark = [pytest.mark.e2e, pytest.mark.tf]


def _finite(value: Any, minimum: float = 0.0) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value >= minimum


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("service_load")
    work = root / "work"
    return service_load.run_service_load(smoke=True, cache_dir=root / "cache", work_dir=work), work


def test_every_phase_ran_and_every_answer_was_right(smoke: tuple[dict[str, Any], Path]) -> None:
    result, _ = smoke
    plan = service_load.SMOKE
    phases = result["phases"]
    assert len(phases) == 1 + len(plan.clients) * (1 + len(plan.intervals_s))
    assert phases[0]["path"] == "/healthz"
    assert {p["path"] for p in phases[1:]} == {f"/v1/jobs/{result['job_id']}"}
    assert [p["model"] for p in phases[1:]] == ["closed"] + ["paced"] * len(plan.intervals_s)
    for phase in phases:
        assert phase["clients"] == plan.clients[0]
        assert phase["errors"] == 0 and phase["warmup_errors"] == 0, phase["error_samples"]
        assert 0 < phase["requests"] <= plan.max_requests
        assert phase["p50_ms"] <= phase["p95_ms"] <= phase["p99_ms"] <= phase["max_ms"]
        assert _finite(phase["p50_ms"], 1e-6) and _finite(phase["rps"], 1e-6)
        for key in ("api_cpu_pct", "worker_cpu_pct", "client_cpu_pct", "other_cpu_pct", "steal_pct"):
            assert _finite(phase[key]), key
        assert phase["rps"] == pytest.approx(phase["requests"] / phase["elapsed_s"])
    # a paced client waits ~interval between requests, so it makes far fewer than in closed loop
    assert phases[2]["requests"] < phases[1]["requests"]


def test_upload_was_measured_and_cleaned_up(smoke: tuple[dict[str, Any], Path]) -> None:
    result, work = smoke
    upload = result["upload"]
    assert upload["bytes"] >= service_load.SMOKE.upload_bytes * 0.99
    assert upload["rows"] > 0 and upload["samples"] > 10
    assert _finite(upload["send_mb_s"], 1e-6) and _finite(upload["total_mb_s"], 1e-6)
    assert upload["send_s"] <= upload["total_s"]
    assert upload["rss_baseline_mb"] > 0 and upload["rss_peak_mb"] >= upload["rss_sampled_peak_mb"]
    assert upload["rss_growth_mb"] == pytest.approx(upload["rss_peak_mb"] - upload["rss_baseline_mb"])
    assert upload["hwm_after_mb"] >= upload["hwm_before_mb"] > 0
    # the client's file is gone, and so is the server's copy (deleted through the API)
    assert not list(work.rglob("*.npz"))


def test_markdown_has_both_tables(smoke: tuple[dict[str, Any], Path]) -> None:
    result, _ = smoke
    text = result["markdown"]
    assert text.startswith("### Service load (SMOKE")
    assert "| request | clients | client model |" in text and "`GET /v1/jobs/{id}`" in text
    assert "**API RSS growth**" in text and "CPUs" in text and "uvicorn" in text
    assert text == service_load.render(result)
