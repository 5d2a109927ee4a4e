"""A real S3 server (SeaweedFS ``weed mini``) for the storage tests, started once per session on loopback.

It never skips: a missing or broken ``weed`` binary is an error, here and in CI (``.ci/run`` checks it first)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from app.storage.s3 import S3BlobStore
from tests.support.seaweed import Seaweed


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    server = Seaweed(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The credential variables in this process, and a fresh key prefix per test (so tests share a bucket)."""
    env = seaweed.env()
    env["SECATEURS_STORAGE_URL"] = f"s3://{seaweed.bucket}/t-{uuid.uuid4().hex[:12]}"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, env[name])
    return env


@pytest.fixture
def s3_store(s3_env: dict[str, str]) -> S3BlobStore:
    return S3BlobStore(s3_env["SECATEURS_STORAGE_URL"], endpoint_url=s3_env["SECATEURS_S3_ENDPOINT_URL"])
