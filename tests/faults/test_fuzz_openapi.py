"""schemathesis against the app's own OpenAPI document: generated requests (valid and invalid) must never get a 5xx,
and every answer must match what the document declares (status code, Content-Type, body schema, headers).

Two variants run in-process on the real app (SQLite, the embedded file broker; no worker consumes), each seeded
with a ready model, two datasets, a queued job and a succeeded one. About half of the generated ids (path
parameters, the job body's model/dataset ids) are swapped for seeded ones, so the code behind the 404 is fuzzed
as well (job validation against the model's signatures, cancel, metrics, artifact downloads):

- ``open``: no API key exists (``SECATEURS_AUTH=auto`` on a fresh install), so requests act as tenant
  ``default``. The document declares bearer auth, which this server state deliberately does not require (README,
  "API keys and tenants"), so this variant's copy of the document marks auth optional (``security: [{...}, {}]``)
  on the operations that have it. Nothing else in the document changes.
- ``keyed``: one key exists, so keys are required. schemathesis sends it through an auth provider, and its
  auth checks (``ignored_auth``, ``missing_required_header``, negative cases without the header) probe that a
  request without it or with a wrong one is refused with 401. The key's plaintext is made at import, because
  schemathesis builds its coverage cases (auth included) while pytest collects; the fixture stores its hash.

Checks: schemathesis' defaults, all on. One is configured: ``positive_data_acceptance`` also accepts 400, 413,
415 and 422 for schema-valid requests, because the rules behind those answers cannot be written in a JSON
Schema: the uploaded file's bytes (not a zip/tar.gz/.npz: 415/422), opaque list cursors (400), an
Idempotency-Key already used for another request (422), the webhook SSRF guard (422) and the spec's cross-field
rules (N:M vs target_sparsity, ...: 422). Those answers are still checked for a declared status, Content-Type
and problem+json body, and 5xx stay failures (``not_a_server_error``, plus an explicit assert).

Wiring, forced by schemathesis 4.32 on pytest 9.2: ``schemathesis.pytest.from_fixture`` writes ``Node._nodeid``,
which pytest 9.2 no longer has, and checks that re-send a request (the auth probes) use the schema's own app.
So each variant's app is built at import with a placeholder data directory (``create_app`` reads its settings
only when the lifespan starts) and attached to its schema; the module fixture points ``data_dir`` at a
temporary directory before anything starts the app, and shuts the app down at the end.

Cases are counted per variant and operation; each variant's fixture, at teardown (after the last of its tests,
whatever the order or the xdist worker), prints the table and asserts at least ``MIN_CASES`` cases over every
operation, when every operation's test ran (``-k`` picking a few operations cannot reach the count).
"""

from __future__ import annotations

import copy
import os
import secrets
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.python import asgi as schemathesis_asgi

from app.auth import KEY_SCHEME, PREFIX_HEX, hash_key
from app.config import Settings
from app.db import api_keys
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.main import create_app
from tests.app.auth_helpers import succeed
from tests.app.helpers import SIGNATURES, dataset_arrays, mark_model, upload_dataset, upload_model

