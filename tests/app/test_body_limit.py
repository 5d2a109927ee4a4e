"""JSON bodies are capped (FastAPI would read them whole into memory); uploads are not affected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


def _client(data_dir: Path) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data_dir, min_free_bytes=0, max_json_bytes=4096)))


def test_declared_oversized_json_is_413_problem(data_dir: Path) -> None:
    with _client(data_dir) as client:
        body = b'{"model_id": "' + b"x" * 8000 + b'"}'
        response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert "4096 bytes" in response.json()["detail"]


def test_chunked_oversized_json_is_413_and_small_chunked_json_still_works(data_dir: Path) -> None:
    def big() -> Iterator[bytes]:
        yield b'{"model_id": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    def small() -> Iterator[bytes]:
        yield b'{"model_id": "mdl_missing", '
        yield b'"spec": {"target_sparsity": 0.5}}'

    with _client(data_dir) as client:
        refused = client.post("/v1/jobs", content=big(), headers={"content-type": "application/json"})
        passed = client.post("/v1/jobs", content=small(), headers={"content-type": "application/json"})
    assert refused.status_code == 413 and refused.json()["status"] == 413
    assert passed.status_code == 404  # reached the route: the body was replayed intact


def test_uploads_are_not_counted(data_dir: Path) -> None:
    with _client(data_dir) as client:
        payload = {"file": ("d.npz", b"not an npz" * 1000)}  # 10 KB > 4 KB cap, refused for its content only
        response = client.post("/v1/datasets", files=payload)
    assert response.status_code == 415, response.text
