"""The streamed multipart receiver, through a real FastAPI app or a raw ASGI request."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import tracemalloc
from collections.abc import Awaitable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.api import multipart as multipart_module
from app.api.multipart import Upload, receive_upload
from app.errors import InsufficientStorage, PayloadTooLarge, SecateursError, UploadError
from app.storage import Storage

BOUNDARY = "----secateurs-test-boundary"


def make_app(tmp_dir: Path, max_bytes: int = 10 * 2**20) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(SecateursError)
    async def _problem(_: Request, exc: SecateursError) -> JSONResponse:
        return JSONResponse({"type": exc.type, "detail": exc.detail, **exc.problem_extra()}, exc.status)

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, Any]:
        up = await receive_upload(request, tmp_dir, max_bytes=max_bytes)
        return {
            "filename": up.filename,
            "size": up.size,
            "sha256": up.sha256,
            "fields": up.fields,
            "path": str(up.path),
        }

    return app


def post(app: FastAPI, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/upload", **kwargs)

    return asyncio.run(go())


def multipart(parts: list[tuple[str, str | None, bytes]], *, close: bool = True) -> bytes:
    """Hand-built body, so tests can send what well-behaved clients never would."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def raw_request(headers: dict[str, str], chunks: Iterable[bytes], *, disconnect: bool = False) -> Request:
    """A Starlette request fed chunk by chunk, as uvicorn would; optionally the client vanishes at the end."""
    it: Iterator[bytes] = iter(chunks)
    done = False

    async def receive() -> dict[str, Any]:
        nonlocal done
        if done:
            return {"type": "http.disconnect"}
        try:
            return {"type": "http.request", "body": next(it), "more_body": True}
        except StopIteration:
            done = True
            if disconnect:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


FORM_CT = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def run(coro: Awaitable[Upload]) -> Upload:
    async def go() -> Upload:
        return await coro

    return asyncio.run(go())


# ------------------------------------------------------------------------------------------- happy path


def test_upload_is_streamed_to_a_temp_file_and_hashed(tmp_path: Path) -> None:
    content = os.urandom(3 * 2**20 + 123)  # spans several flush batches
    resp = post(make_app(tmp_path), files={"file": ("model.zip", content)}, data={"name": "my model"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["size"] == len(content)
    assert body["fields"] == {"name": "my model"}
    assert body["filename"] == "model.zip"
    path = Path(body["path"])
    assert path.parent == tmp_path and path.read_bytes() == content


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        ("../../etc/passwd.zip", "passwd.zip"),
        ("C:\\Users\\me\\m.keras", "m.keras"),
        ("..", ""),
        ("a\tb.npz", "ab.npz"),
    ],
)
def test_filename_is_reduced_to_a_basename(tmp_path: Path, sent: str, shown: str) -> None:
    body = multipart([("file", sent, b"data")])
    up = run(receive_upload(raw_request(FORM_CT, [body]), tmp_path, max_bytes=100))
    assert up.filename == shown
    assert up.path.parent == tmp_path


def test_file_without_filename_and_no_text_fields(tmp_path: Path) -> None:
    body = multipart([("file", None, b"plain field used as a file")])
    up = run(receive_upload(raw_request(FORM_CT, [body]), tmp_path, max_bytes=100, text_fields=frozenset()))
    assert (up.filename, up.size, up.fields) == ("", 26, {})


def test_tiny_chunks_are_parsed_the_same(tmp_path: Path) -> None:
    content = bytes(range(256)) * 20 + b"\r\n--almost-a-boundary\r\n"
    body = multipart([("name", None, "modèle".encode()), ("file", "x.bin", content)])
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
    up = run(receive_upload(raw_request(FORM_CT, chunks), tmp_path, max_bytes=10_000))
    assert up.path.read_bytes() == content
    assert up.fields == {"name": "modèle"}


