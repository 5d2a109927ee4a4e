"""Job kinds end to end on the embedded default (a real worker): a sweep's per-target files are listed and
downloadable, a sensitivity job keeps no artifact, and `secateurs jobs report ID -o FILE` saves the page."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.cli import main
from app.client import Client
from app.client.errors import ApiError
from tests.client.conftest import Tiny
from tests.conftest import Embedded

pytestmark = [pytest.mark.e2e, pytest.mark.tf]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [k for k in os.environ if k.startswith("SECATEURS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(tmp_path / "cli-var"))


def test_sweep_sensitivity_and_the_report_command(
    embedded: Embedded, tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Client(embedded.url) as client:
        model = client.upload_model(tiny.model_zip)
        test = client.upload_dataset(tiny.test)
        sweep = client.create_job(model.id, {"sweep": {"targets": [0.5, 0.8]}}, eval_dataset_id=test.id)
        sensitivity = client.create_job(
            model.id, {"sensitivity": {"sparsities": [0.5, 0.9]}}, eval_dataset_id=test.id
        )
        done = client.wait_job(sweep.id, timeout=600, poll=0.2)
        assert done.status == "succeeded", done.error
        names = [item["name"] for item in client.list_artifacts(sweep.id)]
        assert names[0] == "saved_model" and {"sparsity-0.50", "sparsity-0.80"} <= set(names)
        points = client.metrics(sweep.id)["sweep"]["points"]
        assert [p["target"] for p in points] == [0.5, 0.8]
        done = client.wait_job(sensitivity.id, timeout=600, poll=0.2)
        assert done.status == "succeeded", done.error
        assert client.list_artifacts(sensitivity.id) == []
        with pytest.raises(ApiError) as caught:
            client.download_artifact(sensitivity.id, tmp_path / "none.zip")
        assert caught.value.status == 409
        assert client.metrics(sensitivity.id)["sensitivity"]["ranking"]

    page = tmp_path / "report.html"
    code = main(["jobs", "report", sweep.id, "-o", str(page), "--url", embedded.url])
    out, err = capsys.readouterr()
    assert code == 0, err
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in html and 'id="sweep"' in html
    assert str(page) in out
