"""The Python client: error mapping against the real app, CRUD, waits, downloads, and the whole flow on the
embedded default. Client-only behaviour (backoff, Retry-After, resume) runs on httpx.MockTransport with a fake
clock, so it is exact and instant; everything the server decides runs against the real server."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.client import (
    ApiError,
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    DigestMismatch,
    Forbidden,
    InsufficientStorage,
    Job,
    JobCanceled,
    JobFailed,
    ModelInvalid,
    NotFound,
    PayloadTooLarge,
    SecateursClientError,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
    WaitTimeout,
)
from app.client import client as client_module
from app.client.errors import parse_retry_after
from app.client.testing import FakeClock
from app.config import Settings
from tests.client.conftest import ServeApp, Tiny
from tests.conftest import Embedded
from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
PROBLEMS = "https://secateurs.dev/problems/"


def job_body(status: str = "running", **extra: Any) -> dict[str, Any]:
    body = {
        "id": "job_1",
        "model_id": "mdl_1",
        "status": status,
        "stage": "pruning" if status == "running" else None,
        "progress": 0.5 if status == "running" else (1.0 if status == "succeeded" else 0.0),
        "created_at": "2025-01-01T00:00:00Z",
        "started_at": None,
        "finished_at": None,
        "error": None,
        "spec": {"target_sparsity": 0.5},
    }
    body.update(extra)
    return body


def mock_client(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> Client:
    return Client("http://secateurs.test", transport=httpx.MockTransport(handler), **kwargs)


# --- packaging ----------------------------------------------------------------------------------------------


def test_importing_the_client_or_the_cli_loads_no_server_or_ml_stack() -> None:
    """A service scripting Secateurs installs httpx, not the server: prove it in a fresh interpreter."""
    code = (
        "import json, sys, app.client, app.cli\n"
        "heavy = {'fastapi', 'starlette', 'sqlalchemy', 'celery', 'tensorflow', 'numpy', 'pydantic', 'keras'}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & heavy)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


# --- every problem status -> its exception, against the real app -------------------------------------------


def _upload(client: Client, model: Path) -> Any:
    return client.upload_model(model)


def _queued_job(client: Client, model: Path) -> Job:
    return client.create_job(client.upload_model(model).id, {"target_sparsity": 0.5})


REAL_CASES: dict[str, tuple[dict[str, Any], Callable[[Client, Path], Any], type[ApiError], str]] = {
    "400 bad form field": ({}, lambda c, m: c.upload_model(m, name="n" * 5000), BadRequest, "'name'"),
    "401 no key while required": (
        {"auth": "required"},
        lambda c, m: c.list_models(),
        Unauthorized,
        "API key",
    ),
    "404 unknown job": ({}, lambda c, m: c.get_job("job_nope"), NotFound, "no job"),
    "409 metrics before success": (
        {},
        lambda c, m: c.metrics(_queued_job(c, m).id),
        Conflict,
        "no output yet",
    ),
    "409 delete a model in use": (
        {},
        lambda c, m: c.delete_model(_queued_job(c, m).model_id),
        Conflict,
        "cancel them or wait",
    ),
    "413 over the limit": ({"max_model_bytes": 100}, _upload, PayloadTooLarge, "limit"),
    "415 not an archive": (
        {},
        lambda c, m: (m.write_bytes(bytes(range(256)) * 4), c.upload_model(m)),
        UnsupportedMediaType,
        "zip",
    ),
    "422 bad spec": (
        {},
        lambda c, m: c.create_job(c.upload_model(m).id, {"target_sparsity": 2}),
        Unprocessable,
        "target_sparsity",
    ),
    "503 broker down": (
        {"broker_url": "redis://127.0.0.1:1/0"},
        _upload,
        ServiceUnavailable,
        "nothing was kept",
    ),
    "507 disk nearly full": ({"min_free_bytes": 2**62}, _upload, InsufficientStorage, "free disk"),
}


@pytest.mark.parametrize("case", list(REAL_CASES))
def test_problem_from_the_real_app_maps_to_its_exception(
    serve_app: ServeApp, fake_model: Path, case: str
) -> None:
    overrides, action, expected, fragment = REAL_CASES[case]
    status = int(case.split()[0])
    with serve_app(**overrides) as url, Client(url) as client, pytest.raises(SecateursClientError) as info:
        action(client, fake_model)
    exc = info.value
    assert type(exc) is expected, repr(exc)
    assert isinstance(exc, ApiError)
    assert exc.status == status == exc.body["status"]
    assert fragment in exc.detail
    assert exc.detail == exc.body["detail"] and exc.detail in str(exc)
    assert exc.title and exc.type.startswith(PROBLEMS)
    if status == 503:
        assert exc.retry_after is not None and exc.retry_after > 0
    if status == 422:
        assert any("target_sparsity" in str(e) for e in exc.errors)


MOCK_CASES: list[tuple[int, dict[str, str], str, type[ApiError]]] = [
    (403, {}, "application/problem+json", Forbidden),
    (429, {"Retry-After": "17"}, "application/problem+json", TooManyRequests),
    (500, {}, "application/problem+json", ApiError),
    (502, {}, "text/html", ApiError),
]


@pytest.mark.parametrize(("status", "headers", "content_type", "expected"), MOCK_CASES)
def test_statuses_the_app_does_not_produce_yet_still_map(
    status: int, headers: dict[str, str], content_type: str, expected: type[ApiError]
) -> None:
    """Proxies and future server versions: a non-JSON body still gives the right class and a readable detail."""
    if content_type == "text/html":
        content = b"<html><body>Bad gateway from the proxy</body></html>"
    else:
        content = json.dumps(
            {"type": PROBLEMS + "x", "title": "T", "status": status, "detail": "why"}
        ).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": content_type, **headers}, content=content)

    with mock_client(handler) as client, pytest.raises(ApiError) as info:
        client.get_job("job_1")
    assert type(info.value) is expected
    assert info.value.status == status
    assert ("Bad gateway" in info.value.detail) if status == 502 else (info.value.detail == "why")
    if status == 429:
        assert info.value.retry_after == 17


def test_no_server_is_connection_failed() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, timeout=5) as client, pytest.raises(ConnectionFailed) as info:
        client.list_jobs()
    assert url in str(info.value) and "ConnectError" in str(info.value)


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("120") == 120
    when = email.utils.formatdate(2_000_000_000, usegmt=True)
    assert parse_retry_after(when, now=2_000_000_000 - 30) == pytest.approx(30)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- keys: Bearer header --------------------------------------------------------------------------------------


def test_api_key_is_sent_as_bearer_and_a_revoked_one_is_unauthorized(
    serve_app: ServeApp, data_dir: Path
) -> None:
    from app.auth import create_key, revoke_key

    settings = Settings(data_dir=data_dir, min_free_bytes=0)
    _, good = create_key(settings, "acme")
    bad_id, bad = create_key(settings, "acme")
    assert revoke_key(settings, bad_id)
    with serve_app() as url:
        with Client(url, api_key=good) as client:
            assert client.list_models() == []
        with Client(url) as client, pytest.raises(Unauthorized):
            client.list_models()  # a key exists, so keys are required now
        with Client(url, api_key=bad) as client, pytest.raises(Unauthorized) as info:
            client.list_models()
    assert "revoked" in info.value.detail


# --- resources against the real app ----------------------------------------------------------------------------


def test_models_upload_get_list_page_and_delete(
    api_url: str, fake_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "PAGE_SIZE", 2)  # force several pages through next_cursor
    with Client(api_url) as client:
        uploaded = [client.upload_model(fake_model, name=f"m{i}") for i in range(5)]
        assert all(m.status == "validating" and m.format == "saved_model" for m in uploaded)
        assert uploaded[0].sha256 == hashlib.sha256(fake_model.read_bytes()).hexdigest()
        assert uploaded[0].size_bytes == fake_model.stat().st_size
        assert client.get_model(uploaded[2].id) == uploaded[2]
        assert [m.id for m in client.list_models()] == [m.id for m in reversed(uploaded)]
        assert [m.name for m in client.list_models(limit=3)] == ["m4", "m3", "m2"]
        client.delete_model(uploaded[0].id)
        with pytest.raises(NotFound):
            client.get_model(uploaded[0].id)
        assert len(client.list_models()) == 4


def test_datasets_upload_get_list_and_delete(api_url: str, tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(12, 64)).astype(np.float32), y=rng.integers(0, 10, 12))
    with Client(api_url) as client:
        dataset = client.upload_dataset(path, name="digits")
        assert dataset.name == "digits" and dataset.n_samples == 12
        assert dataset.arrays["x"] == {"shape": [12, 64], "dtype": "float32"}
        assert client.get_dataset(dataset.id) == dataset
        assert [d.id for d in client.list_datasets()] == [dataset.id]
        client.delete_dataset(dataset.id)
        assert client.list_datasets() == []


def test_jobs_list_filters_and_pages(api_url: str, fake_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "PAGE_SIZE", 2)
    with Client(api_url) as client:
        first, second = client.upload_model(fake_model), client.upload_model(fake_model)
        jobs = [client.create_job(first.id, {"target_sparsity": 0.1 * (i + 1)}) for i in range(3)]
        other = client.create_job(second.id, {"target_sparsity": 0.5})
        assert all(j.status == "queued" for j in [*jobs, other])
        assert [j.id for j in client.list_jobs(model_id=first.id)] == [j.id for j in reversed(jobs)]
        client.cancel_job(jobs[1].id)
        assert [j.id for j in client.list_jobs(status="canceled")] == [jobs[1].id]
        assert len(client.list_jobs(limit=3)) == 3 and len(client.list_jobs()) == 4


def test_cancel_ends_a_queued_job_and_wait_raises_job_canceled(api_url: str, fake_model: Path) -> None:
    with Client(api_url) as client:
        job = client.create_job(client.upload_model(fake_model).id, {"target_sparsity": 0.5})
        assert job.status == "queued" and not job.done
        canceled = client.cancel_job(job.id)
        assert canceled.status == "canceled" and canceled.done
        with pytest.raises(JobCanceled) as info:
            job.wait(timeout=10, poll=0.05)
        assert info.value.code == "canceled" and "before it started" in info.value.message
        assert info.value.job.status == "canceled"
        with pytest.raises(Conflict):
            client.cancel_job(job.id)


def test_idempotency_key_replays_the_first_job(api_url: str, fake_model: Path) -> None:
    with Client(api_url) as client:
        model = client.upload_model(fake_model, idempotency_key="upload-1")
        assert client.upload_model(fake_model, idempotency_key="upload-1").id == model.id
        first = client.create_job(model.id, {"target_sparsity": 0.5}, idempotency_key="job-1")
        again = client.create_job(model.id, {"target_sparsity": 0.5}, idempotency_key="job-1")
        assert again.id == first.id and len(client.list_jobs()) == 1
        with pytest.raises(Unprocessable):
            client.create_job(model.id, {"target_sparsity": 0.6}, idempotency_key="job-1")


# --- what goes over the wire ------------------------------------------------------------------------------------


class RecordingTransport(httpx.BaseTransport):
    """Consumes request bodies chunk by chunk, as a socket would, and answers a created model."""

    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.headers: httpx.Headers | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.headers = request.headers
        assert isinstance(request.stream, httpx.SyncByteStream)
        for chunk in request.stream:
            self.chunks.append(len(chunk))
        body = {
            "id": "mdl_1",
            "name": "m",
            "format": "saved_model",
            "size_bytes": 1,
            "sha256": "",
            "status": "validating",
        }
        return httpx.Response(201, json=body)


def test_uploads_stream_from_disk_in_chunks_and_send_auth_and_idempotency(tmp_path: Path) -> None:
    big = tmp_path / "big.zip"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    transport = RecordingTransport()
    with Client("http://secateurs.test", api_key="sk_test", transport=transport) as client:
        client.upload_model(big, idempotency_key="k-1")
    assert transport.headers is not None
    assert transport.headers["authorization"] == "Bearer sk_test"
    assert transport.headers["idempotency-key"] == "k-1"
    assert int(transport.headers["content-length"]) == sum(transport.chunks) > 3 * 1024 * 1024
    assert max(transport.chunks) <= 1024 * 1024, "the file was read whole instead of streamed"
    assert len(transport.chunks) > 10


# --- waiting: backoff, Retry-After, outcomes --------------------------------------------------------------------


def test_wait_backs_off_to_a_cap_and_honours_retry_after() -> None:
    script: list[httpx.Response] = [httpx.Response(200, json=job_body()) for _ in range(5)]
    script.append(httpx.Response(200, json=job_body(), headers={"Retry-After": "7"}))
    script.append(
        httpx.Response(
            503,
            headers={"Retry-After": "3", "content-type": "application/problem+json"},
            json={
                "type": PROBLEMS + "service-unavailable",
                "title": "Service unavailable",
                "status": 503,
                "detail": "database down",
            },
        )
    )
    script.append(httpx.Response(200, json=job_body("succeeded", stage=None)))
    calls = iter(script)
    clock = FakeClock()
    seen: list[Job] = []
    with mock_client(lambda request: next(calls), clock=clock) as client:
        job = client.wait_job("job_1", timeout=None, poll=1.0, max_poll=4.0, on_progress=seen.append)
    assert job.status == "succeeded" and job.progress == 1.0
    assert clock.sleeps == [1.0, 1.5, 2.25, 3.375, 4.0, 7.0, 3.0]
    assert [j.status for j in seen] == ["running"] * 6 + ["succeeded"]  # the 503 is not a state


def test_job_wait_first_waits_the_retry_after_of_the_create() -> None:
    answers = {
        "POST": httpx.Response(202, json=job_body("queued"), headers={"Retry-After": "2"}),
        "GET": httpx.Response(200, json=job_body("succeeded", stage=None)),
    }
    clock = FakeClock()
    with mock_client(lambda request: answers[request.method], clock=clock) as client:
        job = client.create_job("mdl_1", {"target_sparsity": 0.5})
        assert job.retry_after == 2
        assert job.wait(timeout=60, poll=0.5).status == "succeeded"
        assert clock.sleeps == [2.0]
        assert client.wait_job(job.id, poll=0.5).status == "succeeded"  # by id: polls at once
        assert clock.sleeps == [2.0]


def test_wait_times_out_with_the_last_state() -> None:
    clock = FakeClock()
    handler = lambda request: httpx.Response(200, json=job_body())  # noqa: E731
    with mock_client(handler, clock=clock) as client, pytest.raises(WaitTimeout) as info:
        client.wait_job("job_1", timeout=5.0, poll=1.0)
    assert isinstance(info.value, TimeoutError)
    assert info.value.last.status == "running" and "job_1" in str(info.value)
    assert sum(clock.sleeps) == pytest.approx(5.0)  # the last sleep is cut to the deadline
    assert clock.sleeps == [1.0, 1.5, 2.25, 0.25]


def test_wait_raises_job_failed_with_the_error_and_job_wait_uses_its_client() -> None:
    error = {"code": "invalid_spec", "message": "no prunable variable matches include=['^x$']"}
    answers = iter([job_body("queued"), job_body(), job_body("failed", error=error)])
    with mock_client(lambda request: httpx.Response(200, json=next(answers)), clock=FakeClock()) as client:
        job = client.get_job("job_1")
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=60)
    assert info.value.code == "invalid_spec" and "no prunable" in info.value.message
    assert "invalid_spec" in str(info.value)


def test_wait_model_ready_raises_model_invalid() -> None:
    model = {
        "id": "mdl_1",
        "name": "m",
        "format": "saved_model",
        "size_bytes": 1,
        "sha256": "",
        "status": "validating",
    }
    answers = iter(
        [model, {**model, "status": "invalid", "error": {"code": "unsafe_model", "message": "ReadFile"}}]
    )
    handler = lambda request: httpx.Response(200, json=next(answers))  # noqa: E731
    with mock_client(handler, clock=FakeClock()) as client, pytest.raises(ModelInvalid) as info:
        client.wait_model_ready("mdl_1")
    assert info.value.code == "unsafe_model" and info.value.message == "ReadFile"


# --- downloads: verification and resume --------------------------------------------------------------------------

PAYLOAD = os.urandom(300_000)


class CutStream(httpx.SyncByteStream):
    """A body that stops after ``cut`` bytes with a transport error, like a reset connection."""

    def __init__(self, data: bytes, cut: int | None) -> None:
        self.data, self.cut = data, cut

    def __iter__(self) -> Iterator[bytes]:
        end = len(self.data) if self.cut is None else self.cut
        for i in range(0, end, 50_000):
            yield self.data[i : min(i + 50_000, end)]
        if self.cut is not None:
            raise httpx.ReadError("connection reset by peer")


def _digest_headers(data: bytes) -> dict[str, str]:
    digest = hashlib.sha256(data).digest()
    return {
        "ETag": f'"{digest.hex()}"',
        "Repr-Digest": f"sha-256=:{base64.b64encode(digest).decode()}:",
        "Content-Length": str(len(data)),
        "Content-Type": "application/zip",
    }


class ArtifactServer:
    """Serves PAYLOAD; the first ``cuts`` answers are cut; honours Range unless told to ignore it."""

    def __init__(
        self, cuts: list[int], honour_range: bool = True, headers: dict[str, str] | None = None
    ) -> None:
        self.cuts = list(cuts)
        self.honour_range = honour_range
        self.headers = headers or _digest_headers(PAYLOAD)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        cut = self.cuts.pop(0) if self.cuts else None
        start = 0
        wanted = request.headers.get("range")
        if wanted and self.honour_range and request.headers.get("if-range") == self.headers.get("ETag"):
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            rest = PAYLOAD[start:]
            headers = {
                **self.headers,
                "Content-Length": str(len(rest)),
                "Content-Range": f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}",
            }
            return httpx.Response(206, headers=headers, stream=CutStream(rest, cut))
        return httpx.Response(200, headers=self.headers, stream=CutStream(PAYLOAD, cut))


def test_interrupted_download_resumes_with_range_and_verifies(tmp_path: Path) -> None:
    server = ArtifactServer(cuts=[100_000, 50_000])
    with mock_client(server) as client:
        path = client.download_artifact("job_1", tmp_path / "pruned.zip")
    assert path.read_bytes() == PAYLOAD
    assert [r.headers.get("range") for r in server.requests] == [None, "bytes=100000-", "bytes=150000-"]
    assert server.requests[1].headers["if-range"] == server.headers["ETag"]
    assert server.requests[0].headers["accept-encoding"] == "identity"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.zip"]  # no .part left


def test_a_server_that_ignores_range_restarts_from_zero(tmp_path: Path) -> None:
    server = ArtifactServer(cuts=[120_000], honour_range=False)
    with mock_client(server) as client:
        path = client.download_artifact("job_1", tmp_path)
    assert path == tmp_path / "job_1-pruned.zip" and path.read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_resumes_are_bounded_and_leave_nothing(tmp_path: Path) -> None:
    server = ArtifactServer(cuts=[10_000] * 10)
    with mock_client(server) as client, pytest.raises(ConnectionFailed) as info:
        client.download_artifact("job_1", tmp_path / "pruned.zip", max_resumes=2)
    assert len(server.requests) == 3 and "3 attempts" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("wrong", ["ETag", "Repr-Digest", "Content-Length"])
def test_a_corrupt_download_is_refused_and_leaves_nothing(tmp_path: Path, wrong: str) -> None:
    headers = _digest_headers(PAYLOAD)
    other = _digest_headers(PAYLOAD[:-1] + b"\0")
    headers[wrong] = other[wrong] if wrong != "Content-Length" else str(len(PAYLOAD) - 10)
    dest = tmp_path / "pruned.zip"
    dest.write_bytes(b"previous download")  # a corrupt download must not replace a good file either
    with mock_client(ArtifactServer(cuts=[], headers=headers)) as client, pytest.raises(DigestMismatch):
        client.download_artifact("job_1", dest)
    assert dest.read_bytes() == b"previous download"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.zip"]


def test_download_of_an_unfinished_job_is_conflict(api_url: str, fake_model: Path, tmp_path: Path) -> None:
    with Client(api_url) as client:
        job = client.create_job(client.upload_model(fake_model).id, {"target_sparsity": 0.5})
        with pytest.raises(Conflict):
            client.download_artifact(job.id, tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "x.zip.part").exists()


# --- end to end on the embedded default (real worker, TensorFlow) ----------------------------------------------


class CutFirstArtifact(httpx.BaseTransport):
    """The real network transport, except the first artifact body is cut after ``cut`` bytes."""

    def __init__(self, cut: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.cut = cut
        self.seen: list[tuple[dict[str, str], int, dict[str, str]]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if "/artifacts/" not in request.url.path:  # download_artifact: /v1/jobs/{id}/artifacts/{name}
            return response
        self.seen.append((dict(request.headers), response.status_code, dict(response.headers)))
        if len(self.seen) > 1:
            return response
        inner, cut = response.stream, self.cut

        class Cut(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                sent = 0
                assert isinstance(inner, httpx.SyncByteStream)
                for chunk in inner:
                    take = chunk[: cut - sent]
                    sent += len(take)
                    if take:
                        yield take
                    if sent >= cut:
                        break
                inner.close()
                raise httpx.ReadError("cut by the test")

        return httpx.Response(response.status_code, headers=response.headers, stream=Cut())

    def close(self) -> None:
        self.inner.close()


@pytest.mark.e2e
@pytest.mark.tf
def test_end_to_end_on_the_embedded_default(embedded: Embedded, tiny: Tiny, tmp_path: Path) -> None:
    seen: list[Job] = []
    with Client(embedded.url) as client:
        model = client.upload_model(tiny.model_zip, name="tiny-mlp")
        assert model.status == "validating"
        train, test = client.upload_dataset(tiny.train), client.upload_dataset(tiny.test)
        assert test.arrays["x.pixels"]["shape"] == [200, 64] and train.n_samples == 400
        ready = client.wait_model_ready(model.id, timeout=120, poll=0.2)
        assert ready.status == "ready" and {"serving_default", "embed"} <= set(ready.signatures or {})
        spec = {"target_sparsity": 0.5, "fine_tune": {"epochs": 1}}
        job = client.create_job(model.id, spec, train_dataset_id=train.id, eval_dataset_id=test.id)
        assert job.status == "queued"
        # by id, so the first poll comes at once (job.wait would first honour the 202's Retry-After)
        done = client.wait_job(job.id, timeout=180, poll=0.2, on_progress=seen.append)
        assert done.status == "succeeded" and done.progress == 1.0 and done.finished_at is not None
        assert seen[-1].status == "succeeded" and any(j.stage for j in seen)
        metrics = client.metrics(job.id)
        assert metrics["job_id"] == job.id
        assert metrics["pruned"]["sparsity"] == pytest.approx(0.5, abs=0.02)
        assert metrics["pruned"]["metrics"]["accuracy"] > 0.5
        assert job.id in [j.id for j in client.list_jobs(model_id=model.id)]

    transport = CutFirstArtifact(cut=4096)
    with Client(embedded.url, transport=transport) as client:
        path = client.download_artifact(job.id, tmp_path)
    assert path == tmp_path / f"{job.id}-pruned.zip"
    (first_request, first_status, first_headers), (resumed, resumed_status, _) = transport.seen
    assert first_status == 200 and "range" not in first_request
    assert resumed["range"] == "bytes=4096-" and resumed["if-range"] == first_headers["etag"]
    assert resumed_status == 206, "the real server must answer the resume with a partial response"
    digest = hashlib.sha256(path.read_bytes()).digest()
    assert first_headers["etag"].strip('"') == digest.hex()
    assert first_headers["repr-digest"] == f"sha-256=:{base64.b64encode(digest).decode()}:"
    assert int(first_headers["content-length"]) == path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None and "saved_model.pb" in zf.namelist()


@pytest.mark.e2e
@pytest.mark.tf
def test_an_impossible_job_raises_job_failed(embedded: Embedded, tiny: Tiny) -> None:
    """The API cannot know variable names; the worker finds none matches and fails the job with a reason."""
    with Client(embedded.url) as client:
        model = client.upload_model(tiny.model_zip)
        job = client.create_job(model.id, {"target_sparsity": 0.5, "include": ["^no_such_variable$"]})
        with pytest.raises(JobFailed) as info:
            job.wait(timeout=120, poll=0.2)
    assert info.value.job.status == "failed"
    assert info.value.code == "invalid_spec"
    assert "no prunable variable matches" in info.value.message
