"""The report in a real headless Chromium (Debian's /usr/bin/chromium): served with the API's headers, it loads
with no console error (CSP violations are console errors) and its screenshot is not blank."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.app.helpers import app_of, create_job, upload_model
from tests.app.report_documents import HOSTILE, search_sweep_sensitivity_document
from tests.app.test_api_jobs import ARTIFACT, succeed

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ORIGIN = "http://127.0.0.1:8000"

# Skipped locally without the browser; in CI (.ci/run sets CI=true and installs chromium) it must run, never skip.
pytestmark = pytest.mark.skipif(
    (not CHROMIUM.exists() or shutil.which("chromium") is None) and os.environ.get("CI") != "true",
    reason="Debian's chromium package is not installed",
)


def test_report_page_in_chromium(client: TestClient, tmp_path: Path) -> None:
    from PIL import Image
    from playwright.sync_api import Route, sync_playwright

    model = upload_model(client, name=HOSTILE)
    job = create_job(client, model["id"])
    document = {**search_sweep_sensitivity_document(), "job_id": job["id"], "model_id": model["id"]}
    succeed(app_of(client), job["id"], ARTIFACT, document)
    answer = client.get(job["links"]["report"])
    assert answer.status_code == 200
    served = {k: v for k, v in answer.headers.items() if k.lower() != "content-length"}
    url = ORIGIN + job["links"]["report"]
    outside: list[str] = []
    console: list[tuple[str, str]] = []
    failures: list[str] = []

    def route(route: Route) -> None:
        if route.request.url == url:  # the API's page with the API's headers (CSP included)
            route.fulfill(status=200, headers=served, body=answer.content)
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: failures.append(str(e)))
            page.route("**/*", route)
            response: Any = page.goto(url, wait_until="load")
            assert response is not None and response.status == 200
            assert page.title().startswith("Secateurs report")
            assert page.locator("svg").count() == 6
            assert page.locator("script").count() == 0
            shot = page.screenshot(full_page=True)
        finally:
            browser.close()
    (tmp_path / "report.png").write_bytes(shot)
    assert outside == [] and failures == []
    assert [m for m in console if m[0] in ("error", "warning")] == []
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, tables and plots, not a single colour
    assert image.height > 2000  # every section laid out, not an empty page
