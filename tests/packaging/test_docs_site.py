"""The documentation site builds with --strict and its pages load nothing from outside hosts.

Why: Material for MkDocs loads Google Fonts by default, and a theme or plugin change can add a CDN script; a
site built for a private network must render from its own files (``theme.font: false`` in mkdocs.yml).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Elements that make a browser fetch something as the page loads (links in the text are fine).
FETCHING = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//", re.IGNORECASE)


def test_site_builds_strict_and_fetches_nothing_outside(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pages = sorted(site.rglob("*.html"))
    assert {"index.html", "quickstart.html", "api.html", "spec.html"} <= {p.name for p in pages}
    outside = {str(p.relative_to(site)): FETCHING.findall(p.read_text()) for p in pages}
    assert {page: tags for page, tags in outside.items() if tags} == {}
    assert "fonts.googleapis.com" not in "".join(p.read_text() for p in pages)
    # The Quickstart includes the tested example scripts, so it cannot drift from them.
    quickstart = (site / "quickstart.html").read_text()
    assert "fail-with-body" in quickstart and "upload_model" in quickstart
    # So does the datasets page ("Bring your data").
    assert "write_png_folder_zip" in (site / "datasets.html").read_text()
