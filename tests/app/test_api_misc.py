"""Health, routing errors, OpenAPI/docs, and the API's behaviour when the broker is down."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import records
from app.db.engine import make_engine, session_scope
from app.db.tables import JobRecord, ModelRecord
from app.main import create_app
from app.schemas.spec import PruneSpec, unsupported_features
from tests.app.helpers import (
    app_of,
    assert_problem,
    dataset_arrays,
    files_under,
    npz_bytes,
    saved_model_zip,
    sha256,
)

# Every path and method API.md names.
CONTRACT: dict[str, set[str]] = {
    "/healthz": {"get"},
    "/readyz": {"get"},
    "/v1/models": {"get", "post"},
    "/v1/models/{model_id}": {"get", "delete"},
    "/v1/datasets": {"get", "post"},
    "/v1/datasets/{dataset_id}": {"get", "delete"},
    "/v1/jobs": {"get", "post"},
    "/v1/jobs/{job_id}": {"get"},
    "/v1/jobs/{job_id}/cancel": {"post"},
    "/v1/jobs/{job_id}/metrics": {"get"},
    "/v1/jobs/{job_id}/artifact": {"get"},
}


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_on_the_embedded_default(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}


def test_readyz_reports_a_dead_embedded_worker(settings: Settings) -> None:
    class DeadWorker:
        def alive(self) -> bool:
            return False

    with TestClient(create_app(settings, embedded_worker=DeadWorker())) as client:
        body = assert_problem(client.get("/readyz"), 503)
        assert body["down"] == ["worker"]
        assert "worker" in body["detail"]


def test_readyz_names_an_unreachable_database(client: TestClient, tmp_path: Path) -> None:
    app = app_of(client)
    working = app.state.engine
    app.state.engine = make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'db.sqlite'}")
    try:
        response = client.get("/readyz")
    finally:
        app.state.engine.dispose()
        app.state.engine = working
    body = assert_problem(response, 503)
    assert body["down"] == ["database"]
    assert "database" in body["detail"]


def test_unexpected_error_is_a_500_problem_without_internals(settings: Settings) -> None:
    app = create_app(settings)

    def broken() -> None:
        raise RuntimeError("secret connection string postgres://admin:hunter2@db")

    app.add_api_route("/boom", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        body = assert_problem(client.get("/boom"), 500)
    assert "hunter2" not in body["detail"]
    assert "RuntimeError" not in body["detail"]


@pytest.mark.parametrize("path", ["/nope", "/v1", "/v1/model", "/v2/models", "/v1/jobs/x/y/z"])
def test_unknown_route_is_404_problem(client: TestClient, path: str) -> None:
    body = assert_problem(client.get(path), 404)
    assert "/docs" in body["detail"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/healthz", {"GET"}),
        ("PUT", "/v1/models", {"GET", "POST"}),
        ("PATCH", "/v1/jobs/job_1", {"GET"}),
        ("GET", "/v1/jobs/job_1/cancel", {"POST"}),
        ("POST", "/v1/datasets/ds_1", {"GET", "DELETE"}),
    ],
)
def test_wrong_method_is_405_problem_with_allow(
    client: TestClient, method: str, path: str, allowed: set[str]
) -> None:
    response = client.request(method, path)
    body = assert_problem(response, 405)
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
    assert method in body["detail"]


# --- OpenAPI and docs -------------------------------------------------------------------------------------


@pytest.fixture
def openapi(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


def test_openapi_lists_every_contract_path(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    for path, methods in CONTRACT.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))


def _resolve(openapi: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = openapi
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return dict(node)


def test_openapi_job_request_shows_spec_examples(openapi: dict[str, Any]) -> None:
    body = openapi["paths"]["/v1/jobs"]["post"]["requestBody"]
    job_create = _resolve(openapi, body["content"]["application/json"]["schema"])
    examples = job_create["examples"]
    assert examples and all("target_sparsity" in e["spec"] for e in examples)
    spec_schema = _resolve(openapi, job_create["properties"]["spec"])
    assert spec_schema["examples"]
    assert {"target_sparsity", "search", "sweep", "sensitivity"} <= set(spec_schema["properties"])
    assert {"search", "sweep", "sensitivity"} <= {k for e in spec_schema["examples"] for k in e}
    # The documented examples must be specs this version accepts, not ones it refuses.
    for spec in [e["spec"] for e in examples] + spec_schema["examples"]:
        assert unsupported_features(PruneSpec.model_validate(spec)) == [], spec


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets"])
def test_openapi_uploads_declare_the_file_field(openapi: dict[str, Any], path: str) -> None:
    content = openapi["paths"][path]["post"]["requestBody"]["content"]
    schema = content["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"]
    assert schema["properties"]["file"] == {
        **schema["properties"]["file"],
        "type": "string",
        "format": "binary",
    }
    assert "name" in schema["properties"]


def test_openapi_documents_problem_responses(openapi: dict[str, Any]) -> None:
    responses = openapi["paths"]["/v1/models"]["post"]["responses"]
    for code in ("400", "413", "415", "422", "503"):
        assert code in responses, code
    assert "202" in openapi["paths"]["/v1/jobs"]["post"]["responses"]
    assert (
        "application/zip"
        in openapi["paths"]["/v1/jobs/{job_id}/artifact"]["get"]["responses"]["200"]["content"]
    )


def test_docs_are_html(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


SEND_ONE_TASK = """
import sys
from fastapi.testclient import TestClient
from app.config import Settings
from app.main import create_app
settings = Settings(data_dir=sys.argv[1], min_free_bytes=0)
with TestClient(create_app(settings)) as client:
    response = client.post("/v1/models", files={"file": ("m.zip", open(sys.argv[2], "rb").read())})
    assert response.status_code == 201, response.text
    assert client.get("/readyz").status_code == 200
