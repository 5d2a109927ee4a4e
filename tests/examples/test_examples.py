"""The Quickstart's scripts (examples/) run as written against a real embedded server (`secateurs serve`).

Why: the README and the docs show these files verbatim, so if the API, the client or the demo data change in a
way that breaks the worked example, this fails instead of a newcomer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import Embedded
from tests.support.procs import ROOT

EXAMPLES = ROOT / "examples"
SCRIPT_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo files, made by the very command the scripts run when they are missing."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    subprocess.run([sys.executable, "-m", "tests.support.model_factory", "demo", str(out)], cwd=ROOT, check=True)
    return out


@pytest.fixture(scope="module")
def server(embedded: Embedded) -> str:
    """The session's embedded `secateurs serve` (API + its worker child): the scripts need nothing else of it."""
    return embedded.url


def _run(
    args: list[str], cwd: Path, server: str, demo_dir: Path, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update({"SECATEURS_URL": server, "DEMO_DIR": str(demo_dir), "PYTHON": sys.executable, **extra})
    cwd.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _check_outputs(out: Path, stdout: str) -> None:
    with zipfile.ZipFile(out / "pruned.zip") as zf:
        assert zf.testzip() is None
        assert any(name.endswith("saved_model.pb") for name in zf.namelist()), zf.namelist()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pruned"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert metrics["pruned"]["size_bytes"]["zip"] < metrics["baseline"]["size_bytes"]["zip"]
    line = re.search(r"accuracy (\d\.\d{3}) -> (\d\.\d{3}), sparsity 0\.80", stdout)
    assert line, stdout
    assert float(line.group(2)) == pytest.approx(metrics["pruned"]["metrics"]["accuracy"], abs=5e-4)


@pytest.mark.e2e
@pytest.mark.tf
def test_curl_flow_script(server: str, demo_dir: Path, tmp_path: Path) -> None:
    result = _run(["bash", str(EXAMPLES / "curl_flow.sh")], tmp_path / "curl", server, demo_dir)
    assert re.search(r"job_\S+: succeeded", result.stdout), result.stdout
    _check_outputs(tmp_path / "curl", result.stdout)


@pytest.mark.e2e
@pytest.mark.tf
def test_python_client_script(server: str, demo_dir: Path, tmp_path: Path) -> None:
    result = _run([sys.executable, str(EXAMPLES / "python_client.py")], tmp_path / "py", server, demo_dir)
    assert "succeeded" in result.stdout, result.stdout
    _check_outputs(tmp_path / "py", result.stdout)


@pytest.mark.e2e
@pytest.mark.tf
def test_bring_your_data_script(embedded: Embedded, demo_dir: Path, tmp_path: Path) -> None:
    """The same digits as TFRecord shards by reference (under the server's allowed file:// root), Parquet
    and a zipped PNG folder: each form becomes ready and prunes to 80% without losing the model."""
    data_root = embedded.refs / tmp_path.name  # unique per test run; the shared server allows all of refs/
    script = [sys.executable, str(EXAMPLES / "bring_your_data.py")]
    result = _run(script, tmp_path / "data", embedded.url, demo_dir, DATA_ROOT=str(data_root))
    lines = {
        m.group(1): (float(m.group(2)), float(m.group(3)))
        for m in re.finditer(r"^(\w+): accuracy (\d\.\d{3}) -> (\d\.\d{3}) \(", result.stdout, re.MULTILINE)
    }
    assert set(lines) == {"tfrecord", "parquet", "images"}, result.stdout
    for form, (baseline, pruned) in lines.items():
        assert baseline > 0.9, (form, result.stdout)
        assert pruned > 0.8, (form, result.stdout)
    assert len(list((data_root / "tfrecord-train").glob("*.tfrecord"))) == 3


@pytest.mark.parametrize("name", ["curl_flow.sh", "python_client.py"])
def test_the_readme_shows_each_example_verbatim(name: str) -> None:
    """The README cannot include files, so it carries a copy; this keeps the copy equal to the tested file."""
    body = (EXAMPLES / name).read_text()
    readme = (ROOT / "README.md").read_text()
    assert body.rstrip("\n") + "\n```" in readme, f"README.md's copy of examples/{name} differs from the file"
