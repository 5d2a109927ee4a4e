"""Response headers other services rely on: RFC 8288 ``Link: rel="next"`` on lists, ``Retry-After`` on 202s and
503s, and the artifact's ``ETag``, ``Repr-Digest`` (RFC 9530), ``Accept-Ranges`` / ``Range`` / ``If-Range``."""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.api.artifacts import repr_digest
from app.config import Settings
from app.db.engine import session_scope
from app.db.tables import JobRecord, utcnow
from app.main import create_app
from tests.app.auth_helpers import ARTIFACT, succeed
from tests.app.helpers import (
    app_of,
    assert_problem,
    create_job,
    dataset_arrays,
    npz_bytes,
    saved_model_zip,
    upload_dataset,
    upload_model,
)

LINK = re.compile(r'^<(?P<target>[^>]+)>; rel="next"$')


def next_link(response: Any) -> str | None:
    header = response.headers.get("link")
    if header is None:
        return None
    match = LINK.match(header)
    assert match, header
    return match["target"]


def walk(client: TestClient, url: str) -> tuple[list[str], list[str]]:
    """Follow Link headers from ``url``; returns (item ids in order, every link followed)."""
    ids: list[str] = []
    links: list[str] = []
    while True:
        response = client.get(url)
        assert response.status_code == 200, response.text
        page = response.json()
        ids += [item["id"] for item in page["items"]]
        link = next_link(response)
        # the header and the body agree on whether there is a next page, and on its cursor
        assert (link is None) == (page["next_cursor"] is None)
        if link is None:
            return ids, links
        assert parse_qs(urlsplit(link).query)["cursor"] == [page["next_cursor"]]
        links.append(link)
        url = link


# --- Link -----------------------------------------------------------------------------------------------------------


def test_link_walk_over_job_pages_keeps_the_filters(client: TestClient) -> None:
    app = app_of(client)
    model = upload_model(client)["id"]
    other = upload_model(client)["id"]
    mine = [create_job(client, model)["id"] for _ in range(5)]
    create_job(client, other)
    with session_scope(app.state.session_factory) as session:  # one of mine is no longer queued
        session.execute(update(JobRecord).where(JobRecord.id == mine[0]).values(status="failed"))
        for i, job_id in enumerate(mine):  # distinct, known creation times: newest first is mine reversed
            session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id)
                .values(created_at=utcnow() - timedelta(minutes=10 - i))
            )

    ids, links = walk(client, f"/v1/jobs?status=queued&model_id={model}&limit=2")
    assert ids == list(reversed(mine[1:]))
    assert len(links) == 1
    for link in links:
        assert link.startswith("/v1/jobs?")
        query = parse_qs(urlsplit(link).query)
        assert query["status"] == ["queued"] and query["model_id"] == [model] and query["limit"] == ["2"]

    everything, links = walk(client, "/v1/jobs?limit=1")
    assert len(everything) == 6 == len(set(everything)) and len(links) == 5


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets"])
def test_link_walk_over_models_and_datasets(client: TestClient, path: str) -> None:
    made = [
        (upload_model(client) if path == "/v1/models" else upload_dataset(client, dataset_arrays()))["id"]
        for _ in range(3)
    ]
    ids, links = walk(client, f"{path}?limit=2")
    assert sorted(ids) == sorted(made)
    assert len(links) == 1 and links[0].startswith(f"{path}?") and "limit=2" in links[0]
    assert next_link(client.get(f"{path}?limit=3")) is None  # exactly one full page: no next
    assert next_link(client.get(path)) is None


# --- Retry-After ----------------------------------------------------------------------------------------------


def test_202s_say_when_to_poll(client: TestClient) -> None:
    model = upload_model(client)["id"]
    created = client.post("/v1/jobs", json={"model_id": model, "spec": {"target_sparsity": 0.5}})
    assert created.status_code == 202 and int(created.headers["retry-after"]) > 0
    canceled = client.post(f"/v1/jobs/{created.json()['id']}/cancel")
    assert canceled.status_code == 202
    assert int(canceled.headers["retry-after"]) > 0
    assert canceled.headers["location"] == f"/v1/jobs/{created.json()['id']}"


