"""`secateurs prune --export tflite:FORMAT -o DIR` and `secateurs jobs download --artifact NAME` against the
embedded default (a real worker converts and evaluates the files); argument errors without a server."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from app.cli import main
from app.cli.remote import _with_exports
from app.client import Client
from tests.client.conftest import Tiny
from tests.conftest import Embedded


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [k for k in os.environ if k.startswith("SECATEURS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(tmp_path / "cli-var"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_export_flags_are_checked_and_merged_into_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "prune", "m.zip", "--sparsity", "0.5", "--export", "tflite:int4")
    assert code == 2 and "tflite:FORMAT" in err and "dynamic_range" in err
    code, _, err = run(capsys, "prune", "m.zip", "--sparsity", "0.5", "--export", "onnx:float32")
    assert code == 2
    spec = {"target_sparsity": 0.5, "export": {"tflite": ["float16"], "int8_io": True}}
    assert _with_exports(spec, ["int8", "float16"])["export"] == {
        "tflite": ["float16", "int8"],
        "int8_io": True,
    }
    assert _with_exports(spec, None) is spec
    assert _with_exports(spec, ["onnx"])["export"] == {"tflite": ["float16"], "int8_io": True, "onnx": True}
    assert _with_exports({"target_sparsity": 0.5}, ["onnx"])["export"] == {"tflite": [], "onnx": True}


@pytest.mark.e2e
@pytest.mark.tf
def test_prune_with_exports_downloads_every_file(
    embedded: Embedded, tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run(
        capsys,
        "prune",
        str(tiny.model_zip),
        "--sparsity",
        "0.5",
        "--train",
        str(tiny.train),
        "--eval",
        str(tiny.test),
        "--export",
        "tflite:int8",
        "--export",
        "tflite:float16",
        "--export",
        "onnx",
        "-o",
        str(out),
        "--poll",
        "0.2",
        "--json",
        "--url",
        embedded.url,
    )
    assert code == 0, stderr
    report = json.loads(stdout)
    job_id = report["job"]["id"]
    assert report["job"]["spec"]["export"]["tflite"] == ["int8", "float16"]
    assert report["job"]["spec"]["export"]["onnx"] is True
    assert set(report["artifacts"]) == {"saved_model", "tflite_int8", "tflite_float16", "onnx"}
    with Client(embedded.url) as client:
        listing = {item["name"]: item for item in client.list_artifacts(job_id)}
    for name, path in report["artifacts"].items():
        data = Path(path).read_bytes()
        assert Path(path).parent == out
        assert hashlib.sha256(data).hexdigest() == listing[name]["sha256"], name
    assert Path(report["artifacts"]["tflite_int8"]).name == f"{job_id}-tflite_int8.tflite"
    int8 = report["metrics"]["exports"]["tflite_int8"]
    pruned = report["metrics"]["pruned"]["metrics"]["accuracy"]
    assert abs(int8["metrics"]["accuracy"] - pruned) <= 0.05
    assert int8["size_bytes"] == listing["tflite_int8"]["size_bytes"]
    assert Path(report["artifacts"]["onnx"]).name == f"{job_id}-onnx.onnx"
    onnx = report["metrics"]["exports"]["onnx"]
    assert onnx["fidelity"]["top1_agreement"] == 1.0 and onnx["size_bytes"] == listing["onnx"]["size_bytes"]

    single = tmp_path / "model.tflite"
    code, stdout, stderr = run(
        capsys,
        "jobs",
        "download",
        job_id,
        "--artifact",
        "tflite_int8",
        "-o",
        str(single),
        "--url",
        embedded.url,
    )
    assert code == 0, stderr
    assert "sha-256 verified" in stdout
    assert single.read_bytes() == Path(report["artifacts"]["tflite_int8"]).read_bytes()

    code, _, stderr = run(
        capsys,
        "jobs",
        "download",
        job_id,
        "--artifact",
        "tflite_float32",
        "-o",
        str(tmp_path),
        "--url",
        embedded.url,
    )
    assert code == 2
    assert "tflite_float32" in stderr and "tflite_int8" in stderr  # the 404 names what the job has
