"""`/docs` renders the API's operations in a real browser with the network cut off (loopback only).

Why: FastAPI's default page pulls Swagger UI from a CDN, so on a private network it stays blank while every
HTTP-level test still passes. Only a browser shows the page actually works: a real uvicorn process serves
it, Debian's headless chromium loads it, every request to a host other than loopback is aborted and recorded,
and the test fails if any was attempted or if the operations do not appear. Under CI=true a missing chromium
fails the test (`.ci/run` installs it); elsewhere it skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import IN_CI
from tests.support.procs import Service, base_env, free_port

CHROMIUM = Path("/usr/bin/chromium")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-first-run",
    "--metrics-recording-only",
    # Belt and braces beside the route below: no name resolves except loopback ones.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]


def _need_chromium() -> None:
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return
    message = f"{CHROMIUM} is not installed (Debian package `chromium`)"
    if IN_CI:
        pytest.fail(f"{message}; CI must run the /docs browser test (.ci/run installs it)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn process serving create_app() (no worker: /docs needs none)."""
    root = tmp_path_factory.mktemp("docs-page")
    port = free_port()
    service = Service(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        base_env(root / "data"),
        root / "uvicorn.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            if service.process.poll() is not None:
                pytest.fail(f"uvicorn exited ({service.process.returncode}):\n{service.tail()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            subprocess.run(["sleep", "0.25"], check=True)
        else:
            pytest.fail(f"uvicorn not up:\n{service.tail()}")
        yield base
    finally:
        service.stop()


def test_docs_page_lists_the_operations_without_internet(api_url: str) -> None:
    _need_chromium()
    from playwright.sync_api import Route, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    blocked: list[str] = []
    failed: list[str] = []

    def only_loopback(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).hostname in LOOPBACK:
            route.continue_()
        else:
            blocked.append(url)
            route.abort("internetdisconnected")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(service_workers="block")
            context.route("**/*", only_loopback)
            page = context.new_page()
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.goto(f"{api_url}/docs", wait_until="load")
            try:
                page.wait_for_selector(".opblock-summary", timeout=30_000)
            except PlaywrightTimeout:
                pytest.fail(
                    f"/docs listed no operation within 30 s; outside requests blocked: {blocked}; "
                    f"page text: {page.inner_text('body')[:400]!r}"
                )
            operations = page.eval_on_selector_all(
                ".opblock-summary",
                """els => els.map(e => [
                    e.querySelector('.opblock-summary-method').textContent.trim(),
                    e.querySelector('.opblock-summary-path').getAttribute('data-path')])""",
            )
            title = page.title()
        finally:
            browser.close()

    assert blocked == [], f"/docs tried to reach the internet: {blocked}"
    assert failed == [], f"requests of /docs failed: {failed}"
    listed = {f"{method} {path}" for method, path in operations}
    for expected in ("POST /v1/jobs", "GET /v1/jobs/{job_id}", "POST /v1/models", "POST /v1/datasets"):
        assert expected in listed, sorted(listed)
    assert "Secateurs" in title


def test_docs_html_points_only_at_local_assets(api_url: str) -> None:
    html = httpx.get(f"{api_url}/docs", timeout=10).text
    assert "/docs/assets/swagger-ui-bundle.js" in html and "/docs/assets/swagger-ui.css" in html
    assert "http://" not in html and "https://" not in html, "the page names an outside host"
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        response = httpx.get(f"{api_url}/docs/assets/{asset}", timeout=10)
        assert response.status_code == 200 and len(response.content) > 0, asset
    assert httpx.get(f"{api_url}/docs/oauth2-redirect", timeout=10).status_code == 200
    assert httpx.get(f"{api_url}/redoc", timeout=10).status_code == 404  # ReDoc would need a CDN