def test_503s_say_when_to_retry(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as client:
        response = client.post("/v1/models", files={"file": ("m.zip", saved_model_zip())})
        assert_problem(response, 503)
        assert int(response.headers["retry-after"]) > 0
        ready = client.get("/readyz")
        assert_problem(ready, 503)
        assert int(ready.headers["retry-after"]) > 0
        # uploads that need no queue are unaffected
        assert (
            client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(**dataset_arrays()))}).status_code
            == 201
        )


# --- artifacts ---------------------------------------------------------------------------------------------------


@pytest.fixture
def artifact_url(client: TestClient) -> str:
    job = create_job(client, upload_model(client)["id"])
    succeed(app_of(client), job["id"])
    return f"/v1/jobs/{job['id']}/artifact"


ETAG = f'"{hashlib.sha256(ARTIFACT).hexdigest()}"'
DIGEST = f"sha-256=:{base64.b64encode(hashlib.sha256(ARTIFACT).digest()).decode()}:"


def test_repr_digest_is_base64_of_the_raw_sha256() -> None:
    assert (
        repr_digest(hashlib.sha256(b"").hexdigest())
        == "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    )


def test_artifact_headers(client: TestClient, artifact_url: str) -> None:
    response = client.get(artifact_url)
    assert response.status_code == 200
    assert response.content == ARTIFACT
    assert response.headers["repr-digest"] == DIGEST
    algorithm, value = response.headers["repr-digest"].split("=", 1)
    assert (
        algorithm == "sha-256"
        and base64.b64decode(value.strip(":")) == hashlib.sha256(response.content).digest()
    )
    assert response.headers["etag"] == ETAG
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-length"] == str(len(ARTIFACT))
    not_modified = client.get(artifact_url, headers={"If-None-Match": ETAG})
    assert not_modified.status_code == 304
    assert not_modified.headers["repr-digest"] == DIGEST


def test_resuming_a_download_with_range_and_if_range(client: TestClient, artifact_url: str) -> None:
    head = client.get(artifact_url, headers={"Range": "bytes=0-999"})
    assert head.status_code == 206
    assert head.headers["content-range"] == f"bytes 0-999/{len(ARTIFACT)}"
    assert head.headers["content-length"] == "1000"
    # Repr-Digest is of the whole representation, so the client can check what it assembles
    assert head.headers["repr-digest"] == DIGEST
    rest = client.get(artifact_url, headers={"Range": "bytes=1000-", "If-Range": head.headers["etag"]})
    assert rest.status_code == 206
    assembled = head.content + rest.content
    assert assembled == ARTIFACT
    assert base64.b64encode(hashlib.sha256(assembled).digest()).decode() in head.headers["repr-digest"]


@pytest.mark.parametrize("if_range", ['"not-the-etag"', f"W/{ETAG}"])
def test_if_range_that_does_not_match_strongly_sends_everything(
    client: TestClient, artifact_url: str, if_range: str
) -> None:
    response = client.get(artifact_url, headers={"Range": "bytes=1000-", "If-Range": if_range})
    assert response.status_code == 200
    assert response.content == ARTIFACT


def test_several_ranges_come_as_multipart_byteranges(client: TestClient, artifact_url: str) -> None:
    response = client.get(artifact_url, headers={"Range": "bytes=0-9, 100-109"})
    assert response.status_code == 206
    assert response.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert ARTIFACT[0:10] in response.content and ARTIFACT[100:110] in response.content


@pytest.mark.parametrize("header", ["items=0-5", "bytes=abc", "bytes=10-5", "bytes"])
def test_ranges_we_cannot_use_are_ignored(client: TestClient, artifact_url: str, header: str) -> None:
    """RFC 9110 14.2: an unknown unit MUST be ignored, an invalid range MAY be: the whole file, 200."""
    response = client.get(artifact_url, headers={"Range": header})
    assert response.status_code == 200
    assert response.content == ARTIFACT


def test_unsatisfiable_range_is_a_416_problem(client: TestClient, artifact_url: str) -> None:
    response = client.get(artifact_url, headers={"Range": f"bytes={len(ARTIFACT)}-"})
    body = assert_problem(response, 416)
    assert response.headers["content-range"] == f"bytes */{len(ARTIFACT)}"
    assert str(len(ARTIFACT)) in body["detail"]
    assert response.headers["etag"] == ETAG
