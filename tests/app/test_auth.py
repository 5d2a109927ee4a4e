"""API keys and tenants against the real app, on SQLite and PostgreSQL: 401s, the three auth modes, keys kept
only as hashes, revocation, and a tenant isolation matrix over every endpoint that takes an id."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import inspect, select, text

from app import auth
from app.config import Settings
from app.db import records
from app.db.engine import init_db, make_engine, session_scope
from app.db.tables import ApiKeyRecord, Base, DatasetRecord, JobRecord, ModelRecord
from app.main import create_app
from tests.app.auth_helpers import ENGINES, bearer, database_url, empty, succeed
from tests.app.helpers import (
    RUN_JOB,
    app_of,
    assert_problem,
    dataset_arrays,
    files_under,
    npz_bytes,
    saved_model_zip,
    sent_tasks,
)

SPEC = {"target_sparsity": 0.5}


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from database_url(request, tmp_path)


@pytest.fixture
def settings(data_dir: Path, db_url: str) -> Settings:
    return Settings(data_dir=data_dir, min_free_bytes=0, database_url=db_url)


def app_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def upload(client: TestClient, key: str | None, path: str = "/v1/models", name: str = "m") -> dict[str, Any]:
    data = saved_model_zip() if path == "/v1/models" else npz_bytes(**dataset_arrays())
    filename = "m.zip" if path == "/v1/models" else "d.npz"
    response = client.post(
        path, files={"file": (filename, data)}, data={"name": name}, headers=bearer(key) if key else None
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def start_job(client: TestClient, key: str | None, model_id: str, **extra: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/jobs", json={"model_id": model_id, "spec": SPEC, **extra}, headers=bearer(key) if key else None
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


# --- the admin functions the CLI calls ------------------------------------------------------------------------


def test_create_key_shows_the_plaintext_once_and_stores_only_its_hash(
    settings: Settings, db_url: str
) -> None:
    key_id, plaintext = auth.create_key(settings, "acme")
    prefix = key_id.removeprefix("key_")
    assert plaintext.startswith(f"sk_{prefix}_")
    secret = plaintext.split("_", 2)[2]
    assert len(secret) >= 40

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = " ".join(
                repr(tuple(row))
                for table in Base.metadata.sorted_tables
                for row in conn.execute(select(table))
            )
            row = conn.execute(select(ApiKeyRecord.__table__)).one()
    finally:
        engine.dispose()
    assert plaintext not in stored and secret not in stored
    assert row.secret_sha256 == hashlib.sha256(plaintext.encode()).hexdigest()
    assert (row.id, row.tenant, row.prefix, row.revoked_at) == (key_id, "acme", prefix, None)
    if db_url.startswith("sqlite"):  # nor anywhere in the database files (WAL included)
        db_file = Path(db_url.removeprefix("sqlite:///"))
        for path in (db_file, db_file.with_name(db_file.name + "-wal")):
            if path.exists():
                assert secret.encode() not in path.read_bytes()


def test_list_keys_never_shows_secrets(settings: Settings) -> None:
    first_id, first = auth.create_key(settings, "acme")
    second_id, second = auth.create_key(settings, "globex")
    assert auth.revoke_key(settings, second_id)
    listed = auth.list_keys(settings)
    assert [k["id"] for k in listed] == [first_id, second_id]
    assert [(k["tenant"], k["active"]) for k in listed] == [("acme", True), ("globex", False)]
    assert listed[0]["prefix"] == f"sk_{first_id.removeprefix('key_')}_"
    assert listed[0]["revoked_at"] is None and listed[1]["revoked_at"] is not None
    assert listed[0]["created_at"].endswith("+00:00")
    text_of_list = repr(listed)
    for plaintext in (first, second):
        assert plaintext.split("_", 2)[2] not in text_of_list
        assert hashlib.sha256(plaintext.encode()).hexdigest() not in text_of_list


def test_revoke_by_id_or_prefix_and_only_once(settings: Settings) -> None:
    key_id, _ = auth.create_key(settings, "acme")
    other_id, _ = auth.create_key(settings, "acme")
    assert auth.revoke_key(settings, key_id)
    assert not auth.revoke_key(settings, key_id)
    assert auth.revoke_key(settings, other_id.removeprefix("key_"))
    assert not auth.revoke_key(settings, "key_000000000000")


@pytest.mark.parametrize("tenant", ["", "Acme", "-x", "a b", "a/b", "x" * 65, "ünï"])
def test_bad_tenant_names_are_refused(settings: Settings, tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        auth.create_key(settings, tenant)
    assert auth.list_keys(settings) == []


def test_auth_required_by_mode(settings: Settings, db_url: str) -> None:
    assert not auth.auth_required(settings)
    key_id, _ = auth.create_key(settings, "acme")
    assert auth.auth_required(settings)
    assert auth.any_active_key(settings)
    assert not auth.auth_required(settings.model_copy(update={"auth": "disabled"}))
    assert auth.revoke_key(settings, key_id)
    assert not auth.any_active_key(settings)
    assert not auth.auth_required(settings)
    assert auth.auth_required(settings.model_copy(update={"auth": "required"}))
    if db_url.startswith("postgresql"):  # production: always, even with no active key
        production = Settings(
            environment="production",
            broker_url="redis://127.0.0.1:6379/0",
            database_url=db_url,
            data_dir=settings.data_dir,
        )
        assert auth.auth_required(production)


def test_production_refuses_auth_disabled(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SECATEURS_AUTH"):
        Settings(
            environment="production",
            auth="disabled",
            broker_url="redis://127.0.0.1:6379/0",
            database_url="postgresql+psycopg://postgres@127.0.0.1:5432/x",
            data_dir=tmp_path,
        )


# --- 401s --------------------------------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models/mdl_00000000000000000000"),
    ("DELETE", "/v1/models/mdl_00000000000000000000"),
    ("GET", "/v1/datasets"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets/ds_00000000000000000000"),
    ("DELETE", "/v1/datasets/ds_00000000000000000000"),
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/job_00000000000000000000"),
    ("POST", "/v1/jobs/job_00000000000000000000/cancel"),
    ("GET", "/v1/jobs/job_00000000000000000000/metrics"),
    ("GET", "/v1/jobs/job_00000000000000000000/artifact"),
]


def request_kwargs(method: str, path: str) -> dict[str, Any]:
    if (method, path) == ("POST", "/v1/models"):
        return {"files": {"file": ("m.zip", saved_model_zip())}}
    if (method, path) == ("POST", "/v1/datasets"):
        return {"files": {"file": ("d.npz", npz_bytes(**dataset_arrays()))}}
    if (method, path) == ("POST", "/v1/jobs"):
        return {"json": {"model_id": "mdl_00000000000000000000", "spec": SPEC}}
    return {}


@pytest.fixture
def keyed(settings: Settings) -> Iterator[tuple[TestClient, str]]:
    """The app once a key exists (auth auto): every request needs one."""
    _, key = auth.create_key(settings, "acme")
    with app_client(settings) as client:
        yield client, key


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_endpoint_needs_a_key_once_one_exists(
    keyed: tuple[TestClient, str], settings: Settings, method: str, path: str
) -> None:
    client, key = keyed
    response = client.request(method, path, **request_kwargs(method, path))
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer realm="secateurs"'
    assert "Authorization: Bearer" in body["detail"] and "keys create" in body["detail"]
    # nothing was received or created on the way
    assert files_under(settings.data_dir / "tmp") == [] and files_under(settings.data_dir / "models") == []
    authorised = client.request(method, path, headers=bearer(key), **request_kwargs(method, path))
    assert authorised.status_code != 401, authorised.text


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("Basic YWxhZGRpbjpvcGVuc2VzYW1l", "Bearer <API key>"),
        ("Bearer", "Bearer <API key>"),
        ("Bearer sk_short", "not one this server issued"),
        ("Bearer sk_000000000000_" + "A" * 43, "not one this server issued"),
        ("Token sk_000000000000_" + "A" * 43, "Bearer <API key>"),
    ],
)
def test_bad_credentials_are_401_invalid_token(keyed: tuple[TestClient, str], header: str, says: str) -> None:
    client, _ = keyed
    response = client.get("/v1/models", headers={"Authorization": header})
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer realm="secateurs", error="invalid_token"'
    assert says in body["detail"]


def test_a_key_with_one_character_changed_is_refused(keyed: tuple[TestClient, str]) -> None:
    client, key = keyed
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert_problem(client.get("/v1/models", headers=bearer(tampered)), 401)
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": f"bearer  {key} "}).status_code == 200


def test_revoked_key_is_refused_at_once(keyed: tuple[TestClient, str], settings: Settings) -> None:
    client, key = keyed
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    key_id = "key_" + key.split("_")[1]
    assert auth.revoke_key(settings, key_id)
    response = client.get("/v1/models", headers=bearer(key))
    body = assert_problem(response, 401)
    assert "revoked" in body["detail"] and key.split("_")[1] in body["detail"]
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    # the only key is revoked, so auth "auto" is open again: without a key the caller is tenant "default"
    assert client.get("/v1/models").status_code == 200


def test_last_used_is_recorded(keyed: tuple[TestClient, str], settings: Settings) -> None:
    client, key = keyed
    assert auth.list_keys(settings)[0]["last_used_at"] is None
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert auth.list_keys(settings)[0]["last_used_at"] is not None


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/schemas/spec", "/openapi.json", "/docs"])
def test_probes_schemas_and_docs_need_no_key(keyed: tuple[TestClient, str], path: str) -> None:
    client, _ = keyed
    assert client.get(path).status_code == 200


def test_openapi_declares_the_bearer_scheme(keyed: tuple[TestClient, str]) -> None:
    client, _ = keyed
    openapi = client.get("/openapi.json").json()
    assert openapi["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"HTTPBearer": []} in openapi["paths"]["/v1/jobs"]["post"]["security"]
    params = {p["name"] for p in openapi["paths"]["/v1/jobs"]["post"]["parameters"]}
    assert "Idempotency-Key" in params


# --- the three modes ----------------------------------------------------------------------------------------------


def test_auto_without_keys_is_open_as_tenant_default(settings: Settings) -> None:
    with app_client(settings) as client:
        model = upload(client, None)
        assert client.get(f"/v1/models/{model['id']}").status_code == 200
        with session_scope(app_of(client).state.session_factory) as session:
            assert session.get(ModelRecord, model["id"]).tenant == "default"  # type: ignore[union-attr]
        # a key that is sent is still checked: a wrong one is not silently "default"
        assert_problem(client.get("/v1/models", headers=bearer("sk_000000000000_" + "A" * 43)), 401)


def test_auto_closes_when_the_first_key_is_created_while_running(settings: Settings) -> None:
    with app_client(settings) as client:
        old = upload(client, None)
        _, acme = auth.create_key(settings, "acme")
        assert_problem(client.get("/v1/models"), 401)
        # what was created before keys belongs to tenant "default": acme does not see it ...
        assert client.get("/v1/models", headers=bearer(acme)).json()["items"] == []
        assert_problem(client.get(f"/v1/models/{old['id']}", headers=bearer(acme)), 404)
        # ... a key for "default" does
        _, default = auth.create_key(settings, "default")
        listed = client.get("/v1/models", headers=bearer(default)).json()["items"]
        assert [m["id"] for m in listed] == [old["id"]]


def test_required_mode_refuses_even_without_any_key(settings: Settings) -> None:
    with app_client(settings.model_copy(update={"auth": "required"})) as client:
        response = client.get("/v1/jobs")
        assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_disabled_mode_ignores_keys_and_headers(settings: Settings) -> None:
    auth.create_key(settings, "acme")
    with app_client(settings.model_copy(update={"auth": "disabled"})) as client:
        model = upload(client, None)
        same = client.get(f"/v1/models/{model['id']}", headers={"Authorization": "Bearer nonsense"})
        assert same.status_code == 200
        with session_scope(app_of(client).state.session_factory) as session:
            assert session.get(ModelRecord, model["id"]).tenant == "default"  # type: ignore[union-attr]


# --- tenant isolation -------------------------------------------------------------------------------------------


@dataclass
class World:
    """Two tenants, each with a key; A owns a model, a dataset, a queued job and a succeeded one."""

    client: TestClient
    settings: Settings
    a: str
    b: str
    model: str
    dataset: str
    queued: str
    done: str
    b_model: str


@pytest.fixture
def world(settings: Settings) -> Iterator[World]:
    _, a = auth.create_key(settings, "acme")
    _, b = auth.create_key(settings, "globex")
    with app_client(settings) as client:
        model = upload(client, a)["id"]
        dataset = upload(client, a, "/v1/datasets")["id"]
        done = start_job(client, a, model, eval_dataset_id=dataset)["id"]
        succeed(app_of(client), done)
        queued = start_job(client, a, model)["id"]
        b_model = upload(client, b)["id"]
        yield World(client, settings, a, b, model, dataset, queued, done, b_model)


# (name, method, path template, json body template, what tenant A itself gets): every endpoint taking an id.
CROSS_TENANT = [
    ("get model", "GET", "/v1/models/{model}", None, 200),
    ("delete model", "DELETE", "/v1/models/{model}", None, 409),  # A's queued job uses it
    ("get dataset", "GET", "/v1/datasets/{dataset}", None, 200),
    ("delete dataset", "DELETE", "/v1/datasets/{dataset}", None, 204),
    ("get job", "GET", "/v1/jobs/{done}", None, 200),
    ("cancel job", "POST", "/v1/jobs/{queued}/cancel", None, 202),
    ("metrics", "GET", "/v1/jobs/{done}/metrics", None, 200),
    ("artifact", "GET", "/v1/jobs/{done}/artifact", None, 200),
    ("job on their model", "POST", "/v1/jobs", {"model_id": "{model}"}, 202),
    (
        "job on their train set",
        "POST",
        "/v1/jobs",
        {"model_id": "{b_model}", "train_dataset_id": "{dataset}"},
        202,
    ),
    (
        "job on their eval set",
        "POST",
        "/v1/jobs",
        {"model_id": "{b_model}", "eval_dataset_id": "{dataset}"},
        202,
    ),
]


def _fill(template: str, world: World) -> str:
    return template.format(
        **{k: getattr(world, k) for k in ("model", "dataset", "queued", "done", "b_model")}
    )


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "owner_gets"), CROSS_TENANT, ids=[c[0] for c in CROSS_TENANT]
)
def test_another_tenants_ids_are_404(
    world: World, name: str, method: str, path: str, body: dict[str, str] | None, owner_gets: int
) -> None:
    client = world.client
    url = _fill(path, world)
    payload = None if body is None else {**{k: _fill(v, world) for k, v in body.items()}, "spec": SPEC}
    runs_before = len([t for t in sent_tasks(world.settings) if t.task == RUN_JOB])

    response = client.request(method, url, json=payload, headers=bearer(world.b))
    problem = assert_problem(response, 404)
    assert "tenant" not in problem["detail"]  # says "no such ...", exactly as for an unknown id

    # nothing of A's changed and nothing was created for B
    assert client.get(f"/v1/models/{world.model}", headers=bearer(world.a)).status_code == 200
    assert client.get(f"/v1/datasets/{world.dataset}", headers=bearer(world.a)).status_code == 200
    queued = client.get(f"/v1/jobs/{world.queued}", headers=bearer(world.a)).json()
    assert (queued["status"], queued["cancel_requested"]) == ("queued", False)
    assert client.get("/v1/jobs", headers=bearer(world.b)).json()["items"] == []
    assert len([t for t in sent_tasks(world.settings) if t.task == RUN_JOB]) == runs_before

    # and the same request is fine for A: the 404 above is about the tenant, not the id
    if payload is not None and payload["model_id"] == world.b_model:
        payload = {**payload, "model_id": world.model}
    response = client.request(method, url, json=payload, headers=bearer(world.a))
    assert response.status_code == owner_gets, response.text


def test_lists_show_only_the_callers_own(world: World) -> None:
    client = world.client

    def ids(path: str, key: str, **params: str) -> set[str]:
        response = client.get(path, params=params, headers=bearer(key))
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["items"]}

    assert ids("/v1/models", world.a) == {world.model}
    assert ids("/v1/models", world.b) == {world.b_model}
    assert ids("/v1/datasets", world.a) == {world.dataset}
    assert ids("/v1/datasets", world.b) == set()
    assert ids("/v1/jobs", world.a) == {world.queued, world.done}
    assert ids("/v1/jobs", world.b) == set()
    assert ids("/v1/jobs", world.b, model_id=world.model) == set()
    assert ids("/v1/jobs", world.b, status="succeeded") == set()
    b_job = start_job(client, world.b, world.b_model)["id"]
    assert ids("/v1/jobs", world.b) == {b_job}
    assert ids("/v1/jobs", world.a) == {world.queued, world.done}


def test_records_carry_their_tenant(world: World) -> None:
    with session_scope(app_of(world.client).state.session_factory) as session:
        assert session.get(ModelRecord, world.model).tenant == "acme"  # type: ignore[union-attr]
        assert session.get(ModelRecord, world.b_model).tenant == "globex"  # type: ignore[union-attr]
        assert session.get(DatasetRecord, world.dataset).tenant == "acme"  # type: ignore[union-attr]
        assert session.get(JobRecord, world.done).tenant == "acme"  # type: ignore[union-attr]
        rows, _ = records.list_jobs(session, 50, None)
        assert len(rows) == 2  # tenant=None is the operator's view across tenants
        assert records.get_owned(session, JobRecord, world.done, "globex") is None
        assert records.get_owned(session, JobRecord, world.done, "acme") is not None


# --- databases created before tenants ------------------------------------------------------------------------


def test_init_db_adds_the_tenant_column_to_an_older_database(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        if db_url.startswith("postgresql"):
            with engine.begin() as conn:
                for table in reversed(Base.metadata.sorted_tables):
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table.name}")
        with engine.begin() as conn:  # the models table as the first release created it
            conn.execute(
                text(
                    "CREATE TABLE models (id VARCHAR(64) PRIMARY KEY, name VARCHAR(256), format VARCHAR(16), "
                    "filename VARCHAR(256), size_bytes BIGINT, sha256 VARCHAR(64), status VARCHAR(16), "
                    "error JSON, signatures JSON, params BIGINT, created_at TIMESTAMP WITH TIME ZONE, "
                    "updated_at TIMESTAMP WITH TIME ZONE)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO models (id, name, format, filename, size_bytes, sha256, status) "
                    "VALUES ('mdl_old', 'm', 'saved_model', 'm.zip', 1, 'x', 'ready')"
                )
            )
        init_db(engine)
        init_db(engine)  # idempotent
        columns = {c["name"] for c in inspect(engine).get_columns("models")}
        assert "tenant" in columns
        assert "ix_models_tenant_created" in {i["name"] for i in inspect(engine).get_indexes("models")}
        with engine.connect() as conn:
            assert (
                conn.execute(text("SELECT tenant FROM models WHERE id = 'mdl_old'")).scalar_one() == "default"
            )
    finally:
        if db_url.startswith("postgresql"):  # leave the shared database as the other tests expect it
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP TABLE IF EXISTS models")
            init_db(engine)
            empty(engine)
        engine.dispose()