def test_commit_moves_atomically_into_a_new_directory(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    body = multipart([("file", "m.zip", b"abc")])
    up = run(receive_upload(raw_request(FORM_CT, [body]), storage.tmp_dir, max_bytes=10))
    up.commit(storage, storage.model_key("mdl_1", "upload.zip"))
    dest = storage.model_dir("mdl_1") / "upload.zip"
    assert dest.read_bytes() == b"abc"
    assert list(storage.tmp_dir.iterdir()) == []
    up.discard()  # cleanup code may run after a commit: it must not delete the committed file
    assert dest.read_bytes() == b"abc"


def test_discard_removes_an_uncommitted_upload(tmp_path: Path) -> None:
    body = multipart([("file", "m", b"abc")])
    up = run(receive_upload(raw_request(FORM_CT, [body]), tmp_path, max_bytes=10))
    up.discard()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ refusals


def test_missing_file_field(tmp_path: Path) -> None:
    resp = post(make_app(tmp_path), content=multipart([("name", None, b"no file here")]), headers=FORM_CT)
    assert resp.status_code == 400
    assert "no 'file' field" in resp.json()["detail"]
    assert list(tmp_path.iterdir()) == []


def test_empty_body(tmp_path: Path) -> None:
    with pytest.raises(UploadError, match="request body is empty"):
        run(receive_upload(raw_request(FORM_CT, []), tmp_path, max_bytes=10))


def test_empty_file(tmp_path: Path) -> None:
    resp = post(make_app(tmp_path), files={"file": ("m.zip", b"")})
    assert resp.status_code == 400
    assert "'file' field is empty" in resp.json()["detail"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "multipart/form-data", "text/plain; boundary=b"],
)
def test_wrong_content_type(tmp_path: Path, content_type: str) -> None:
    resp = post(make_app(tmp_path), content=b'{"file": "x"}', headers={"content-type": content_type})
    assert resp.status_code == 415
    assert resp.json()["type"].endswith("/unsupported-media-type")


def test_too_large_is_413_and_leaves_nothing(tmp_path: Path) -> None:
    resp = post(make_app(tmp_path, max_bytes=100_000), files={"file": ("m.zip", os.urandom(300_000))})
    assert resp.status_code == 413
    assert resp.json()["limit_bytes"] == 100_000
    assert "MB limit" in resp.json()["detail"]
    assert list(tmp_path.iterdir()) == []


def test_too_large_stops_reading_at_once(tmp_path: Path) -> None:
    """No Content-Length (chunked): the receiver stops pulling chunks as soon as the file passes the limit."""
    pulled = 0

    def chunks() -> Iterator[bytes]:
        nonlocal pulled
        yield multipart([("file", "m.zip", b"")], close=False)[:-2]  # headers of the file part, no data yet
        for _ in range(1000):
            pulled += 1
            yield b"\0" * 65536

    with pytest.raises(PayloadTooLarge):
        run(receive_upload(raw_request(FORM_CT, chunks()), tmp_path, max_bytes=1_000_000))
    assert pulled == 16  # 16 * 64 KiB is the first chunk over 1,000,000 bytes
    assert list(tmp_path.iterdir()) == []


