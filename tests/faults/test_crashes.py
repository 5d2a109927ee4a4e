"""Processes that die: real `secateurs serve` / `secateurs worker` processes, killed with SIGKILL mid-work.

- ``test_killed_worker_child_job_is_requeued_and_completed``: production topology (serve + the `secateurs
  worker` supervisor, test-own Redis, a throwaway PostgreSQL database). 3 jobs; the celery worker CHILD is
  SIGKILLed while the first is fine-tuning. Its lease runs out, the reaper in serve re-queues it, the
  supervisor starts a fresh child, and all 3 jobs succeed (the killed one on its 2nd attempt).
- ``test_killed_worker_child_with_one_attempt_fails_interrupted``: the same with SECATEURS_MAX_ATTEMPTS=1: the
  killed job ends ``failed`` with code ``interrupted`` and a message; the next job still succeeds.
- ``test_api_killed_mid_upload_keeps_nothing``: a 200 MB upload streamed over a raw socket; the serve process
  (embedded default) is SIGKILLed halfway. After a restart no model is listed, models/ is empty, the partial
  file lies only in tmp/, and the retention sweep removes it once it is older than SECATEURS_TMP_TTL_S.
- ``test_worker_recycles_after_each_task_and_soft_time_limit_fails_the_job``: worker_max_memory_per_child=1
  MiB makes the worker child exit after every task (the model's validation, then a job: each time the
  supervisor starts a new pid) and the job after a recycle still succeeds; a 10 s soft time limit fails a
  long fine-tune with ``timeout`` and "timings so far".

Every wait is a poll against a generous deadline; figures (jobs killed / recovered / failed) are printed (-s)
and recorded as junit properties.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from tests.faults.conftest import TinyFiles
from tests.faults.procs import (
    TERMINAL,
    Api,
    Processes,
    Recorder,
    RedisServer,
    Stack,
    fault_env,
    kill_group,
    report_figures,
    wait_ready,
    wait_until,
)
from tests.support.procs import celery_child, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.tf]

# ~9 s of fine-tuning on this machine (6k steps of a 16-unit MLP): long enough to be caught, short to re-run.
LONG_SPEC = {"target_sparsity": 0.5, "fine_tune": {"epochs": 30, "batch_size": 8}}
SHORT_SPEC = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}
WAIT_S = 240.0


def _kill_worker_child_mid_job(stack: Stack, job_id: str) -> int:
    """SIGKILL the celery child (not the supervisor) while ``job_id`` is fine-tuning; returns the new child's
    pid once the supervisor has started it."""
    caught = stack.api.wait_job(
        job_id, lambda b: b["stage"] == "fine_tuning" or b["status"] in TERMINAL, "to reach fine_tuning"
    )
    assert caught["status"] == "running", f"the job ended before it could be killed: {caught}"
    victim = stack.worker_child()
    assert victim is not None, f"no celery child under the supervisor:\n{stack.worker.tail()}"
    os.kill(victim, signal.SIGKILL)
    after = stack.api.job(job_id)
    assert after["status"] not in TERMINAL, f"killed mid-job, yet: {after}"
    replacement = wait_until(
        lambda: (pid := stack.worker_child()) is not None and pid != victim and pid,
        "the supervisor to start a new worker child",
        WAIT_S,
        detail=stack.worker.tail,
    )
    assert stack.worker.process.poll() is None, "the supervisor died with its child"
    return int(replacement)


@pytest.mark.redis
@pytest.mark.postgres
def test_killed_worker_child_job_is_requeued_and_completed(
    redis_server: RedisServer,
    pg_database: str,
    tiny_files: TinyFiles,
    processes: Processes,  # requested last: torn down first, while Redis and the database still answer
    tmp_path: Path,
    record_property: Recorder,
) -> None:
    stack = Stack(
        processes, tmp_path / "data", redis_server.url(), pg_database, tiny_files.model, tiny_files.train
    )
    try:
        jobs = [stack.submit(LONG_SPEC), stack.submit(SHORT_SPEC), stack.submit(SHORT_SPEC)]
        _kill_worker_child_mid_job(stack, jobs[0])
        ended = stack.api.settle(jobs, WAIT_S)
    finally:
        stack.close()

    killed = ended[jobs[0]]
    figures = {
        "jobs": len(jobs),
        "killed": 1,
        "recovered": int(killed["status"] == "succeeded" and killed["attempts"] == 2),
        "succeeded": sum(body["status"] == "succeeded" for body in ended.values()),
        "failed_with_reason": sum(
            body["status"] == "failed" and bool(body["error"]) for body in ended.values()
        ),
        "stuck": sum(body["status"] not in TERMINAL for body in ended.values()),
    }
    report_figures(record_property, "worker_kill", figures)
    for body in ended.values():
        if body["status"] == "failed":
            assert body["error"]["code"] and body["error"]["message"], body
    assert killed["status"] == "succeeded", killed
    assert killed["attempts"] == 2, f"the killed job should have run twice: {killed}"
    assert [ended[j]["status"] for j in jobs[1:]] == ["succeeded", "succeeded"], ended
    serve_log = stack.serve.log_path.read_text()
    assert f"job {jobs[0]}: its worker stopped renewing the lease; re-queued" in serve_log, stack.serve.tail()
    assert "worker exited with -9; restarting" in stack.worker.log_path.read_text(), stack.worker.tail()


@pytest.mark.redis
@pytest.mark.postgres
def test_killed_worker_child_with_one_attempt_fails_interrupted(
    redis_server: RedisServer,
    pg_database: str,
    tiny_files: TinyFiles,
    processes: Processes,  # requested last: torn down first, while Redis and the database still answer
    tmp_path: Path,
    record_property: Recorder,
) -> None:
    stack = Stack(
        processes,
        tmp_path / "data",
        redis_server.url(),
        pg_database,
        tiny_files.model,
        tiny_files.train,
        max_attempts=1,
    )
    try:
        jobs = [stack.submit(LONG_SPEC), stack.submit(SHORT_SPEC)]
        _kill_worker_child_mid_job(stack, jobs[0])
        ended = stack.api.settle(jobs, WAIT_S)
    finally:
        stack.close()

    killed, other = ended[jobs[0]], ended[jobs[1]]
    figures = {
        "jobs": len(jobs),
        "killed": 1,
        "recovered": int(killed["status"] == "succeeded"),
        "failed_interrupted": int(
            killed["status"] == "failed" and (killed["error"] or {}).get("code") == "interrupted"
        ),
        "succeeded": sum(body["status"] == "succeeded" for body in ended.values()),
        "stuck": sum(body["status"] not in TERMINAL for body in ended.values()),
    }
    report_figures(record_property, "worker_kill_one_attempt", figures)
    assert killed["status"] == "failed", killed
    assert killed["error"]["code"] == "interrupted", killed
    assert "stopped" in killed["error"]["message"] and "submit the job again" in killed["error"]["message"]
    assert killed["attempts"] == 1 and killed["finished_at"], killed
    assert other["status"] == "succeeded", other


def _multipart_head(boundary: str, filename: str) -> bytes:
    return (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()


def test_api_killed_mid_upload_keeps_nothing(
    processes: Processes, tmp_path: Path, record_property: Recorder
) -> None:
    size, chunk = 200 * 2**20, 2**20
    data_dir = tmp_path / "data"
    env = fault_env(data_dir, SECATEURS_TMP_TTL_S="60")
    port = free_port()
    serve = processes.serve(env, port)
    api = Api(f"http://127.0.0.1:{port}")
    wait_ready(api, [serve])
    tmp_dir, models_dir = data_dir / "tmp", data_dir / "models"

    boundary = uuid.uuid4().hex
    head, tail = _multipart_head(boundary, "big.zip"), f"\r\n--{boundary}--\r\n".encode()
    request = (
        f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(head) + size + len(tail)}\r\n\r\n"
    ).encode()
    block = os.urandom(chunk)
    sent = 0

    def partial_upload() -> Path | None:
        parts = [p for p in tmp_dir.glob("upload-*.part") if p.stat().st_size >= 64 * 2**20]
        return parts[0] if parts else None

    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request + head)
        while sent < size // 2:
            sock.sendall(block)
            sent += chunk
        # the server has written a good part of it to disk: the API dies mid-upload, half the body unsent
        partial = wait_until(
            partial_upload, "the server to write 64 MiB of the upload", 120, detail=serve.tail
        )
        kill_group(serve)
    leftovers = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file())
    assert not any(models_dir.iterdir()), f"a model directory after a killed upload: {leftovers}"
    stray = [
        p for p in leftovers if not p.startswith(("tmp/", "broker/")) and not p.startswith("secateurs.db")
    ]
    assert stray == [], f"files outside tmp/ after a killed upload: {stray}"
    assert partial.is_file(), "the partial upload should still lie in tmp/ until the sweep"

    serve = processes.serve(env, port, name="serve-restarted")
    wait_ready(api, [serve])
    try:
        listed = api.http.get("/v1/models")
        assert listed.status_code == 200, listed.text
        assert listed.json()["items"] == [], listed.json()
        assert not any(models_dir.iterdir()), list(models_dir.iterdir())
        in_tmp = list(tmp_dir.iterdir())
        assert partial in in_tmp, in_tmp
        # Age the leftover past SECATEURS_TMP_TTL_S (60 s, the minimum) instead of waiting a minute: the reaper's
        # retention sweep in the restarted serve must then remove it.
        old = time.time() - 3600
        for entry in in_tmp:
            os.utime(entry, (old, old))
        wait_until(
            lambda: not any(tmp_dir.iterdir()),
            "the retention sweep to empty tmp/",
            120,
            detail=lambda: f"tmp/: {list(tmp_dir.iterdir())}\n{serve.tail()}",
        )
        assert api.http.get("/v1/models").json()["items"] == []
    finally:
        api.close()
    report_figures(
        record_property,
        "upload_kill",
        {
            "bytes_sent_before_kill": sent,
            "partial_files": len(in_tmp),
            "models_after": 0,
            "tmp_after_sweep": 0,
        },
    )


def test_worker_recycles_after_each_task_and_soft_time_limit_fails_the_job(
    processes: Processes, tiny_files: TinyFiles, tmp_path: Path, record_property: Recorder
) -> None:
    env = fault_env(
        tmp_path / "data",
        SECATEURS_WORKER_MAX_MEMORY_PER_CHILD="1",
        SECATEURS_TASK_SOFT_TIME_LIMIT="10",
        SECATEURS_TASK_HARD_TIME_LIMIT="120",
    )
    port = free_port()
    serve = processes.serve(env, port)
    api = Api(f"http://127.0.0.1:{port}")
    pids: list[int] = []

    def next_child(what: str) -> int:
        """The worker child once it is a new process (the previous one exited after its task)."""
        pid = wait_until(
            lambda: (p := celery_child(serve.process.pid)) is not None and p not in pids and p,
            f"a fresh worker child {what}",
            WAIT_S,
            detail=serve.tail,
        )
        pids.append(int(pid))
        return int(pid)

    try:
        wait_ready(api, [serve])
        next_child("at start")
        model_id = api.upload_model(tiny_files.model)  # a task too: the child exits after it
        next_child("after the model's validation")
        train_id = api.upload_dataset(tiny_files.train)

        def submit(spec: dict[str, object]) -> str:
            response = api.http.post(
                "/v1/jobs", json={"model_id": model_id, "train_dataset_id": train_id, "spec": spec}
            )
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        short = submit(SHORT_SPEC)
        done = api.wait_ended(short, WAIT_S)
        assert done["status"] == "succeeded", done
        next_child("after the first job")
        # a third fresh child takes a fine-tune of minutes and must stop it at the 10 s soft limit
        slow = submit({"target_sparsity": 0.5, "fine_tune": {"epochs": 400, "batch_size": 8}})
        timed_out = api.wait_ended(slow, WAIT_S)
    finally:
        api.close()
    log = serve.log_path.read_text()
    report_figures(
        record_property,
        "recycle_and_soft_limit",
        {
            "worker_pids": len(pids),
            "recycle_messages": log.count("exiting so a fresh worker starts"),
            "timed_out": int(timed_out["status"] == "failed"),
        },
    )
    assert timed_out["status"] == "failed", timed_out
    assert timed_out["error"]["code"] == "timeout", timed_out
    assert "timings so far" in timed_out["error"]["message"], timed_out
    assert "fine_tuning" in timed_out["error"]["message"], timed_out
    assert len(set(pids)) == 3
    assert log.count("exiting so a fresh worker starts") >= 2, serve.tail()
    # a recycle is a clean exit, not a crash: the supervisor must not back off further after each one
    delays = re.findall(r"worker exited with 0; restarting in (\d+) s", log)
    assert len(delays) >= 2 and set(delays) == {"1"}, f"restart delays after recycles: {delays}"
