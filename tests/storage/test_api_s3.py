"""The API on a real S3 store (SeaweedFS): uploads land in the bucket, not on the API's disk; downloads come
from the bucket with the same headers as from the data directory, or as a presigned redirect the client follows
and verifies; outages are 503 and misconfiguration refuses to start."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.auth import create_key
from app.client.download import download_to
from app.client.errors import DigestMismatch
from app.config import Settings
from app.db import jobs
from app.db.engine import session_scope
from app.main import check_store, create_app
from app.storage import Storage
from app.storage.s3 import S3BlobStore
from tests.app.helpers import (
    app_of,
    assert_problem,
    create_job,
    files_under,
    mark_model,
    saved_model_zip,
    sha256,
    upload_dataset,
    upload_model,
)
from tests.support.seaweed import Seaweed, free_ports

ARTIFACT = b"PK\x03\x04" + bytes(range(256)) * 4096  # 1 MiB: several read buffers of the response


def settings_for(env: dict[str, str], data_dir: Path, **extra: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        min_free_bytes=0,
        storage_url=env["SECATEURS_STORAGE_URL"],
        s3_endpoint_url=env["SECATEURS_S3_ENDPOINT_URL"],
        **extra,
    )


@pytest.fixture
def s3_client(s3_env: dict[str, str], tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(s3_env, tmp_path / "api"))) as client:
        yield client


def objects(seaweed: Seaweed, env: dict[str, str]) -> dict[str, str]:
    """{key below the test's prefix: sha256} of what the bucket holds."""
    prefix = env["SECATEURS_STORAGE_URL"].split("/", 3)[3] + "/"
    s3 = seaweed.client()
    out = {}
    for item in s3.list_objects_v2(Bucket=seaweed.bucket, Prefix=prefix).get("Contents", []):
        body = s3.get_object(Bucket=seaweed.bucket, Key=item["Key"])["Body"].read()
        out[item["Key"][len(prefix) :]] = hashlib.sha256(body).hexdigest()
    return out


def succeed_on_s3(app: FastAPI, job_id: str, artifact: bytes, metrics: dict[str, Any]) -> None:
    """What a worker on another host does at the end of a good run: files into the store, then the record."""
    storage = app.state.storage
    scratch = Path(storage.tmp_dir) / f"out-{job_id}"
    scratch.mkdir()
    (scratch / "pruned.zip").write_bytes(artifact)
    (scratch / "metrics.json").write_text(json.dumps(metrics))
    for name in ("pruned.zip", "metrics.json"):
        storage.publish(storage.job_key(job_id, name), scratch / name)
    with session_scope(app.state.session_factory) as session:
        claim = jobs.claim_job(session, job_id, lease_seconds=60, max_attempts=3)
        assert claim.claimed
    with session_scope(app.state.session_factory) as session:
        assert jobs.finish_job(
            session, job_id, "succeeded", artifact_sha256=sha256(artifact), artifact_bytes=len(artifact)
        )


def test_uploads_go_to_the_bucket_and_leave_nothing_on_the_api_disk(
    s3_client: TestClient, s3_env: dict[str, str], seaweed: Seaweed, tmp_path: Path
) -> None:
    data = saved_model_zip()
    model = upload_model(s3_client, data)
    dataset = upload_dataset(s3_client)
    stored = objects(seaweed, s3_env)
    assert stored[f"models/{model['id']}/upload.zip"] == sha256(data) == model["sha256"]
    assert stored[f"datasets/{dataset['id']}.npz"] == dataset["sha256"]
    assert files_under(tmp_path / "api" / "models") == []
    assert files_under(tmp_path / "api" / "datasets") == []
    assert [p for p in files_under(tmp_path / "api" / "tmp")] == []
    # delete removes the objects
    assert s3_client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert s3_client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert objects(seaweed, s3_env) == {}


def test_bad_archives_are_refused_before_reaching_the_bucket(
    s3_client: TestClient, s3_env: dict[str, str], seaweed: Seaweed
) -> None:
    refused = s3_client.post("/v1/models", files={"file": ("model.zip", b"PK\x03\x04 not really a zip")})
    assert refused.status_code in (415, 422)
    assert objects(seaweed, s3_env) == {}


def test_downloads_stream_from_the_bucket_with_digests_and_ranges(s3_client: TestClient) -> None:
    app = app_of(s3_client)
    model = upload_model(s3_client)
    mark_model(app, model["id"], "ready")
    job = create_job(s3_client, model["id"])
    metrics = {"job_id": job["id"], "model_id": model["id"], "notes": []}
    succeed_on_s3(app, job["id"], ARTIFACT, metrics)

    url = f"/v1/jobs/{job['id']}/artifact"
    whole = s3_client.get(url)
    assert whole.status_code == 200 and whole.content == ARTIFACT
    etag = f'"{sha256(ARTIFACT)}"'
    assert whole.headers["etag"] == etag
    assert whole.headers["content-length"] == str(len(ARTIFACT))
    assert whole.headers["repr-digest"].startswith("sha-256=:")
    assert whole.headers["accept-ranges"] == "bytes"

    part = s3_client.get(url, headers={"Range": "bytes=300000-300099"})
    assert part.status_code == 206 and part.content == ARTIFACT[300000:300100]
    assert part.headers["content-range"] == f"bytes 300000-300099/{len(ARTIFACT)}"
    assert part.headers["repr-digest"] == whole.headers["repr-digest"]
    stale = s3_client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"0000"'})
    assert stale.status_code == 200 and stale.content == ARTIFACT
    assert s3_client.get(url, headers={"If-None-Match": etag}).status_code == 304
    unsatisfiable = assert_problem(s3_client.get(url, headers={"Range": f"bytes={len(ARTIFACT)}-"}), 416)
    assert str(len(ARTIFACT)) in unsatisfiable["detail"]
    assert s3_client.get(f"/v1/jobs/{job['id']}/metrics").json() == metrics


def test_presigned_downloads_redirect_and_the_client_verifies(
    s3_env: dict[str, str], seaweed: Seaweed, tmp_path: Path
) -> None:
    settings = settings_for(s3_env, tmp_path / "api", presigned_downloads=True, presign_expiry_s=60)
    with TestClient(create_app(settings)) as client:
        app = app_of(client)
        model = upload_model(client)
        mark_model(app, model["id"], "ready")
        job = create_job(client, model["id"])
        succeed_on_s3(app, job["id"], ARTIFACT, {"job_id": job["id"], "notes": []})
        url = f"/v1/jobs/{job['id']}/artifact"
        redirect = client.get(url, follow_redirects=False)
        assert redirect.status_code == 302
        assert redirect.headers["location"].startswith(seaweed.endpoint)
        assert "X-Amz-Expires=60" in redirect.headers["location"]
        assert redirect.headers["etag"] == f'"{sha256(ARTIFACT)}"'
        assert redirect.headers["repr-digest"].startswith("sha-256=:")

        # the client, with a real API key (which must not travel to the store: S3 would refuse a request that
        # carries both a presigned query and an Authorization header): API requests to the app, the redirect
        # to the real S3 server, the digest checked
        _, key = create_key(settings, "default")
        mounts = {"http://testserver": client._transport, "all://": httpx.HTTPTransport()}  # type: ignore[attr-defined]
        with httpx.Client(
            base_url="http://testserver", mounts=mounts, headers={"Authorization": f"Bearer {key}"}
        ) as http:
            dest = download_to(http, url, tmp_path / "artifact.zip")
            assert dest.read_bytes() == ARTIFACT
            # someone replaces the object in the store: the bytes no longer match the recorded digest
            bucket_key = s3_env["SECATEURS_STORAGE_URL"].split("/", 3)[3] + f"/jobs/{job['id']}/pruned.zip"
            seaweed.client().put_object(Bucket=seaweed.bucket, Key=bucket_key, Body=b"PK tampered")
            with pytest.raises(DigestMismatch):
                download_to(http, url, tmp_path / "tampered.zip")
            assert not (tmp_path / "tampered.zip").exists()


def test_store_outage_is_503_with_retry_after_and_readyz_names_it(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    down = {**s3_env, "SECATEURS_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with TestClient(create_app(settings_for(down, tmp_path / "api"))) as client:  # starts: not refused
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "store" in ready.json()["down"]
        refused = client.post("/v1/models", files={"file": ("model.zip", saved_model_zip())})
        body = assert_problem(refused, 503)
        assert refused.headers["retry-after"]
        assert "SECATEURS_S3_ENDPOINT_URL" in body["detail"]
        assert client.get("/v1/models").json()["items"] == []  # nothing recorded
        assert files_under(tmp_path / "api" / "tmp") == []


def test_wrong_credentials_or_missing_bucket_refuse_to_start(
    s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_bucket = {**s3_env, "SECATEURS_STORAGE_URL": "s3://no-such-bucket/x"}
    with pytest.raises(SystemExit, match="bucket 'no-such-bucket' of SECATEURS_STORAGE_URL"):
        check_store(Storage.from_settings(settings_for(no_bucket, tmp_path / "a")))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(SystemExit, match="AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"):
        check_store(Storage.from_settings(settings_for(s3_env, tmp_path / "b")))


def test_secateurs_serve_exits_naming_the_setting(s3_env: dict[str, str], tmp_path: Path) -> None:
    """The real start-up path (uvicorn's lifespan): the process ends, and its log says what to fix."""
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(s3_env)
    env.update({"SECATEURS_DATA_DIR": str(tmp_path / "d"), "AWS_SECRET_ACCESS_KEY": "wrong-secret"})
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--no-worker", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "AWS_SECRET_ACCESS_KEY" in done.stderr + done.stdout


def test_secateurs_worker_refuses_a_missing_bucket(s3_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(s3_env)
    env.update({"SECATEURS_DATA_DIR": str(tmp_path / "w"), "SECATEURS_STORAGE_URL": "s3://no-such-bucket/x"})
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "refusing to start" in done.stderr and "SECATEURS_STORAGE_URL" in done.stderr


def test_settings_refuse_presigned_downloads_without_s3(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SECATEURS_PRESIGNED_DOWNLOADS"):
        Settings(data_dir=tmp_path, presigned_downloads=True)
    with pytest.raises(ValueError, match="SECATEURS_STORAGE_URL"):
        Settings(data_dir=tmp_path, storage_url="ftp://x")
    assert isinstance(S3BlobStore("s3://b/p"), S3BlobStore)