MIN_CASES = 1000
# Per operation and generation phase; operations without parameters (health, schemas) stop after a handful.
# SECATEURS_FUZZ_EXAMPLES raises it for a longer hunt (e.g. 1000) without touching the CI default.
MAX_EXAMPLES = int(os.environ.get("SECATEURS_FUZZ_EXAMPLES", "60"))
FUZZ_SETTINGS: dict[str, Any] = {
    "max_examples": MAX_EXAMPLES,
    "deadline": None,
    "derandomize": True,  # the same cases on every run (CI stability), so a failure reproduces
    "suppress_health_check": [HealthCheck.too_slow],
    "database": None,
}
# What a schema-valid request may get for reasons its schema cannot state (see the module docstring).
POSITIVE_STATUSES = ["2xx", "3xx", "400", "401", "403", "404", "409", "413", "415", "422", "429", "5xx"]
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"positive_data_acceptance": {"expected-statuses": POSITIVE_STATUSES}}}
)
KEY_PREFIX = secrets.token_hex(PREFIX_HEX // 2)
API_KEY = f"{KEY_SCHEME}_{KEY_PREFIX}_{secrets.token_urlsafe(32)}"
PLACEHOLDER_DIR = Path("/nonexistent/secateurs-fuzz")


@dataclass
class Target:
    """One variant: its settings (data_dir set by the fixture), app, schema and tallies."""

    name: str
    keyed: bool
    settings: Settings = field(init=False)
    app: FastAPI = field(init=False)
    cases: Counter[str] = field(default_factory=Counter)
    ids: dict[str, list[str]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    ran: set[str] = field(default_factory=set)  # node ids of this variant's tests that ran

    def __post_init__(self) -> None:
        self.settings = Settings(data_dir=PLACEHOLDER_DIR, min_free_bytes=0)
        self.app = create_app(self.settings)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"} if self.keyed else {}

    def schema(self, document: dict[str, Any]) -> schemathesis.BaseSchema:
        loaded = schemathesis.openapi.from_dict(document, config=CONFIG)
        loaded.app = self.app
        return loaded


def _auth_optional(document: dict[str, Any]) -> dict[str, Any]:
    """The document as a server without keys honours it: anonymous access is an alternative to the key."""
    document = copy.deepcopy(document)
    for operations in document["paths"].values():
        for operation in operations.values():
            if operation.get("security"):
                operation["security"] = [*operation["security"], {}]
    return document


OPEN = Target("open", keyed=False)
KEYED = Target("keyed", keyed=True)
DOCUMENT = OPEN.app.openapi()
OPERATIONS = sorted(f"{method.upper()} {path}" for path, ops in DOCUMENT["paths"].items() for method in ops)
open_schema = OPEN.schema(_auth_optional(DOCUMENT))
keyed_schema = KEYED.schema(DOCUMENT)


@keyed_schema.auth()
class BearerKey:
    """``API_KEY`` as a bearer token (schemathesis' auth provider protocol)."""

    def get(self, case: Case, ctx: schemathesis.AuthContext) -> str:
        return API_KEY

    def set(self, case: Case, data: str, ctx: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def _store_key(settings: Settings) -> None:
    """What ``secateurs keys create`` stores, for a key whose plaintext this module already holds."""
    engine = make_engine(settings.db_url)
    try:
        init_db(engine)
        with session_scope(make_session_factory(engine)) as session:
            api_keys.add_api_key(
                session,
                key_id=f"key_{KEY_PREFIX}",
                tenant="fuzz",
                prefix=KEY_PREFIX,
                secret_sha256=hash_key(API_KEY),
            )
    finally:
        engine.dispose()


def _seed(target: Target) -> None:
    """Records for generated ids to land on (see ``_aim``): a ready model, two datasets, a queued job and a
    succeeded one with an artifact and metrics, so lists have items and the 200 answers get checked too."""
    with TestClient(target.app, headers=target.headers) as client:
        model = upload_model(client)["id"]
        mark_model(target.app, model, "ready", signatures=SIGNATURES)
        datasets = [upload_dataset(client)["id"], upload_dataset(client, dataset_arrays(labels=False))["id"]]
        jobs = []
        for _ in range(2):
            job = client.post("/v1/jobs", json={"model_id": model, "spec": {"target_sparsity": 0.5}})
            assert job.status_code == 202, job.text
            jobs.append(job.json()["id"])
        succeed(target.app, jobs[1])
    target.ids = {"model_id": [model], "dataset_id": datasets, "job_id": jobs}


# Where a generated id may be swapped for a seeded one: path parameters and the job body's references.
ID_KINDS = {
    "model_id": "model_id",
    "dataset_id": "dataset_id",
    "job_id": "job_id",
    "train_dataset_id": "dataset_id",
    "eval_dataset_id": "dataset_id",
}


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Case, kwargs: dict[str, Any]) -> None:
    """Aims this module's cases (and no one else's: a hook is global) at seeded records. In this hook, not the
    test, because schemathesis re-derives a case's metadata (is it still negative?) only from hook edits."""
    target = next((t for t in (OPEN, KEYED) if case.operation.app is t.app), None)
    if target is not None and target.ids:
        _aim(case, target)


def _aim(case: Case, target: Target) -> None:
    """Swap about half of the generated ids for seeded ones, chosen from the generated value (so runs stay
    deterministic): random ids only ever reach the 404 branch, seeded ones reach everything behind it."""
    containers = [case.path_parameters]
    if case.operation.label == "POST /v1/jobs" and isinstance(case.body, dict):
        containers.append(case.body)
    for container in containers:
        for name, kind in ID_KINDS.items():
            value = container.get(name) if isinstance(container, dict) else None
            if not isinstance(value, str):
                continue
            digest = zlib.crc32(value.encode("utf-8", "surrogatepass"))
            if digest % 2 == 0:
                choices = target.ids[kind]
                container[name] = choices[(digest // 2) % len(choices)]


def _check_counts(target: Target) -> None:
    """The proof's figures, printed and asserted."""
    print(f"\nschemathesis, {target.name}: {target.cases.total()} cases over {len(target.cases)} operations")
    for label in OPERATIONS:
        print(f"  {target.cases[label]:5d}  {label}")
    print("  answers: " + ", ".join(f"{code}: {n}" for code, n in sorted(target.statuses.items())))
    total = target.cases.total()
    assert total >= MIN_CASES, f"only {total} cases ran in the {target.name} variant"
    assert sorted(target.cases) == OPERATIONS, f"the {target.name} variant missed operations"
    assert not [code for code in target.statuses if code >= 500]
    if target.keyed:
        assert target.statuses[401] > 0 and target.statuses[200] > 0, "the key was never accepted or never checked"


def _serve(target: Target, request: pytest.FixtureRequest) -> Iterator[Target]:
    tmp_path_factory = request.getfixturevalue("tmp_path_factory")
    target.settings.data_dir = (tmp_path_factory.mktemp(f"fuzz-{target.name}") / "var").resolve()
    target.settings.data_dir.mkdir()
    if target.keyed:
        _store_key(target.settings)
    _seed(target)
    try:
        yield target
    finally:
        schemathesis_asgi.shutdown_lifespans()  # disposes the database engine of the lifespan schemathesis began
    if len(target.ran) == len(OPERATIONS):  # every operation's test ran (not a -k pick of a few)
        _check_counts(target)


@pytest.fixture(scope="module")
def open_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    yield from _serve(OPEN, request)


@pytest.fixture(scope="module")
def keyed_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    yield from _serve(KEYED, request)


def _call(target: Target, case: Case) -> None:
    target.cases[case.operation.label] += 1
    response = case.call_and_validate()  # every default check; raises on the first failing one
    target.statuses[response.status_code] += 1
    assert response.status_code < 500, f"{case.operation.label} answered {response.status_code}"


@open_schema.parametrize()
@settings(**FUZZ_SETTINGS)
def test_fuzz_without_keys(case: Case, open_target: Target, request: pytest.FixtureRequest) -> None:
    _call(open_target, case)
    open_target.ran.add(request.node.nodeid)


@keyed_schema.parametrize()
@settings(**FUZZ_SETTINGS)
def test_fuzz_with_a_required_key(case: Case, keyed_target: Target, request: pytest.FixtureRequest) -> None:
    _call(keyed_target, case)
    keyed_target.ran.add(request.node.nodeid)
