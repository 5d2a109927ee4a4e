"""Idempotency-Key on POST /v1/jobs, /v1/models and /v1/datasets against the real app (SQLite and PostgreSQL):
replay, payload mismatch, in-flight 409, which outcomes are kept, expiry, per-tenant scope, and the race-safe
claim underneath."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app import auth
from app.api.idempotency import PURGE_EVERY_S, IdempotencyStore, json_fingerprint, parse_key
from app.config import Settings
from app.db import idempotency, jobs
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import IdempotencyRecord, JobRecord, ModelRecord, as_utc, utcnow
from app.errors import BadIdempotencyKey, Conflict, NotFound, ServiceUnavailable, Unprocessable
from app.main import create_app
from app.queue import make_celery
from tests.app.auth_helpers import ENGINES, bearer, database_url
from tests.app.helpers import (
    RUN_JOB,
    VALIDATE_MODEL,
    app_of,
    assert_problem,
    dataset_arrays,
    files_under,
    multipart,
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


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def model_id(client: TestClient) -> str:
    response = client.post("/v1/models", files={"file": ("m.zip", saved_model_zip())})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def post_job(client: TestClient, key: str | None, body: dict[str, Any], **headers: str) -> Any:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/jobs", json=body, headers={**extra, **headers})


def tasks(settings: Settings, name: str) -> list[list[Any]]:
    return [t.args for t in sent_tasks(settings) if t.task == name]


def count(client: TestClient, table: type[ModelRecord] | type[JobRecord]) -> int:
    with session_scope(app_of(client).state.session_factory) as session:
        return session.query(table).count()


def key_rows(client: TestClient) -> list[IdempotencyRecord]:
    with session_scope(app_of(client).state.session_factory) as session:
        return list(session.scalars(select(IdempotencyRecord)))


# --- the header -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("abc", "abc"),
        ("  8e03978e-40d5-43e8-bc93-6894a57f9324 ", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"8e03978e"', "8e03978e"),  # the draft's sf-string form names the same key
        ('"a\\"b\\\\c"', 'a"b\\c'),
        ("x" * 255, "x" * 255),
        (None, None),
    ],
)
def test_parse_key_accepts(raw: str | None, key: str | None) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize(
    "raw", ["", "   ", '""', "x" * 256, '"open', '"a"b"', '"bad\\escape"', "tab\there", "é"]
)
def test_parse_key_refuses(raw: str) -> None:
    with pytest.raises(BadIdempotencyKey):
        parse_key(raw)


@pytest.mark.parametrize("raw", ["x" * 256, '"unterminated'])
def test_bad_key_is_400_and_creates_nothing(client: TestClient, model_id: str, raw: str) -> None:
    body = assert_problem(post_job(client, raw, {"model_id": model_id, "spec": SPEC}), 400)
    assert "Idempotency-Key" in body["detail"]
    assert count(client, JobRecord) == 0


def test_json_fingerprint_ignores_formatting_not_content() -> None:
    assert json_fingerprint(b'{"a": 1, "b": [1, 2]}') == json_fingerprint(b'{"b":[1,2],"a":1}')
    assert json_fingerprint(b'{"a": 1}') != json_fingerprint(b'{"a": 2}')
    assert json_fingerprint(b"not json") != json_fingerprint(b"not json!")


# --- jobs -----------------------------------------------------------------------------------------------------------


def test_same_key_same_job_is_replayed(client: TestClient, settings: Settings, model_id: str) -> None:
    payload = {"model_id": model_id, "spec": SPEC}
    first = post_job(client, "job-1", payload)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    # the same JSON, serialised differently, is the same payload
    again = client.post(
        "/v1/jobs",
        content=f'{{ "spec": {{"target_sparsity": 0.5}},  "model_id": "{model_id}" }}',
        headers={"Idempotency-Key": "job-1", "Content-Type": "application/json"},
    )
    assert again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    assert again.headers["retry-after"] == first.headers["retry-after"]
    assert again.headers["content-type"] == "application/json"
    assert count(client, JobRecord) == 1
    assert tasks(settings, RUN_JOB) == [[first.json()["id"]]]
    # the replay is the response as it was: the job's current state is at its Location
    with session_scope(app_of(client).state.session_factory) as session:
        assert jobs.claim_job(session, first.json()["id"], lease_seconds=60, max_attempts=3).claimed
    replayed = post_job(client, "job-1", payload)
    assert replayed.json()["status"] == "queued"
    assert client.get(replayed.headers["location"]).json()["status"] == "running"


def test_without_a_key_each_post_is_a_new_job(client: TestClient, model_id: str) -> None:
    payload = {"model_id": model_id, "spec": SPEC}
    ids = {post_job(client, None, payload).json()["id"] for _ in range(2)}
    assert len(ids) == 2
    assert key_rows(client) == []


def test_same_key_different_payload_is_422(client: TestClient, settings: Settings, model_id: str) -> None:
    assert post_job(client, "job-1", {"model_id": model_id, "spec": SPEC}).status_code == 202
    response = post_job(client, "job-1", {"model_id": model_id, "spec": {"target_sparsity": 0.6}})
    body = assert_problem(response, 422)
    assert body["type"].endswith("/idempotency-key-reused")
    assert "different request body" in body["detail"]
    assert "idempotent-replayed" not in response.headers
    assert count(client, JobRecord) == 1
    assert len(tasks(settings, RUN_JOB)) == 1


def test_same_key_on_another_endpoint_is_422(client: TestClient, model_id: str) -> None:
    assert post_job(client, "shared", {"model_id": model_id, "spec": SPEC}).status_code == 202
    response = client.post(
        "/v1/datasets",
        files={"file": ("d.npz", npz_bytes(**dataset_arrays()))},
        headers={"Idempotency-Key": "shared"},
    )
    body = assert_problem(response, 422)
    assert "POST /v1/jobs" in body["detail"]
    assert client.get("/v1/datasets").json()["items"] == []


def test_key_held_by_a_running_request_is_409_with_retry_after(client: TestClient, model_id: str) -> None:
    payload = {"model_id": model_id, "spec": SPEC}
    store: IdempotencyStore = app_of(client).state.idempotency
    holder = store.begin("default", "busy", "POST /v1/jobs", json_fingerprint(b'{"x": 1}'))
    assert holder.owner is not None
    # the holder's payload differs and both are known: retrying cannot help, so that is a 422
    assert_problem(post_job(client, "busy", payload), 422)
    # the same payload while the first is still running: 409 with Retry-After
    other = store.begin("default", "busy-2", "POST /v1/jobs", None)
    assert other.owner is not None
    response = post_job(client, "busy-2", payload)
    body = assert_problem(response, 409)
    assert body["type"].endswith("/idempotency-key-in-use")
    assert int(response.headers["retry-after"]) >= 1
    assert count(client, JobRecord) == 0
    # once the holder gives the key up, the request runs
    other.release()
    assert post_job(client, "busy-2", payload).status_code == 202


def test_a_hold_abandoned_by_a_dead_process_is_taken_over(client: TestClient, model_id: str) -> None:
    store: IdempotencyStore = app_of(client).state.idempotency
    assert store.begin("default", "orphan", "POST /v1/jobs", None).owner is not None
    assert_problem(post_job(client, "orphan", {"model_id": model_id, "spec": SPEC}), 409)
    with session_scope(app_of(client).state.session_factory) as session:
        session.execute(update(IdempotencyRecord).values(locked_until=utcnow() - timedelta(seconds=1)))
    assert post_job(client, "orphan", {"model_id": model_id, "spec": SPEC}).status_code == 202


def test_a_4xx_is_kept_and_replayed(client: TestClient, model_id: str) -> None:
    """Stripe-like: the endpoint ran and answered 404; the same request gets the same answer for 24 h."""
    payload = {"model_id": "mdl_00000000000000000000", "spec": SPEC}
    first = post_job(client, "missing", payload)
    assert_problem(first, 404)
    again = post_job(client, "missing", payload)
    assert_problem(again, 404)
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"].startswith("application/problem+json")
    assert count(client, JobRecord) == 0


def test_a_body_the_api_refuses_before_running_does_not_use_the_key(
    client: TestClient, model_id: str
) -> None:
    assert_problem(post_job(client, "k", {"model_id": model_id, "spec": {"target_sparsity": 7}}), 422)
    assert key_rows(client) == []
    assert post_job(client, "k", {"model_id": model_id, "spec": SPEC}).status_code == 202


def test_a_5xx_releases_the_key_so_a_retry_runs_again(
    client: TestClient, settings: Settings, model_id: str
) -> None:
    app = app_of(client)
    working: Celery = app.state.celery
    app.state.celery = make_celery(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    try:
        response = post_job(client, "retry-me", {"model_id": model_id, "spec": SPEC})
    finally:
        app.state.celery = working
    assert_problem(response, 503)
    assert key_rows(client) == [] and count(client, JobRecord) == 0
    retried = post_job(client, "retry-me", {"model_id": model_id, "spec": SPEC})
    assert retried.status_code == 202
    assert "idempotent-replayed" not in retried.headers
    assert tasks(settings, RUN_JOB) == [[retried.json()["id"]]]


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        (NotFound("no such model"), 404),
        (Unprocessable("bad spec"), 422),
        (Conflict("in use right now"), None),  # a state that may change: a retry must re-evaluate it
        (ServiceUnavailable("queue down", retry_after=5), None),
        (RuntimeError("bug"), None),
    ],
)
def test_which_failures_are_kept(client: TestClient, error: Exception, kept: int | None) -> None:
    store: IdempotencyStore = app_of(client).state.idempotency
    attempt = store.begin("default", "k", "POST /v1/jobs", "f")
    attempt.fail(error)
    rows = key_rows(client)
    if kept is None:
        assert rows == []
        assert store.begin("default", "k", "POST /v1/jobs", "f").owner is not None
    else:
        assert [(r.status, r.response_status) for r in rows] == [("done", kept)]
        assert rows[0].response_body is not None and rows[0].response_body["status"] == kept
        assert store.begin("default", "k", "POST /v1/jobs", "f").previous is not None


def test_keys_are_scoped_per_tenant(settings: Settings) -> None:
    _, acme = auth.create_key(settings, "acme")
    _, globex = auth.create_key(settings, "globex")
    with TestClient(create_app(settings)) as client:
        ids = {}
        for name, key in (("acme", acme), ("globex", globex)):
            model = client.post(
                "/v1/models", files={"file": ("m.zip", saved_model_zip())}, headers=bearer(key)
            ).json()["id"]
            response = post_job(client, "same-key", {"model_id": model, "spec": SPEC}, **bearer(key))
            assert response.status_code == 202, response.text
            assert "idempotent-replayed" not in response.headers
            ids[name] = response.json()["id"]
        assert ids["acme"] != ids["globex"]
        # and a replay for one tenant never shows the other's job
        again = post_job(client, "same-key", {"model_id": "whatever", "spec": SPEC}, **bearer(globex))
        assert_problem(again, 422)


def test_expired_keys_run_again_and_are_purged(client: TestClient, model_id: str) -> None:
    payload = {"model_id": model_id, "spec": SPEC}
    first = post_job(client, "old", payload).json()["id"]
    post_job(client, "other", payload)
    with session_scope(app_of(client).state.session_factory) as session:
        row = session.scalars(select(IdempotencyRecord).where(IdempotencyRecord.key == "old")).one()
        assert as_utc(row.expires_at) - as_utc(row.created_at) >= timedelta(hours=24)  # type: ignore[operator]
        session.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.key == "old")
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    second = post_job(client, "old", payload)
    assert second.status_code == 202 and second.json()["id"] != first
    assert "idempotent-replayed" not in second.headers
    with session_scope(app_of(client).state.session_factory) as session:
        session.execute(update(IdempotencyRecord).values(expires_at=utcnow() - timedelta(seconds=1)))
        assert idempotency.purge_expired_idempotency_keys(session) == 2
    assert key_rows(client) == []


# --- uploads --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "data", "filename", "task"),
    [
        ("/v1/models", saved_model_zip(), "m.zip", VALIDATE_MODEL),
        ("/v1/datasets", npz_bytes(**dataset_arrays()), "d.npz", None),
    ],
)
def test_upload_replay_mismatch_and_in_flight(
    client: TestClient, settings: Settings, path: str, data: bytes, filename: str, task: str | None
) -> None:
    headers = {"Idempotency-Key": "up-1"}
    first = client.post(path, files={"file": (filename, data)}, data={"name": "n"}, headers=headers)
    assert first.status_code == 201, first.text
    again = client.post(path, files={"file": (filename, data)}, data={"name": "n"}, headers=headers)
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"] == f"{path}/{first.json()['id']}"
    assert [item["id"] for item in client.get(path).json()["items"]] == [first.json()["id"]]
    if task is not None:
        assert tasks(settings, task) == [[first.json()["id"]]]
    assert files_under(settings.data_dir / "tmp") == []  # the repeat's body was received, then discarded

    for changed in (
        {"files": {"file": (filename, data + b"\0")}, "data": {"name": "n"}},  # other bytes
        {"files": {"file": (filename, data)}, "data": {"name": "other"}},  # other name field
        {"files": {"file": ("renamed" + filename, data)}, "data": {"name": "n"}},  # other filename
    ):
        assert_problem(client.post(path, headers=headers, **changed), 422)  # type: ignore[arg-type]
    assert len(client.get(path).json()["items"]) == 1

    store: IdempotencyStore = app_of(client).state.idempotency
    assert store.begin("default", "up-2", f"POST {path}", None).owner is not None
    busy = client.post(path, files={"file": (filename, data)}, headers={"Idempotency-Key": "up-2"})
    assert_problem(busy, 409)
    assert int(busy.headers["retry-after"]) > 0
    assert files_under(settings.data_dir / "tmp") == []


def test_a_cut_off_upload_releases_the_key(client: TestClient, settings: Settings) -> None:
    body, content_type = multipart([("file", "m.zip", saved_model_zip())])
    cut = body[: len(body) // 2]
    headers = {"Idempotency-Key": "flaky-network", "content-type": content_type}
    assert_problem(client.post("/v1/models", content=cut, headers=headers), 400)
    assert key_rows(client) == []
    retried = client.post("/v1/models", content=body, headers=headers)
    assert retried.status_code == 201, retried.text
    assert "idempotent-replayed" not in retried.headers
    rows = key_rows(client)
    assert [(r.status, r.response_status) for r in rows] == [("done", 201)]
    assert rows[0].fingerprint is not None


def test_an_upload_refused_for_its_content_is_replayed(client: TestClient) -> None:
    headers = {"Idempotency-Key": "bad-archive"}
    not_a_model = saved_model_zip().replace(b"saved_model.pb", b"something.pbx")
    first = client.post("/v1/models", files={"file": ("m.zip", not_a_model)}, headers=headers)
    assert_problem(first, 422)
    again = client.post("/v1/models", files={"file": ("m.zip", not_a_model)}, headers=headers)
    assert_problem(again, 422)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    # a corrected upload needs a new key
    assert_problem(
        client.post("/v1/models", files={"file": ("m.zip", saved_model_zip())}, headers=headers), 422
    )
    assert client.get("/v1/models").json()["items"] == []


def test_upload_with_broker_down_releases_the_key(client: TestClient, settings: Settings) -> None:
    app = app_of(client)
    working: Celery = app.state.celery
    app.state.celery = make_celery(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))
    headers = {"Idempotency-Key": "m-503"}
    try:
        assert_problem(
            client.post("/v1/models", files={"file": ("m.zip", saved_model_zip())}, headers=headers), 503
        )
    finally:
        app.state.celery = working
    assert key_rows(client) == [] and count(client, ModelRecord) == 0
    assert files_under(settings.data_dir / "models") == []
    retried = client.post("/v1/models", files={"file": ("m.zip", saved_model_zip())}, headers=headers)
    assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers


# --- the claim underneath ----------------------------------------------------------------------------------------


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    init_db(engine)
    yield make_session_factory(engine)
    engine.dispose()


def claim(
    factory: sessionmaker[Session], owner: str, key: str = "k", tenant: str = "t"
) -> idempotency.KeyClaim:
    with factory() as session:
        return idempotency.claim_idempotency_key(
            session,
            tenant=tenant,
            key=key,
            endpoint="POST /v1/jobs",
            fingerprint="f",
            owner=owner,
            lock_seconds=60,
            ttl_seconds=3600,
        )


def test_concurrent_claims_have_exactly_one_winner(sessions: sessionmaker[Session]) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def race(owner: str) -> None:
        barrier.wait()
        outcomes.append(claim(sessions, owner).outcome)

    threads = [threading.Thread(target=race, args=(f"o{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["claimed"] + ["in_flight"] * 7
    with session_scope(sessions) as session:
        assert len(list(session.scalars(select(IdempotencyRecord)))) == 1


def test_claim_complete_release_cycle(sessions: sessionmaker[Session]) -> None:
    assert claim(sessions, "a").outcome == "claimed"
    assert claim(sessions, "b", tenant="other").outcome == "claimed"  # same key, other tenant
    with session_scope(sessions) as session:
        assert not idempotency.complete_idempotency_key(
            session, tenant="t", key="k", owner="b", status_code=202, headers={}, body={}
        )  # not b's hold
        assert idempotency.complete_idempotency_key(
            session,
            tenant="t",
            key="k",
            owner="a",
            status_code=202,
            headers={"location": "/x"},
            body={"id": 1},
        )
    done = claim(sessions, "c")
    assert done.outcome == "done" and done.existing is not None
    assert (done.existing.response_status, done.existing.response_body) == (202, {"id": 1})
    with session_scope(sessions) as session:
        assert not idempotency.release_idempotency_key(session, tenant="t", key="k", owner="c")
        assert idempotency.release_idempotency_key(session, tenant="t", key="k", owner="a")
    assert claim(sessions, "d").outcome == "claimed"


class FakeClock:
    """A monotonic clock the test moves by hand; ``time.monotonic``'s origin (boot) is arbitrary too."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# 5 s: a process on a machine booted seconds ago (the purge used to wait until 600 s of uptime); 1e6: long up.
@pytest.mark.parametrize("uptime", [0.0, 5.0, PURGE_EVERY_S - 1.0, 1e6])
def test_expired_keys_are_purged_now_and_then(sessions: sessionmaker[Session], uptime: float) -> None:
    """Every PURGE_EVERY_S per process, on the way into a request, not on every request; the first chance
    after start purges whatever the clock reads."""
    clock = FakeClock(uptime)
    store = IdempotencyStore(sessions, clock=clock)
    for owner in ("a", "b"):
        assert claim(sessions, owner, key=owner).outcome == "claimed"
    with session_scope(sessions) as session:
        session.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.key == "a")
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert store.begin("t", "c", "POST /v1/jobs", "f").owner is not None  # purges on the way
    with session_scope(sessions) as session:
        assert sorted(session.scalars(select(IdempotencyRecord.key))) == ["b", "c"]
        session.execute(update(IdempotencyRecord).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert store.purge_now_and_then() == 0  # too soon after the last purge
    clock.now += PURGE_EVERY_S - 1.0
    assert store.purge_now_and_then() == 0  # still too soon
    clock.now += 1.0
    assert store.purge_now_and_then() == 2
