"""Builders for upload bodies and checks shared by the API tests (no TensorFlow: structure only)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import model_status
from app.db.engine import session_scope

PROBLEM_JSON = "application/problem+json"
VALIDATE_MODEL = "secateurs.validate_model"
RUN_JOB = "secateurs.run_job"

SAVED_MODEL: dict[str, bytes] = {
    "saved_model.pb": b"\x08\x01fake-saved-model-proto" * 8,
    "fingerprint.pb": b"fp",
    "variables/variables.index": b"index",
    "variables/variables.data-00000-of-00001": bytes(range(256)) * 8,
}

# What a worker would record for a one-input, one-output classifier on 64 features.
SIGNATURES: dict[str, Any] = {
    "serving_default": {
        "inputs": {"features": {"shape": [None, 64], "dtype": "float32"}},
        "outputs": {"probs": {"shape": [None, 10], "dtype": "float32"}},
    }
}


def zip_bytes(entries: dict[str, bytes], *, dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in dirs:
            zf.writestr(d, b"")
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def targz_bytes(entries: dict[str, bytes], *, top: str = "", links: dict[str, str] | None = None) -> bytes:
    """A gzipped tar of ``entries``, optionally under one ``top`` folder, plus symlinks name -> target."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        if top:
            info = tarfile.TarInfo(top)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
        for name, data in entries.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            link = tarfile.TarInfo(name)
            link.type = tarfile.SYMTYPE
            link.linkname = target
            tf.addfile(link)
    return buf.getvalue()


def saved_model_zip(**extra: bytes) -> bytes:
    return zip_bytes({**SAVED_MODEL, **extra}, dirs=("variables/",))


def keras_bytes() -> bytes:
    return zip_bytes(
        {
            "config.json": json.dumps({"class_name": "Sequential", "config": {}}).encode(),
            "metadata.json": json.dumps({"keras_version": "3.0.0"}).encode(),
            "model.weights.h5": b"\x89HDF\r\n\x1a\n" + bytes(64),
        }
    )


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def dataset_arrays(n: int = 12, features: int = 64, *, labels: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(n, features)).astype(np.float32)}
    if labels:
        arrays["y"] = rng.integers(0, 10, size=n).astype(np.int64)
    return arrays


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def multipart(
    parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary-xyz"
) -> tuple[bytes, str]:
    """A hand-built multipart/form-data body: (field name, filename or None, data) per part."""
    out = io.BytesIO()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 body with the given status; returns it for further checks."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys(), body
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"].startswith("https://")
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"].strip()
    return body


@dataclass(frozen=True)
class Sent:
    """One task message the app put on the embedded (filesystem) broker."""

    task: str
    args: list[Any]
    queue: str


def sent_tasks(settings: Settings) -> list[Sent]:
    """Decode every message waiting in the embedded broker's queue folder."""
    folder = settings.broker_dir / "queue"
    out = []
    for path in sorted(folder.glob("*.msg")) if folder.is_dir() else []:
        envelope = json.loads(path.read_text())
        body = (
            base64.b64decode(envelope["body"])
            if envelope["properties"]["body_encoding"] == "base64"
            else None
        )
        args = json.loads(body)[0] if body is not None else []
        out.append(
            Sent(
                task=envelope["headers"]["task"],
                args=args,
                queue=envelope["properties"]["delivery_info"]["routing_key"],
            )
        )
    return out


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def upload_model(
    client: TestClient, data: bytes | None = None, filename: str = "model.zip", name: str | None = None
) -> dict[str, Any]:
    response = client.post(
        "/v1/models",
        files={"file": (filename, saved_model_zip() if data is None else data)},
        data={"name": name} if name is not None else None,
    )
    assert response.status_code == 201, response.text
    return response.json()


def upload_dataset(
    client: TestClient, arrays: dict[str, np.ndarray] | None = None, filename: str = "data.npz"
) -> dict[str, Any]:
    response = client.post(
        "/v1/datasets", files={"file": (filename, npz_bytes(**(arrays or dataset_arrays())))}
    )
    assert response.status_code == 201, response.text
    return response.json()


def mark_model(
    app: FastAPI,
    model_id: str,
    status: str,
    *,
    signatures: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
) -> None:
    """Record a worker's verdict on a model, as the validate task would."""
    with session_scope(app.state.session_factory) as session:
        assert model_status.set_model_result(
            session,
            model_id,
            status=status,  # type: ignore[arg-type]
            signatures=signatures,
            params=1234 if status == "ready" else None,
            error=error,
        )


def create_job(
    client: TestClient, model_id: str, spec: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    response = client.post(
        "/v1/jobs", json={"model_id": model_id, "spec": spec or {"target_sparsity": 0.5}, **extra}
    )
    assert response.status_code == 202, response.text
    return response.json()


def app_of(client: TestClient) -> FastAPI:
    app = client.app
    assert isinstance(app, FastAPI)
    return app
