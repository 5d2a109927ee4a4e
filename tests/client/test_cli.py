"""The `secateurs` CLI on top of the client: exit codes, --json, progress, keys, and serve's loopback rule.

Client commands run in-process (``main(argv)`` against the real app served in a thread: fast, exact states)
and, for the end-to-end flow, as real subprocesses against `secateurs serve` on the embedded default.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli import main
from app.cli.server import is_loopback
from app.client import Client, Job, ProgressPrinter
from tests.app.helpers import SAVED_MODEL
from tests.client.conftest import ServeApp, Tiny
from tests.conftest import Embedded
from tests.support.procs import Service, base_env, free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``secateurs argv`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def cli(*argv: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    """``secateurs argv`` as a real process (the console script's module), without inherited SECATEURS_*."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *argv],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI reads SECATEURS_* and `--data-dir` writes SECATEURS_DATA_DIR: keep both inside each test."""
    for name in [k for k in os.environ if k.startswith("SECATEURS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(tmp_path / "cli-var"))


def queued_jobs(url: str, model: Path, n: int) -> list[Job]:
    with Client(url) as client:
        model_id = client.upload_model(model, name="fake").id
        return [client.create_job(model_id, {"target_sparsity": 0.5}) for _ in range(n)]


# --- help, usage ----------------------------------------------------------------------------------------------


def test_help_documents_every_command_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("serve", "worker", "prune", "jobs", "models", "keys"):
        assert f"    {command} " in out
    for line in ("0  success", "1  the job failed", "2  usage", "3  server unavailable", "4  timeout"):
        assert line in out
    assert "SECATEURS_URL" in out and "SECATEURS_API_KEY" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "m.zip", "--sparsity", "1.5"], "between 0 and 1"),
        (["prune", "missing.zip", "--sparsity", "0.5"], "missing.zip: no such file or directory"),
        (["prune", "mdl_abc", "--sparsity", "0.5", "--train", "nope.npz"], "--train nope.npz does not exist"),
        (["prune", "mdl_abc"], "give --sparsity"),
        (["jobs"], "ACTION"),
    ],
)
def test_usage_errors_exit_2_before_anything_is_sent(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run(
        capsys, *argv, *(["--url", f"http://127.0.0.1:{free_port()}"] if argv[0] == "prune" else [])
    )
    assert code == 2
    assert message in err


def test_bad_spec_file_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text("[1, 2]")
    code, out, err = run(capsys, "prune", "mdl_abc", "--spec", str(spec), "--json")
    assert code == 2 and "JSON object" in err
    assert json.loads(out)["error"]["kind"] == "usage"


# --- client commands against the real app (in-process) -----------------------------------------------------------


def test_models_and_jobs_commands(
    capsys: pytest.CaptureFixture[str], api_url: str, fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECATEURS_URL", api_url)  # the environment instead of --url
    first, second = queued_jobs(api_url, fake_model, 2)

    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and first.model_id in out and "validating" in out and out.startswith("ID")
    code, out, _ = run(capsys, "models", "list", "--json")
    assert code == 0 and [m["id"] for m in json.loads(out)] == [first.model_id]

    code, out, _ = run(capsys, "jobs", "list", "--json")
    assert code == 0 and [j["id"] for j in json.loads(out)] == [second.id, first.id]
    code, out, _ = run(capsys, "jobs", "list", "--status", "queued", "--limit", "1")
    assert code == 0 and second.id in out and first.id not in out and "STATUS" in out

    code, out, _ = run(capsys, "jobs", "show", first.id)
    assert code == 0 and "status:      queued" in out and '"target_sparsity": 0.5' in out
    code, out, _ = run(capsys, "jobs", "show", first.id, "--json")
    assert code == 0 and json.loads(out)["id"] == first.id

    code, out, _ = run(capsys, "jobs", "cancel", first.id, "--json")
    assert code == 0 and json.loads(out)["status"] == "canceled"
    code, out, err = run(capsys, "jobs", "cancel", first.id)
    assert code == 2 and "409" in err and "already ended" in err and out == ""


def test_waiting_on_a_canceled_job_exits_1_with_its_error(
    capsys: pytest.CaptureFixture[str], api_url: str, fake_model: Path
) -> None:
    (job,) = queued_jobs(api_url, fake_model, 1)
    assert run(capsys, "jobs", "cancel", job.id, "--url", api_url)[0] == 0
    code, out, err = run(capsys, "jobs", "wait", job.id, "--url", api_url, "--json")
    assert code == 1
    assert f"job {job.id} canceled [canceled]" in err
    error = json.loads(out)["error"]
    assert error["kind"] == "job" and error["code"] == "canceled" and error["job"]["id"] == job.id


def test_a_wait_past_its_timeout_exits_4(
    capsys: pytest.CaptureFixture[str], api_url: str, fake_model: Path
) -> None:
    (job,) = queued_jobs(api_url, fake_model, 1)  # no worker here: it stays queued
    code, out, err = run(
        capsys, "jobs", "wait", job.id, "--url", api_url, "--timeout", "0.5", "--poll", "0.1", "--json"
    )
    assert code == 4
    assert "gave up waiting" in err
    body = json.loads(out)["error"]
    assert body["kind"] == "timeout" and body["last"]["status"] == "queued"
    assert f"{job.id} queued - 0%" in err  # plain progress lines when stderr is not a terminal


def test_a_refused_request_exits_2_with_the_problem_detail(
    capsys: pytest.CaptureFixture[str], api_url: str, fake_model: Path, tmp_path: Path
) -> None:
    code, out, err = run(capsys, "jobs", "show", "job_nope", "--url", api_url, "--json")
    assert code == 2 and "404" in err and "no job with id 'job_nope'" in err
    assert json.loads(out)["error"]["status"] == 404

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"criterion": "no-such-criterion"}))
    code, out, err = run(
        capsys, "prune", str(fake_model), "--sparsity", "0.5", "--spec", str(spec), "--url", api_url
    )
    assert code == 2 and "422" in err and "criterion" in err


