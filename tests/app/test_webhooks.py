"""Webhooks without a worker process: the SSRF guard (injected resolvers), signing, the API (webhook_url,
tenant default URL, secret), the outbox written when a job ends, and real deliveries made in this process to a
receiver on 127.0.0.1 (allowed through SECATEURS_WEBHOOK_ALLOW), verified with the spec-only verifier.

Real end-to-end delivery by the Celery worker of `secateurs serve` is in tests/e2e/test_webhooks.py.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app import auth
from app.cli import main as cli_main
from app.config import Settings
from app.db import jobs
from app.db import webhooks as store
from app.db.engine import init_db, make_engine, make_session_factory, session_scope
from app.db.tables import JobRecord, WebhookMessageRecord, utcnow
from app.main import create_app
from app.queue import DELIVER_WEBHOOK
from app.webhooks import delivery, signing
from app.webhooks.guard import (
    MAX_URL_LENGTH,
    AllowList,
    UnsafeWebhookUrl,
    check_url,
    forbidden_reason,
    system_resolver,
)
from tests.app.auth_helpers import ENGINES, bearer, database_url, succeed
from tests.app.helpers import (
    RUN_JOB,
    app_of,
    assert_problem,
    create_job,
    sent_tasks,
    upload_model,
)
from tests.webhook_receiver import Answer, Receiver, verify_standard_webhook

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1/32"


def resolving_to(*addresses: str) -> Callable[[str, int], list[str]]:
    return lambda host, port: list(addresses)


def no_resolution(host: str, port: int) -> list[str]:
    raise AssertionError(f"the guard resolved {host} although the URL is refused by its syntax")


# --- the guard ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.1.2.3", "private (RFC 1918)"),
        ("172.16.0.1", "private (RFC 1918)"),
        ("172.31.255.254", "private (RFC 1918)"),
        ("192.168.1.1", "private (RFC 1918)"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("168.63.129.16", "cloud metadata"),  # Azure's, a public address
        ("100.100.100.200", "cloud metadata"),
        ("100.64.0.1", "CGNAT"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("fd12:3456::1", "unique local"),
        ("fec0::1", "site-local"),
        ("::ffff:10.0.0.1", "IPv4 10.0.0.1 inside IPv6, which is private"),
        ("::ffff:127.0.0.1", "IPv4 127.0.0.1 inside IPv6, which is loopback"),
        ("64:ff9b::7f00:1", "IPv4 127.0.0.1 inside IPv6, which is loopback"),  # NAT64
        ("2002:c0a8:101::1", "IPv4 192.168.1.1 inside IPv6, which is private"),  # 6to4
        ("::a00:1", "IPv4 10.0.0.1 inside IPv6"),  # IPv4-compatible (deprecated)
        ("192.0.2.10", "not globally reachable"),  # documentation
        ("198.18.0.1", "not globally reachable"),  # benchmarking
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
    ],
)
def test_refused_addresses_are_named(address: str, why: str) -> None:
    with pytest.raises(UnsafeWebhookUrl) as refused:
        check_url("https://hooks.example.com/in", AllowList(), resolving_to(address))
    message = str(refused.value)
    assert why in message and "SECATEURS_WEBHOOK_ALLOW" in message
    assert f"host hooks.example.com resolves to {ipaddress.ip_address(address).compressed}, which" in message


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_a_checked_url_is_pinned_to_the_address_that_was_checked() -> None:
    target = check_url(
        "https://Hooks.Example.com/in/x?token=1#frag", AllowList(), resolving_to("93.184.216.34")
    )
    assert target.connect_url == "https://93.184.216.34:443/in/x?token=1"
    assert target.host_header == "hooks.example.com"
    assert target.request_extensions == {"sni_hostname": "hooks.example.com"}  # TLS checks the real name
    v6 = check_url("http://hooks.example.com:8080/", AllowList(), resolving_to("2606:4700:4700::1111"))
    assert v6.connect_url == "http://[2606:4700:4700::1111]:8080/"
    assert v6.host_header == "hooks.example.com:8080" and v6.request_extensions == {}


def test_every_address_a_host_resolves_to_must_be_public() -> None:
    """A name with one public and one private record is refused: the connection could pick either."""
    with pytest.raises(UnsafeWebhookUrl, match=r"resolves to 10\.0\.0\.7, which is private"):
        check_url("https://hooks.example.com/", AllowList(), resolving_to("93.184.216.34", "10.0.0.7"))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("file:///etc/passwd", "only http:// and https://"),
        ("ftp://hooks.example.com/x", "only http:// and https://"),
        ("gopher://hooks.example.com:70/_x", "only http:// and https://"),
        ("javascript:alert(1)", "only http:// and https://"),
        ("hooks.example.com/x", "only http:// and https://"),
        ("http://user:secret@hooks.example.com/", "user name or password"),
        ("https://token@hooks.example.com/", "user name or password"),
        ("http:///no-host", "no host"),
        ("http://hooks.example.com:70000/", "port 70000 does not exist"),
        ("http://hooks.example.com/a b", "whitespace or control"),
        ("http://hooks.example.com/\r\nX-Injected: 1", "whitespace or control"),
        ("https://hooks.example.com/" + "a" * MAX_URL_LENGTH, f"at most {MAX_URL_LENGTH}"),
        ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata service"),
    ],
)
def test_url_syntax_rules_refuse_before_any_lookup(url: str, says: str) -> None:
    with pytest.raises(UnsafeWebhookUrl, match=says.replace("(", r"\(").replace(")", r"\)")):
        check_url(url, AllowList(), no_resolution)


@pytest.mark.parametrize(
    "url",
    ["http://localhost:8080/", "http://0x7f.1/", "http://2130706433/", "http://127.1/", "http://[::1]/"],
)
def test_spellings_of_loopback_are_caught_after_resolution(url: str) -> None:
    """The check runs on what the resolver returns, so numeric tricks the resolver understands fail too."""
    with pytest.raises(UnsafeWebhookUrl, match="loopback"):
        check_url(url, AllowList(), system_resolver)


def test_a_host_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(UnsafeWebhookUrl, match="does not resolve"):
        check_url("https://nothing.invalid/", AllowList(), system_resolver)  # RFC 2606: never resolves


def test_the_allow_list_permits_networks_and_host_names_only() -> None:
    allow = AllowList.parse(" 127.0.0.1/32, hooks.internal., 10.20.0.0/16 ,")
    assert (
        check_url("http://anything.test:9/", allow, resolving_to("127.0.0.1")).address.compressed
        == "127.0.0.1"
    )
    assert check_url("http://hooks.internal/", allow, resolving_to("192.168.9.9")).host == "hooks.internal"
    assert check_url("http://x.test/", allow, resolving_to("10.20.3.4")).port == 80
    with pytest.raises(UnsafeWebhookUrl, match="loopback"):
        check_url("http://anything.test/", allow, resolving_to("127.0.0.2"))
    with pytest.raises(UnsafeWebhookUrl, match="private"):
        check_url("http://other.internal/", allow, resolving_to("192.168.9.9"))
    with pytest.raises(UnsafeWebhookUrl, match="only http"):  # the allow-list never relaxes the syntax rules
        check_url("file://hooks.internal/x", allow, no_resolution)


@pytest.mark.parametrize("bad", ["not a host!", "10.0.0.0/33", "1.2.3", "http://x.test"])
def test_a_bad_allow_list_refuses_to_start(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SECATEURS_WEBHOOK_ALLOW entry"):
        Settings(data_dir=tmp_path, webhook_allow=f"127.0.0.1/32,{bad}")


# --- signing ------------------------------------------------------------------------------------------------

SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID, SPEC_TS, SPEC_BODY = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="  # the Standard Webhooks spec's example


def test_signatures_match_the_specs_published_example() -> None:
    assert signing.sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE
    # ...and so does the test receiver's independent verifier, which the delivery tests rely on.
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TS), "webhook-signature": SPEC_SIGNATURE}
    assert verify_standard_webhook(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS) == {"test": 2432232314}
    with pytest.raises(AssertionError):
        verify_standard_webhook(SPEC_SECRET, headers, SPEC_BODY.replace(b"2", b"3"), now=SPEC_TS)
    with pytest.raises(AssertionError, match="stale"):
        verify_standard_webhook(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 301)


def test_secrets_are_whsec_and_32_random_bytes_and_rotation_signs_twice() -> None:
    one, two = signing.new_secret(), signing.new_secret()
    assert one.startswith("whsec_") and len(base64.b64decode(one[6:])) == 32 and one != two
    headers = signing.headers("msg_1", 1700000000, b"{}", [one, two])
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == "1700000000"
    for secret in (one, two):
        verify_standard_webhook(secret, headers, b"{}", now=1700000000)
    with pytest.raises(AssertionError):
        verify_standard_webhook(signing.new_secret(), headers, b"{}", now=1700000000)


# --- the API ------------------------------------------------------------------------------------------------


@pytest.fixture
def hooks_settings(data_dir: Path) -> Settings:
    """Loopback allowed (the receiver), retries 50 ms apart, 2 s timeouts."""
    return Settings(
        data_dir=data_dir,
        min_free_bytes=0,
        webhook_allow=LOOPBACK,
        webhook_backoff_s=0.05,
        webhook_timeout_s=2,
        webhook_max_attempts=3,
    )


@pytest.fixture
def hooks(hooks_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(hooks_settings)) as test_client:
        yield test_client


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def job_count(app: FastAPI) -> int:
    with session_scope(app.state.session_factory) as session:
        return session.query(JobRecord).count()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is loopback"),
        ("http://localhost/hook", "resolves to"),
        ("http://10.0.0.1/hook", "private (RFC 1918)"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://[fd00:ec2::254]/", "cloud metadata"),
        ("file:///etc/passwd", "only http:// and https://"),
        ("https://admin:pw@hooks.example.com/", "user name or password"),
    ],
)
def test_create_refuses_unsafe_webhook_urls_with_422(client: TestClient, url: str, says: str) -> None:
    model_id = upload_model(client)["id"]
    response = client.post(
        "/v1/jobs", json={"model_id": model_id, "spec": {"target_sparsity": 0.5}, "webhook_url": url}
    )
    body = assert_problem(response, 422)
    assert body["detail"].startswith("webhook_url is refused: ") and says in body["detail"]
    assert body["errors"][0]["loc"] == "webhook_url"
    assert job_count(app_of(client)) == 0
    assert not [t for t in sent_tasks(app_of(client).state.settings) if t.task == RUN_JOB]


def test_create_refuses_an_overlong_url(client: TestClient) -> None:
    model_id = upload_model(client)["id"]
    url = "https://hooks.example.com/" + "a" * MAX_URL_LENGTH
    body = assert_problem(
        client.post(
            "/v1/jobs", json={"model_id": model_id, "spec": {"target_sparsity": 0.5}, "webhook_url": url}
        ),
        422,
    )
    assert body["errors"][0]["loc"] == "webhook_url"


def test_an_allowed_url_is_kept_on_the_job(hooks: TestClient, receiver: Receiver) -> None:
    model_id = upload_model(hooks)["id"]
    job = create_job(hooks, model_id, webhook_url=receiver.url())
    assert job["webhook_url"] == receiver.url()
    assert job["webhook_status"] is None and job["webhook_id"] is None and job["webhook_deliveries"] == []
    listed = hooks.get("/v1/jobs").json()["items"][0]
    assert listed["webhook_url"] == receiver.url() and listed["webhook_deliveries"] == []


def test_tenant_default_url_applies_to_new_jobs_unless_null(hooks: TestClient, receiver: Receiver) -> None:
    assert hooks.get("/v1/webhooks").json() == {"default_url": None}
    refused = assert_problem(hooks.put("/v1/webhooks", json={"default_url": "http://10.9.9.9/"}), 422)
    assert "default_url is refused" in refused["detail"] and "private" in refused["detail"]
    assert hooks.put("/v1/webhooks", json={"default_url": receiver.url("/d")}).json() == {
        "default_url": receiver.url("/d")
    }
    model_id = upload_model(hooks)["id"]
    assert create_job(hooks, model_id)["webhook_url"] == receiver.url("/d")
    assert create_job(hooks, model_id, webhook_url=receiver.url("/own"))["webhook_url"] == receiver.url(
        "/own"
    )
    assert create_job(hooks, model_id, webhook_url=None)["webhook_url"] is None  # explicit opt-out
    assert hooks.put("/v1/webhooks", json={"default_url": None}).json() == {"default_url": None}
    assert create_job(hooks, model_id)["webhook_url"] is None
    assert_problem(hooks.put("/v1/webhooks", json={"default_url": None, "other": 1}), 422)


def test_secret_is_made_once_rotated_and_never_cached(client: TestClient) -> None:
    first = client.get("/v1/webhooks/secret")
    assert first.status_code == 200 and first.headers["cache-control"] == "no-store"
    secret = first.json()["secret"]
    assert secret.startswith("whsec_") and first.json()["previous_secret_expires_at"] is None
    assert client.get("/v1/webhooks/secret").json()["secret"] == secret
    rotated = client.post("/v1/webhooks/secret/rotate")
    assert rotated.headers["cache-control"] == "no-store"
    body = rotated.json()
    assert body["secret"] != secret and body["secret"].startswith("whsec_")
    expires = body["previous_secret_expires_at"]
    assert expires is not None
    with session_scope(app_of(client).state.session_factory) as session:
        record = store.tenant_webhook(session, "default")
        assert record is not None and record.previous_secret == secret
        assert store.signing_secrets(record, utcnow()) == [body["secret"], secret]
        assert store.signing_secrets(record, utcnow() + timedelta(hours=25)) == [body["secret"]]
    assert client.get("/v1/webhooks/secret").json() == body


def test_secrets_and_settings_belong_to_their_tenant(settings: Settings) -> None:
    _, acme = auth.create_key(settings, "acme")
    _, globex = auth.create_key(settings, "globex")
    with TestClient(create_app(settings)) as client:
        for path, method in (
            ("/v1/webhooks", "GET"),
            ("/v1/webhooks/secret", "GET"),
            ("/v1/webhooks/secret/rotate", "POST"),
            ("/v1/webhooks", "PUT"),
        ):
            kwargs: dict[str, Any] = {"json": {"default_url": None}} if method == "PUT" else {}
            assert_problem(client.request(method, path, **kwargs), 401)
        a = client.get("/v1/webhooks/secret", headers=bearer(acme)).json()["secret"]
        g = client.get("/v1/webhooks/secret", headers=bearer(globex)).json()["secret"]
        assert a != g
        client.post("/v1/webhooks/secret/rotate", headers=bearer(globex))
        assert client.get("/v1/webhooks/secret", headers=bearer(acme)).json()["secret"] == a


# --- the outbox: a message when a job with a webhook ends --------------------------------------------------------


def message_of(app: FastAPI, job_id: str) -> WebhookMessageRecord | None:
    with session_scope(app.state.session_factory) as session:
        found = session.query(WebhookMessageRecord).filter_by(job_id=job_id).all()
        assert len(found) <= 1
        return found[0] if found else None


def test_a_message_is_written_once_when_a_job_with_a_url_ends(hooks: TestClient, receiver: Receiver) -> None:
    app = app_of(hooks)
    model_id = upload_model(hooks)["id"]
    with_url = create_job(hooks, model_id, webhook_url=receiver.url())["id"]
    without = create_job(hooks, model_id)["id"]
    assert message_of(app, with_url) is None  # nothing until it ends
    succeed(app, with_url)
    succeed(app, without)
    message = message_of(app, with_url)
    assert message is not None and message_of(app, without) is None
    assert (message.event_type, message.status, message.attempts, message.url) == (
        "job.succeeded",
        "pending",
        0,
        receiver.url(),
    )
    with session_scope(app.state.session_factory) as session:  # a second ending cannot happen, nor a message
        assert not jobs.finish_job(session, with_url, "failed", from_statuses=("running", "queued"))
    assert message_of(app, with_url).id == message.id  # type: ignore[union-attr]
    body = hooks.get(f"/v1/jobs/{with_url}").json()
    assert body["webhook_id"] == message.id and body["webhook_status"] == "pending"


def test_restart_recovery_failing_a_job_writes_its_message(hooks: TestClient, receiver: Receiver) -> None:
    app = app_of(hooks)
    job_id = create_job(hooks, upload_model(hooks)["id"], webhook_url=receiver.url())["id"]
    with session_scope(app.state.session_factory) as session:
        for _ in range(3):
            assert jobs.claim_job(session, job_id, lease_seconds=0, max_attempts=5).claimed
            session.execute(JobRecord.__table__.update().values(heartbeat_at=utcnow() - timedelta(hours=1)))
        jobs.recover_interrupted(session, max_attempts=3)
    message = message_of(app, job_id)
    assert message is not None and message.event_type == "job.failed"


def test_cancel_of_a_queued_job_publishes_its_webhook_at_once(hooks: TestClient, receiver: Receiver) -> None:
    app = app_of(hooks)
    model_id = upload_model(hooks)["id"]
    job_id = create_job(hooks, model_id, webhook_url=receiver.url())["id"]
    plain = create_job(hooks, model_id)["id"]
    canceled = hooks.post(f"/v1/jobs/{job_id}/cancel").json()
    assert canceled["status"] == "canceled" and canceled["webhook_status"] == "pending"
    hooks.post(f"/v1/jobs/{plain}/cancel")
    deliveries = [t for t in sent_tasks(app.state.settings) if t.task == DELIVER_WEBHOOK]
    assert [t.args for t in deliveries] == [[canceled["webhook_id"], 1]]


# --- delivering (in this process; the Celery task only wraps delivery.attempt) ---------------------------------


def retarget(client: TestClient, message_id: str, url: str) -> None:
    """Point a message at ``url`` as if it had been given at creation (where a real DNS lookup would fail
    for the reserved .test names the pinning tests resolve with an injected resolver)."""
    with session_scope(app_of(client).state.session_factory) as session:
        session.query(WebhookMessageRecord).filter_by(id=message_id).update({"url": url})


def ended_job(client: TestClient, url: str, how: str = "succeed") -> tuple[str, str]:
    """A job with webhook ``url`` that ended (succeeded by a worker's part, or canceled); (job id, message id)."""
    app = app_of(client)
    job_id = create_job(client, upload_model(client)["id"], webhook_url=url)["id"]
    if how == "succeed":
        succeed(app, job_id)
    else:
        client.post(f"/v1/jobs/{job_id}/cancel")
    message = message_of(app, job_id)
    assert message is not None
    return job_id, message.id


def attempt(client: TestClient, message_id: str, number: int, **kwargs: Any) -> delivery.Next | None:
    app = app_of(client)
    return delivery.attempt(app.state.settings, app.state.session_factory, message_id, number, **kwargs)


def secret_of(client: TestClient) -> str:
    return str(client.get("/v1/webhooks/secret").json()["secret"])


def test_a_delivery_is_signed_per_the_spec_and_carries_the_job_body(
    hooks: TestClient, receiver: Receiver
) -> None:
    job_id, message_id = ended_job(hooks, receiver.url("/hook?tenant=acme"))
    assert attempt(hooks, message_id, 1) is None
    (request,) = receiver.wait_for(1)
    secret = secret_of(hooks)  # made on the delivery's first need, shown afterwards
    payload = verify_standard_webhook(secret, request.headers, request.body)
    assert request.path == "/hook?tenant=acme"
    assert request.headers["webhook-id"] == message_id
    assert request.headers["content-type"] == "application/json"
    assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
    job = hooks.get(f"/v1/jobs/{job_id}").json()
    assert payload["type"] == "job.succeeded" and payload["timestamp"] == job["finished_at"]
    expected = {
        k: v for k, v in job.items() if k not in ("webhook_status", "webhook_deliveries", "expired_at")
    }
    assert payload["data"] == expected
    assert job["webhook_status"] == "delivered"
    (record,) = job["webhook_deliveries"]
    assert record["attempt"] == 1 and record["status_code"] == 200 and record["error"] is None
    assert record["next_retry_at"] is None and record["duration_ms"] >= 0
    # A redelivered Celery message for the same attempt (or a late duplicate) sends nothing.
    assert attempt(hooks, message_id, 1) is None and attempt(hooks, message_id, 2) is None
    time.sleep(0.2)
    assert len(receiver.requests) == 1


def test_a_failed_attempt_is_retried_with_the_same_id_after_the_backoff(hooks: TestClient) -> None:
    with Receiver([Answer(500)]) as receiver:
        job_id, message_id = ended_job(hooks, receiver.url(), how="cancel")
        retry = attempt(hooks, message_id, 1)
        assert retry is not None and retry.attempt == 2 and 0.05 <= retry.countdown <= 0.056
        pending = hooks.get(f"/v1/jobs/{job_id}").json()
        assert pending["webhook_status"] == "pending"
        (failed,) = pending["webhook_deliveries"]
        assert failed["status_code"] == 500 and failed["error"] == "HTTP 500" and failed["next_retry_at"]
        # Celery fired early (or a duplicate came): the same attempt is handed back with the time left.
        early = attempt(hooks, message_id, 2)
        assert early is not None and early.attempt == 2 and 0 <= early.countdown <= 0.06
        assert len(receiver.requests) == 1
        time.sleep(retry.countdown)
        assert attempt(hooks, message_id, 2) is None
        first, second = receiver.wait_for(2)
    secret = secret_of(hooks)
    assert verify_standard_webhook(secret, first.headers, first.body)["type"] == "job.canceled"
    verify_standard_webhook(secret, second.headers, second.body)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == message_id
    assert first.body == second.body
    job = hooks.get(f"/v1/jobs/{job_id}").json()
    assert job["webhook_status"] == "delivered"
    assert [(d["attempt"], d["status_code"]) for d in job["webhook_deliveries"]] == [(1, 500), (2, 200)]


def test_410_gone_stops_and_attempts_are_capped(hooks: TestClient) -> None:
    with Receiver([Answer(410)]) as receiver:
        job_id, message_id = ended_job(hooks, receiver.url())
        assert attempt(hooks, message_id, 1) is None
        assert hooks.get(f"/v1/jobs/{job_id}").json()["webhook_status"] == "gone"
    with Receiver([Answer(503), Answer(429), Answer(400)]) as receiver:  # max attempts is 3 here
        job_id, message_id = ended_job(hooks, receiver.url())
        number = 1
        while (step := attempt(hooks, message_id, number)) is not None:
            time.sleep(step.countdown)
            number = step.attempt
        assert len(receiver.requests) == 3
    job = hooks.get(f"/v1/jobs/{job_id}").json()
    assert job["webhook_status"] == "failed"
    assert [d["status_code"] for d in job["webhook_deliveries"]] == [503, 429, 400]
    assert job["webhook_deliveries"][-1]["next_retry_at"] is None


def test_redirects_are_not_followed(hooks: TestClient) -> None:
    with Receiver() as elsewhere, Receiver([Answer(307, {"Location": elsewhere.url("/x")})]) as receiver:
        job_id, message_id = ended_job(hooks, receiver.url())
        assert attempt(hooks, message_id, 1) is not None  # a retry, not a success
        time.sleep(0.2)
        assert len(receiver.requests) == 1 and elsewhere.requests == []
    (record,) = hooks.get(f"/v1/jobs/{job_id}").json()["webhook_deliveries"]
    assert record["status_code"] == 307 and "redirects are not followed" in record["error"]


def test_timeouts_and_refused_connections_are_failed_attempts(hooks_settings: Settings) -> None:
    hooks_settings.webhook_timeout_s = 0.5
    with TestClient(create_app(hooks_settings)) as client:
        with Receiver([Answer(200, delay_s=1.5)]) as slow:
            job_id, message_id = ended_job(client, slow.url())
            assert attempt(client, message_id, 1) is not None
        (record,) = client.get(f"/v1/jobs/{job_id}").json()["webhook_deliveries"]
        assert record["status_code"] is None and record["error"].startswith("no answer within 0.5 s")

        with Receiver([Answer(200, body_delay_s=1.5)]) as dawdler:  # 200 at once, its body comes late
            job_id, message_id = ended_job(client, dawdler.url())
            assert attempt(client, message_id, 1) is None
        assert client.get(f"/v1/jobs/{job_id}").json()["webhook_status"] == "delivered"

        closed = Receiver()
        closed.server.server_close()  # the port is free: nothing listens
        job_id, message_id = ended_job(client, closed.url())
        assert attempt(client, message_id, 1) is not None
        (record,) = client.get(f"/v1/jobs/{job_id}").json()["webhook_deliveries"]
        assert record["status_code"] is None and record["error"].startswith("ConnectError")


def test_the_url_is_checked_again_at_delivery_time(hooks: TestClient, receiver: Receiver) -> None:
    """DNS rebinding: the name passed at creation, and now resolves to a private address: nothing is sent."""
    job_id, message_id = ended_job(hooks, receiver.url())
    retarget(hooks, message_id, receiver.url(host="hooks.example.test"))  # which now resolves privately
    assert attempt(hooks, message_id, 1, resolver=resolving_to("10.0.0.7")) is not None
    (record,) = hooks.get(f"/v1/jobs/{job_id}").json()["webhook_deliveries"]
    assert record["status_code"] is None
    assert record["error"].startswith(
        "not sent: host hooks.example.test resolves to 10.0.0.7, which is private"
    )
    # The same name resolving to the allowed loopback: the request goes to the address that was checked
    # (hooks.example.test is in no DNS), with the name in Host.
    time.sleep(0.06)
    assert attempt(hooks, message_id, 2, resolver=resolving_to("127.0.0.1")) is None
    (request,) = receiver.wait_for(1)
    assert request.headers["host"] == f"hooks.example.test:{receiver.port}"


def test_an_attempt_whose_worker_died_is_resolved_and_the_next_one_made(
    hooks: TestClient, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, message_id = ended_job(hooks, receiver.url())
    app = app_of(hooks)
    with session_scope(app.state.session_factory) as session:  # a worker claims attempt 1, then dies
        claim = store.claim_attempt(session, message_id, 1, max_attempts=3, stale_after_s=120)
        assert claim.outcome == "claimed"
    assert attempt(hooks, message_id, 1) is None  # not stale yet: Celery's redelivery must not send it again
    assert receiver.requests == []
    monkeypatch.setattr(delivery, "stale_after_s", lambda settings: 0.0)
    assert attempt(hooks, message_id, 1) is None  # now it is: attempt 1 recorded as interrupted, 2 made
    receiver.wait_for(1)
    job = hooks.get(f"/v1/jobs/{job_id}").json()
    assert [(d["attempt"], d["status_code"], d["error"]) for d in job["webhook_deliveries"]] == [
        (1, None, store.INTERRUPTED),
        (2, 200, None),
    ]


def test_after_a_rotation_deliveries_verify_with_either_secret(hooks: TestClient, receiver: Receiver) -> None:
    old = secret_of(hooks)
    new = hooks.post("/v1/webhooks/secret/rotate").json()["secret"]
    _, message_id = ended_job(hooks, receiver.url())
    attempt(hooks, message_id, 1)
    (request,) = receiver.wait_for(1)
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        verify_standard_webhook(secret, request.headers, request.body)


def test_the_sweep_republishes_what_is_still_to_be_sent(hooks: TestClient, receiver: Receiver) -> None:
    app = app_of(hooks)
    _, unsent = ended_job(hooks, receiver.url())  # its first attempt was never published
    with Receiver([Answer(500)]) as failing:
        _, retrying = ended_job(hooks, failing.url())
        assert (
            attempt(hooks, retrying, 1) is not None
        )  # its retry would be held by a worker that then stopped
    _, done = ended_job(hooks, receiver.url())
    attempt(hooks, done, 1)
    queue = app.state.settings.broker_dir / "queue"
    for path in queue.glob("*.msg"):
        path.unlink()
    assert delivery.sweep(app.state.settings, app.state.session_factory, app.state.celery) == 2
    published = {}
    for path in queue.glob("*.msg"):
        envelope = json.loads(path.read_text())
        assert envelope["headers"]["task"] == DELIVER_WEBHOOK
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        published[args[0]] = (args[1], envelope["headers"]["eta"])
    assert set(published) == {unsent, retrying}
    assert published[unsent] == (1, None) and published[retrying][0] == 2


def test_https_deliveries_verify_the_certificate_of_the_name_not_the_pinned_ip(
    hooks: TestClient, tmp_path: Path
) -> None:
    """TLS to the pinned 127.0.0.1 still presents and checks the URL's name (SNI, hostname verification)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=hooks.example.test",
            "-addext",
            "subjectAltName=DNS:hooks.example.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    pin = resolving_to("127.0.0.1")
    with Receiver(tls=server_tls) as receiver:
        job_id, message_id = ended_job(hooks, receiver.url())
        retarget(hooks, message_id, receiver.url(host="hooks.example.test", scheme="https"))
        assert attempt(hooks, message_id, 1, resolver=pin, verify=trust) is None
        (request,) = receiver.wait_for(1)
        assert request.headers["host"] == f"hooks.example.test:{receiver.port}"
        # The same server under another name: its certificate does not match, so nothing is delivered.
        job_id, message_id = ended_job(hooks, receiver.url())
        retarget(hooks, message_id, receiver.url(host="other.example.test", scheme="https"))
        assert attempt(hooks, message_id, 1, resolver=pin, verify=trust) is not None
        (record,) = hooks.get(f"/v1/jobs/{job_id}").json()["webhook_deliveries"]
        assert record["status_code"] is None and "ConnectError" in record["error"]
        assert len(receiver.requests) == 1


# --- the worker's task module and the admin CLI -------------------------------------------------------------------


def test_the_delivery_task_imports_no_tensorflow() -> None:
    code = (
        "import sys, worker.webhook_tasks as t; from app.queue import DELIVER_WEBHOOK; "
        "assert t.deliver_webhook.name == DELIVER_WEBHOOK; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_cli_shows_rotates_and_sets_the_url(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SECATEURS_DATA_DIR", "SECATEURS_WEBHOOK_ALLOW"):
        monkeypatch.delenv(name, raising=False)
    admin = ["--data-dir", str(data_dir), "--json"]
    assert cli_main(["webhooks", "secret", "--tenant", "acme", *admin]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tenant"] == "acme" and shown["secret"].startswith("whsec_")
    assert cli_main(["webhooks", "secret", "--tenant", "acme", *admin]) == 0
    assert json.loads(capsys.readouterr().out)["secret"] == shown["secret"]
    assert cli_main(["webhooks", "secret", "--tenant", "acme", "--rotate", "--data-dir", str(data_dir)]) == 0
    text = capsys.readouterr().out
    assert "whsec_" in text and shown["secret"] not in text and "previous secret also signs" in text
    assert cli_main(["webhooks", "secret", "--tenant", "Not A Tenant", *admin]) == 2

    assert cli_main(["webhooks", "set-url", "--tenant", "acme", "http://127.0.0.1/hook", *admin]) == 2
    assert "127.0.0.1 is loopback" in capsys.readouterr().err
    monkeypatch.setenv("SECATEURS_WEBHOOK_ALLOW", LOOPBACK)
    assert cli_main(["webhooks", "set-url", "--tenant", "acme", "http://127.0.0.1/hook", *admin]) == 0
    assert json.loads(capsys.readouterr().out) == {"tenant": "acme", "default_url": "http://127.0.0.1/hook"}
    assert cli_main(["webhooks", "set-url", "--tenant", "acme", "--clear", *admin]) == 0
    assert json.loads(capsys.readouterr().out)["default_url"] is None
    assert cli_main(["webhooks", "set-url", "--tenant", "acme", *admin]) == 2  # neither URL nor --clear


# --- the store on both engines ------------------------------------------------------------------------------------


@pytest.fixture(params=ENGINES)
def db_sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    for url in database_url(request, tmp_path):
        engine = make_engine(url)
        init_db(engine)
        try:
            yield make_session_factory(engine)
        finally:
            engine.dispose()


def test_store_secrets_claims_and_sweep_on_both_engines(db_sessions: sessionmaker[Session]) -> None:
    with session_scope(db_sessions) as session:
        first = store.tenant_webhook(session, "acme", "whsec_one")
        assert first is not None and first.secret == "whsec_one"
        again = store.tenant_webhook(session, "acme", "whsec_two")  # a racing creator: the first one stays
        assert again is not None and again.secret == "whsec_one"
        rotated = store.rotate_secret(session, "acme", "whsec_three", timedelta(hours=1))
        assert (rotated.secret, rotated.previous_secret) == ("whsec_three", "whsec_one")
        assert store.signing_secrets(rotated, utcnow()) == ["whsec_three", "whsec_one"]
        job = JobRecord(
            id="job_1",
            tenant="acme",
            model_id="mdl_1",
            spec={},
            status="running",
            progress=0.0,
            attempts=1,
            cancel_requested=False,
            webhook_url="https://hooks.example.com/",
        )
        session.add(job)
        session.flush()
        assert jobs.finish_job(session, "job_1", "failed", error={"code": "x", "message": "y"})
        message_id = store.unsent_message_id(session, "job_1")
        assert message_id is not None
    with session_scope(db_sessions) as session:
        assert store.claim_attempt(session, message_id, 2, max_attempts=3, stale_after_s=60).outcome == "done"
        claim = store.claim_attempt(session, message_id, 1, max_attempts=3, stale_after_s=60)
        assert claim.outcome == "claimed" and claim.attempt == 1
    with session_scope(db_sessions) as session:  # the same attempt again: already taken
        assert store.claim_attempt(session, message_id, 1, max_attempts=3, stale_after_s=60).outcome == "done"
        later = utcnow() + timedelta(minutes=5)
        assert store.record_result(
            session,
            message_id,
            1,
            outcome="retry",
            status_code=502,
            error="HTTP 502",
            duration_ms=3,
            next_retry_at=later,
        )
    with session_scope(db_sessions) as session:
        early = store.claim_attempt(session, message_id, 2, max_attempts=3, stale_after_s=60)
        assert early.outcome == "early" and early.due_at is not None
        assert abs((early.due_at - later).total_seconds()) < 1
        assert store.due_messages(session, max_attempts=3, stale_after_s=60) == [
            (message_id, 2, early.due_at)
        ]
        state = store.states_for_jobs(session, ["job_1", "job_2"])
        assert list(state) == ["job_1"] and state["job_1"].message.status == "pending"  # type: ignore[union-attr]
        assert [(d.attempt, d.status_code) for d in state["job_1"].deliveries] == [(1, 502)]