def test_content_length_over_the_limit_is_refused_before_reading(tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        raise AssertionError("the body must not be read")
        yield b""  # pragma: no cover

    headers = {**FORM_CT, "content-length": str(50 * 2**30)}
    with pytest.raises(PayloadTooLarge, match="MB limit"):
        run(receive_upload(raw_request(headers, chunks()), tmp_path, max_bytes=2**30))


def test_unknown_field(tmp_path: Path) -> None:
    resp = post(make_app(tmp_path), files={"file": ("m.zip", b"data")}, data={"colour": "red"})
    assert resp.status_code == 400
    assert "unknown form field 'colour'" in resp.json()["detail"]
    assert list(tmp_path.iterdir()) == []


def test_two_files(tmp_path: Path) -> None:
    files = [("file", ("a.zip", b"aaa")), ("file", ("b.zip", b"bbb"))]
    resp = post(make_app(tmp_path), files=files)
    assert resp.status_code == 400
    assert "more than one 'file' part" in resp.json()["detail"]
    assert list(tmp_path.iterdir()) == []


def test_file_in_another_field(tmp_path: Path) -> None:
    resp = post(make_app(tmp_path), files={"file": ("a.zip", b"a"), "name": ("b.zip", b"b")})
    assert resp.status_code == 400
    assert "unexpected file in form field 'name'" in resp.json()["detail"]
    assert list(tmp_path.iterdir()) == []


def test_repeated_and_oversized_text_fields(tmp_path: Path) -> None:
    twice = multipart([("name", None, b"a"), ("name", None, b"b"), ("file", "m", b"x")])
    with pytest.raises(UploadError, match="more than once"):
        run(receive_upload(raw_request(FORM_CT, [twice]), tmp_path, max_bytes=10))
    long = multipart([("file", "m", b"x"), ("name", None, b"n" * 5000)])
    with pytest.raises(UploadError, match="longer than 4096 bytes"):
        run(receive_upload(raw_request(FORM_CT, [long]), tmp_path, max_bytes=10))
    bad_utf8 = multipart([("file", "m", b"x"), ("name", None, b"\xff\xfe")])
    with pytest.raises(UploadError, match="not valid UTF-8"):
        run(receive_upload(raw_request(FORM_CT, [bad_utf8]), tmp_path, max_bytes=10))
    assert list(tmp_path.iterdir()) == []


def test_body_cut_before_closing_boundary(tmp_path: Path) -> None:
    body = multipart([("file", "m.zip", b"x" * 5000)], close=False)
    with pytest.raises(UploadError, match="closing boundary"):
        run(receive_upload(raw_request(FORM_CT, [body]), tmp_path, max_bytes=10_000))
    assert list(tmp_path.iterdir()) == []


def test_client_disconnect(tmp_path: Path) -> None:
    body = multipart([("file", "m.zip", b"x" * 3 * 2**20)])
    with pytest.raises(UploadError, match="disconnected"):
        run(receive_upload(raw_request(FORM_CT, [body[: 2**21]], disconnect=True), tmp_path, max_bytes=2**23))
    assert list(tmp_path.iterdir()) == []


def test_malformed_body(tmp_path: Path) -> None:
    body = f"--{BOUNDARY}\r\nno colon in this header line\r\n\r\ndata\r\n--{BOUNDARY}--\r\n".encode()
    with pytest.raises(UploadError, match="malformed"):
        run(receive_upload(raw_request(FORM_CT, [body]), tmp_path, max_bytes=100))
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC cannot be provoked on this machine's disk, so the writer fails the way a full disk would."""
    real_flush = multipart_module._FormReceiver.flush

    def flush_then_full(self: multipart_module._FormReceiver) -> None:
        real_flush(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(multipart_module._FormReceiver, "flush", flush_then_full)
    body = multipart([("file", "m.zip", b"x" * 3 * 2**20)])
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    with pytest.raises(InsufficientStorage):
        run(receive_upload(raw_request(FORM_CT, chunks), tmp_path, max_bytes=2**23))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------- memory


def test_streaming_300_mb_stays_small_in_memory(tmp_path: Path) -> None:
    """Python-side allocations stay bounded by the flush batch, whatever the upload size."""
    size = 300 * 2**20
    block = os.urandom(65536)
    head = multipart([("file", "big.bin", b"")], close=False)[:-2]
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(size // len(block)):
            yield bytes(bytearray(block))  # a fresh object per chunk, as a server delivers them
        yield tail

    tracemalloc.start()
    try:
        up = run(receive_upload(raw_request(FORM_CT, chunks()), tmp_path, max_bytes=size))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (up.size, up.sha256) == (size, expected.hexdigest())
    assert up.path.stat().st_size == size
    assert peak < 20 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"