def test_no_server_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "jobs", "list", "--url", f"http://127.0.0.1:{free_port()}", "--json")
    assert code == 3 and "is `secateurs serve` running" in err
    assert json.loads(out)["error"]["kind"] == "connection"


def test_a_server_error_exits_3(
    capsys: pytest.CaptureFixture[str], serve_app: ServeApp, fake_model: Path
) -> None:
    with serve_app(broker_url="redis://127.0.0.1:1/0") as url:
        code, _, err = run(capsys, "prune", str(fake_model), "--sparsity", "0.5", "--url", url)
    assert code == 3 and "503" in err and "retry" in err


def test_prune_without_wait_uploads_and_queues(
    capsys: pytest.CaptureFixture[str], api_url: str, tmp_path: Path
) -> None:
    """MODEL may be a SavedModel directory: the CLI zips it (the server checks the archive's structure)."""
    saved = tmp_path / "my_model"
    for name, data in SAVED_MODEL.items():
        (saved / name).parent.mkdir(parents=True, exist_ok=True)
        (saved / name).write_bytes(data)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"target_sparsity": 0.3, "scope": "global"}))
    code, out, err = run(
        capsys, "prune", str(saved), "--spec", str(spec), "--sparsity", "0.6", "--url", api_url, "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["model"]["name"] == "my_model" and report["model"]["status"] == "validating"
    assert report["job"]["status"] == "queued" and report["job"]["model_id"] == report["model"]["id"]
    assert report["job"]["spec"]["target_sparsity"] == 0.6 and report["job"]["spec"]["scope"] == "global"
    assert "uploaded model" in err
    code, out, _ = run(capsys, "prune", report["model"]["id"], "--sparsity", "0.5", "--url", api_url)
    assert code == 0 and "queued; follow it with `secateurs jobs wait job_" in out


def test_prune_with_calibration_inputs(capsys: pytest.CaptureFixture[str], api_url: str, tmp_path: Path) -> None:
    """--calibration uploads an inputs-only .npz and names it calibration_dataset_id; fast then prunes with
    sparsegpt (the job shows the resolved spec)."""
    import numpy as np

    model = tmp_path / "model.zip"
    with zipfile.ZipFile(model, "w") as zf:
        for name, data in SAVED_MODEL.items():
            zf.writestr(name, data)
    inputs = tmp_path / "calibration.npz"
    np.savez(inputs, x=np.zeros((4, 64), np.float32))
    code, out, err = run(
        capsys, "prune", str(model), "--sparsity", "0.5", "--calibration", str(inputs), "--url", api_url, "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["job"]["calibration_dataset_id"] == report["calibration_dataset"]["id"]
    assert report["job"]["spec"]["criterion"] == "sparsegpt"


def test_progress_redraws_one_line_on_a_terminal() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(stream, tty=True)
    base = {"id": "job_1", "model_id": "m", "created_at": None, "spec": {}}
    for status, stage, progress in [
        ("queued", None, 0.0),
        ("running", "pruning", 0.42),
        ("succeeded", None, 1.0),
    ]:
        printer(Job.from_json({**base, "status": status, "stage": stage, "progress": progress}))
    printer.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "running   pruning      [##########--------------]  42%" in text
    assert "[########################] 100%" in text


# --- keys (admin) and the Bearer key in use --------------------------------------------------------------------


def test_keys_create_list_revoke_and_use(
    capsys: pytest.CaptureFixture[str], serve_app: ServeApp, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = ["--data-dir", str(data_dir)]
    code, out, _ = run(capsys, "keys", "create", "--tenant", "acme", *admin, "--json")
    assert code == 0
    created = json.loads(out)
    assert (
        created["tenant"] == "acme"
        and created["key"].startswith("sk_")
        and created["key_id"].startswith("key_")
    )
    code, out, _ = run(capsys, "keys", "create", "--tenant", "acme", *admin)
    assert code == 0 and "only time the key is shown" in out
    spare_key = next(line.strip() for line in out.splitlines() if line.strip().startswith("sk_"))

    code, out, _ = run(capsys, "keys", "list", *admin, "--json")
    listed = json.loads(out)
    assert code == 0 and len(listed) == 2 and all(k["active"] and k["tenant"] == "acme" for k in listed)
    assert created["key"] not in out and spare_key not in out  # never the secret again
    code, out, _ = run(capsys, "keys", "list", *admin)
    assert code == 0 and created["key_id"] in out and "TENANT" in out

    spare_id = next(k["id"] for k in listed if k["id"] != created["key_id"])
    assert run(capsys, "keys", "revoke", spare_id, *admin)[0] == 0
    code, _, err = run(capsys, "keys", "revoke", spare_id, *admin)
    assert code == 2 and "no active API key" in err
    code, out, _ = run(capsys, "keys", "list", *admin, "--json")
    assert {k["id"]: k["active"] for k in json.loads(out)} == {created["key_id"]: True, spare_id: False}
    code, _, err = run(capsys, "keys", "create", "--tenant", "Not A Tenant", *admin)
    assert code == 2 and "bad tenant name" in err

    with serve_app() as url:
        code, _, err = run(capsys, "models", "list", "--url", url)
        assert code == 2 and "401" in err  # a key exists: keys are required now
        code, _, err = run(capsys, "models", "list", "--url", url, "--api-key", spare_key)
        assert code == 2 and "revoked" in err
        monkeypatch.setenv("SECATEURS_API_KEY", created["key"])
        code, out, err = run(capsys, "models", "list", "--url", url, "--json")
        assert code == 0 and json.loads(out) == [], err


# --- serve: auth banner and the loopback rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_refuses_a_public_address_without_keys(tmp_path: Path) -> None:
    port = free_port()
    done = cli(
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--no-worker",
        "--data-dir",
        str(tmp_path / "d"),
        timeout=60,
    )
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stderr and "keys create" in done.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_serve_on_a_public_address_with_a_key_requires_it(tmp_path: Path) -> None:
    data = tmp_path / "d"
    created = cli("keys", "create", "--tenant", "ops", "--data-dir", str(data), "--json", timeout=60)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    port = free_port()
    service = Service(
        [sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--port", str(port), "--no-worker"],
        base_env(data),
        tmp_path / "serve.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert service.process.poll() is None, service.tail()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, service.tail()
            time.sleep(0.2)
        assert "auth: on" in service.tail(200)
        anonymous = cli("jobs", "list", "--json", SECATEURS_URL=url, timeout=60)
        assert anonymous.returncode == 2 and json.loads(anonymous.stdout)["error"]["status"] == 401
        keyed = cli("jobs", "list", "--json", SECATEURS_URL=url, SECATEURS_API_KEY=key, timeout=60)
        assert keyed.returncode == 0 and json.loads(keyed.stdout) == []
    finally:
        service.stop()


@pytest.mark.e2e
@pytest.mark.tf
def test_sigterm_stops_serve_and_its_embedded_worker(tmp_path: Path) -> None:
    """What `docker stop` / systemd do: SIGTERM to the serve process alone must not orphan the worker child."""
    port = free_port()
    service = Service(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        base_env(tmp_path / "d"),
        tmp_path / "s.log",
    )
    group = os.getpgid(service.process.pid)
    try:
        wait_ready(f"http://127.0.0.1:{port}", [service])
        found = re.search(r"worker started \(pid (\d+)\)", service.tail(400))
        assert found, service.tail()
        worker_pid = int(found.group(1))
        os.kill(worker_pid, 0)  # alive now
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(60) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(worker_pid, 0)  # stopped and reaped by serve, not left to init
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        service.stop()


def test_worker_supervisor_restarts_a_killed_child_and_stops_it_on_sigterm(tmp_path: Path) -> None:
    """`secateurs worker` supervises its Celery process: a dead child is replaced, SIGTERM stops both."""
    service = Service(
        [sys.executable, "-m", "app.cli", "worker"], base_env(tmp_path / "d"), tmp_path / "w.log"
    )
    group = os.getpgid(service.process.pid)
    try:
        pids: list[int] = []
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            pids = [int(p) for p in re.findall(r"worker started \(pid (\d+)\)", service.tail(400))]
            if len(pids) == 1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[0], signal.SIGKILL)  # a crash: the supervisor must start another
            time.sleep(0.2)
        assert len(pids) >= 2 and pids[0] != pids[1], service.tail()
        assert "exited with -9; restarting" in service.tail(400)
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(60) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pids[-1], 0)  # the current child stopped and reaped too
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        service.stop()


# --- end to end on the embedded default (subprocesses, real worker) ----------------------------------------------


@pytest.mark.e2e
@pytest.mark.tf
def test_prune_wait_download_end_to_end(embedded: Embedded, tiny: Tiny, tmp_path: Path) -> None:
    assert "auth: off" in embedded.service.log_path.read_text()  # loopback without keys says so at start
    out, metrics_file = tmp_path / "pruned.zip", tmp_path / "metrics.json"
    done = cli(
        "prune",
        str(tiny.model_zip),
        "--sparsity",
        "0.5",
        "--train",
        str(tiny.train),
        "--eval",
        str(tiny.test),
        "--wait",
        "-o",
        str(out),
        "--metrics",
        str(metrics_file),
        "--poll",
        "0.2",
        "--json",
        SECATEURS_URL=embedded.url,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    job = report["job"]
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert report["artifact"] == str(out) and report["metrics_file"] == str(metrics_file)
    assert report["train_dataset"]["arrays"]["x.pixels"]["shape"] == [400, 64]
    metrics = json.loads(metrics_file.read_text())
    assert metrics == report["metrics"] and metrics["job_id"] == job["id"]
    assert metrics["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert "sparsity 0.50" in report["summary"] and "accuracy" in report["summary"]
    progress = [line for line in done.stderr.splitlines() if line.startswith(job["id"])]
    assert progress and progress[-1] == f"{job['id']} succeeded - 100%"
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None and "saved_model.pb" in zf.namelist()
    etag = httpx.get(f"{embedded.url}/v1/jobs/{job['id']}/artifact").headers["etag"]
    assert etag.strip('"') == hashlib.sha256(out.read_bytes()).hexdigest()

    again = tmp_path / "again.zip"
    waited = cli("jobs", "wait", job["id"], "-o", str(again), SECATEURS_URL=embedded.url)
    assert waited.returncode == 0, waited.stderr
    assert (
        f"job {job['id']} succeeded: sparsity 0.50" in waited.stdout and "sha-256 verified" in waited.stdout
    )
    assert again.read_bytes() == out.read_bytes()
    shown = cli("jobs", "show", job["id"], "--json", SECATEURS_URL=embedded.url)
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "succeeded"
    models = cli("models", "list", "--json", SECATEURS_URL=embedded.url)
    assert job["model_id"] in [m["id"] for m in json.loads(models.stdout)]


@pytest.mark.e2e
@pytest.mark.tf
def test_prune_of_an_impossible_job_exits_1_with_the_error(
    embedded: Embedded, tiny: Tiny, tmp_path: Path
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"include": ["^no_such_variable$"]}))
    out = tmp_path / "pruned.zip"
    done = cli(
        "prune",
        str(tiny.model_zip),
        "--sparsity",
        "0.5",
        "--spec",
        str(spec),
        "-o",
        str(out),
        "--poll",
        "0.2",
        "--json",
        SECATEURS_URL=embedded.url,
    )
    assert done.returncode == 1, done.stderr
    assert "failed [invalid_spec]: no prunable variable matches" in done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["kind"] == "job" and error["code"] == "invalid_spec" and error["status"] == "failed"
    assert not out.exists()


def test_required_auth_without_keys_may_bind_anywhere(tmp_path: Path) -> None:
    """docker-compose's case: production (auth required) on 0.0.0.0 before any key exists starts, answering
    401 until `keys create`; only an OPEN API (auth off) is refused off loopback."""
    from app.cli.server import auth_banner
    from app.config import Settings

    required = Settings(data_dir=tmp_path / "a", auth="required")
    may_start, message = auth_banner(required, "0.0.0.0")
    assert may_start and "401" in message
    may_start, message = auth_banner(Settings(data_dir=tmp_path / "b"), "0.0.0.0")
    assert not may_start and "refusing" in message