"""


def test_embedded_broker_keeps_its_files_in_the_data_dir(tmp_path: Path) -> None:
    """kombu's filesystem transport must not write into whatever directory the server started in.

    In a fresh process: kombu remembers queue bindings process-wide, so only the first send writes them.
    """
    cwd, data_dir = tmp_path / "cwd", tmp_path / "var"
    cwd.mkdir()
    upload = tmp_path / "m.zip"
    upload.write_bytes(saved_model_zip())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", SEND_ONE_TASK, str(data_dir), str(upload)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert list(cwd.iterdir()) == []
    assert files_under(data_dir / "broker" / "control")  # the exchange table lives here instead


# --- broker down ----------------------------------------------------------------------------------------------


@pytest.fixture
def down(data_dir: Path) -> Iterator[tuple[TestClient, Settings]]:
    """An app whose Redis broker does not listen (port 1 refuses connections)."""
    settings = Settings(data_dir=data_dir, min_free_bytes=0, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        yield client, settings


def _count(client: TestClient, table: type[ModelRecord] | type[JobRecord]) -> int:
    with session_scope(app_of(client).state.session_factory) as session:
        return session.query(table).count()


def _timed(call: Any) -> Any:
    start = time.monotonic()
    response = call()
    assert time.monotonic() - start < 10, "the API must fail fast when the broker is down"
    return response


def test_upload_model_with_broker_down_is_503_and_keeps_nothing(down: tuple[TestClient, Settings]) -> None:
    client, settings = down
    response = _timed(lambda: client.post("/v1/models", files={"file": ("m.zip", saved_model_zip())}))
    body = assert_problem(response, 503)
    assert int(response.headers["retry-after"]) > 0
    assert "nothing was kept" in body["detail"]
    assert _count(client, ModelRecord) == 0
    assert client.get("/v1/models").json()["items"] == []
    assert files_under(settings.data_dir / "models") == []
    assert files_under(settings.data_dir / "tmp") == []


def test_create_job_with_broker_down_is_503_and_keeps_nothing(down: tuple[TestClient, Settings]) -> None:
    client, settings = down
    data = saved_model_zip()
    with session_scope(app_of(client).state.session_factory) as session:  # a model that got in earlier
        records.add(
            session,
            ModelRecord(
                id="mdl_earlier",
                name="m",
                format="saved_model",
                filename="m.zip",
                size_bytes=len(data),
                sha256=sha256(data),
                status="validating",
            ),
        )
    payload = {"model_id": "mdl_earlier", "spec": {"target_sparsity": 0.5}}
    response = _timed(lambda: client.post("/v1/jobs", json=payload))
    body = assert_problem(response, 503)
    assert int(response.headers["retry-after"]) > 0
    assert "queue" in body["detail"]
    assert _count(client, JobRecord) == 0
    assert client.get("/v1/jobs").json() == {"items": [], "next_cursor": None}
    assert files_under(settings.data_dir / "jobs") == []
    # the model it named is untouched and can be deleted (no job holds it)
    assert client.delete("/v1/models/mdl_earlier").status_code == 204


def test_readyz_with_broker_down_names_the_broker(down: tuple[TestClient, Settings]) -> None:
    client, _ = down
    response = _timed(lambda: client.get("/readyz"))
    body = assert_problem(response, 503)
    assert body["down"] == ["broker"]
    assert "broker" in body["detail"]
    assert response.headers["retry-after"]


def test_what_needs_no_broker_still_works_when_it_is_down(down: tuple[TestClient, Settings]) -> None:
    client, _ = down
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.post("/v1/datasets", files={"file": ("d.npz", npz_bytes(**dataset_arrays()))})
    assert response.status_code == 201, response.text
    assert client.get("/v1/models").status_code == 200
