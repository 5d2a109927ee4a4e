"""The corpus of malicious and broken inputs (``corpus.py``) posted over HTTP: every one gets a 4xx, or ends
``invalid`` (models) / ``failed`` (jobs), with a reason a person can act on, and the service stays healthy.

- ``test_api_refuses_every_bad_request``: the API-level corpus in-process (no TensorFlow, a second or two).
- ``test_corpus_against_a_real_server``: a real ``secateurs serve`` (the embedded default: API + worker child),
  the API-level corpus again over real HTTP, plus the inputs only a worker can judge: models that read or write
  files or run Python, a Lambda ``.keras``, a garbage ``saved_model.pb``, a zip whose headers lie about sizes,
  datasets that do not fit the model's signature, jobs on models that turn out hostile. Afterwards: /healthz
  and /readyz answer 200, the same worker process is alive (it never crashed or restarted), a normal model and
  job still work, nothing is left in ``data_dir/tmp`` or half-extracted, and the file the models aimed at is
  untouched.

Both print a table (input -> answer, code, reason). Every HTTP call has a timeout, every wait a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from tests.faults import corpus
from tests.faults.conftest import Server
from tests.support import model_factory
from tests.support.procs import wait_ready

PROBLEM_JSON = "application/problem+json"
MIN_CORPUS = 20
WAIT_S = 240.0  # for a verdict on a model or a job; the worker is warm after the first one
SECRET = b"the server's secret: never read or written by an uploaded model\n"


class _Http(Protocol):
    def request(self, method: str, url: str, **kwargs: Any) -> Any: ...


@dataclass
class Outcome:
    """What happened to one input: the HTTP answer, then (models, jobs) the final status and error."""

    name: str
    status: int
    verdict: str  # "refused" (4xx), "invalid", "failed", or what it ended as otherwise
    code: str  # problem type slug, or the record's error code
    reason: str
    problem: str | None = None  # what is wrong with this outcome; None = handled as required

    def row(self) -> str:
        mark = "ok  " if self.problem is None else "FAIL"
        return f"{mark} {self.status:3d} {self.verdict:8s} {self.code[:22]:22s} {self.name[:52]:52s} {self.reason[:110]}"


def judge(response: Any, name: str, expect: tuple[int, ...], reason: str) -> Outcome:
    """An immediate answer: a status in ``expect`` with a problem+json body whose detail says ``reason``."""
    body: dict[str, Any] = {}
    if response.headers.get("content-type", "").startswith(PROBLEM_JSON):
        body = response.json()
    detail = str(body.get("detail", ""))
    status = response.status_code
    verdict = "refused" if 400 <= status < 500 else f"HTTP {status}"
    outcome = Outcome(name, status, verdict, str(body.get("type", "")).rsplit("/", 1)[-1], detail)
    if status not in expect:
        outcome.problem = f"expected {expect}, got {status}: {response.text[:300]}"
    elif not body or body.get("status") != status or not detail.strip():
        outcome.problem = f"not a problem+json body with a detail: {response.text[:300]}"
    elif reason.lower() not in detail.lower():
        outcome.problem = f"the detail does not say {reason!r}"
    return outcome


def send(http: _Http, entry: corpus.BadRequest) -> Outcome:
    """Post one corpus request and judge the answer against ``entry``'s expectations."""
    response = http.request(entry.method, entry.path, **entry.request_kwargs())
    return judge(response, entry.name, entry.expect, entry.reason)


def report(outcomes: list[Outcome]) -> None:
    """Print the table and fail naming every input that was not handled as required."""
    print(f"\n{len(outcomes)} bad inputs:")
    for outcome in outcomes:
        print("  " + outcome.row())
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.verdict] = counts.get(outcome.verdict, 0) + 1
    print("  " + ", ".join(f"{verdict}: {n}" for verdict, n in sorted(counts.items())))
    failures = [f"{o.name}: {o.problem}" for o in outcomes if o.problem is not None]
    assert not failures, "\n".join(failures)
    assert len(outcomes) >= MIN_CORPUS


def leftovers(data_dir: Path) -> list[Path]:
    """Temp files of uploads in flight and half-built extractions: none may outlive a refused input."""
    tmp = [p for p in (data_dir / "tmp").iterdir()] if (data_dir / "tmp").is_dir() else []
    partial = list((data_dir / "models").glob("*/.*partial")) if (data_dir / "models").is_dir() else []
    return tmp + partial


# ----------------------------------------------------------------------------------------------------------
# in-process: the API-level corpus


def test_api_refuses_every_bad_request(corpus_client: TestClient, corpus_settings: Settings) -> None:
    model = corpus_client.post("/v1/models", files={"file": ("m.zip", corpus.zip_of(corpus.SAVED_MODEL))})
    assert model.status_code == 201, model.text
    outcomes = [send(corpus_client, entry) for entry in corpus.api_corpus(model.json()["id"])]
    report(outcomes)
    assert corpus_client.get("/healthz").status_code == 200
    assert corpus_client.get("/readyz").status_code == 200
    again = corpus_client.post("/v1/models", files={"file": ("m.zip", corpus.zip_of(corpus.SAVED_MODEL))})
    assert again.status_code == 201, again.text
    assert leftovers(corpus_settings.data_dir) == []


# ----------------------------------------------------------------------------------------------------------
# a real server with its worker


@dataclass
class Built:
    """What the e2e test uploads: a good model, fitting and misfitting datasets, and the hostile models."""

    good_zip: bytes
    train: bytes
    test: bytes
    misfit: bytes
    hostile: list[tuple[corpus.HostileModel, bytes]]


def _build(root: Path, secret: Path) -> Built:
    saved = model_factory.build_tf_module(root / "good" / "saved_model", steps=100)
    good_zip = model_factory.zip_saved_model(saved, root / "good" / "model.zip").read_bytes()
    train, test = model_factory.digits_datasets(flat=True)
    misfit = {"x": train["x"][:, :32], "y": train["y"]}  # the model takes 64 features per sample
    hostile = []
    for i, model in enumerate(corpus.hostile_models(secret)):
        (root / f"hostile-{i}").mkdir()
        hostile.append((model, model.build(root / f"hostile-{i}")))
    return Built(
        good_zip,
        model_factory.npz_bytes(train),
        model_factory.npz_bytes(test),
        model_factory.npz_bytes(misfit),
        hostile,
    )


def _wait(http: httpx.Client, path: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        body: dict[str, Any] = http.get(path).json()
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


def _upload(http: httpx.Client, filename: str, data: bytes, kind: str = "models") -> dict[str, Any]:
    response = http.post(f"/v1/{kind}", files={"file": (filename, data)})
    assert response.status_code == 201, response.text
    return response.json()


def _ended(body: dict[str, Any]) -> bool:
    return body.get("status") not in ("validating", "queued", "running")


def _verdict(
    name: str, status: int, body: dict[str, Any], want: str, codes: tuple[str, ...], reason: str
) -> Outcome:
    """A model or job the API took (``status`` 201/202): it must end ``want`` with an error code in ``codes``
    and a message saying ``reason``."""
    error = body.get("error") or {}
    outcome = Outcome(name, status, body.get("status", "?"), error.get("code", ""), error.get("message", ""))
    if outcome.verdict != want:
        outcome.problem = f"expected {want!r}, ended {outcome.verdict!r}: {body}"
    elif outcome.code not in codes:
        outcome.problem = f"error code {outcome.code!r} is not one of {codes}"
    elif reason.lower() not in outcome.reason.lower():
        outcome.problem = f"the message does not say {reason!r}"
    return outcome


def _refused_or_failed(
    http: httpx.Client, name: str, body: dict[str, Any], codes: tuple[str, ...], reason: str
) -> Outcome:
    """A job on a model not judged yet: refused at once (422) if the verdict came first, else taken (202) and
    then failed with an error code in ``codes`` whose message says ``reason``."""
    response = http.post("/v1/jobs", json=body)
    if response.status_code == 202:
        job = _wait(http, response.headers["location"], _ended)
        return _verdict(name, 202, job, "failed", codes, reason)
    return judge(response, name, (422,), "")


@pytest.mark.e2e
@pytest.mark.tf
def test_corpus_against_a_real_server(embedded_server: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    built = _build(tmp_path / "models", secret)  # while the server boots
    wait_ready(embedded_server.url, [embedded_server.service], timeout=120)
    workers = embedded_server.worker_pids()
    assert len(workers) == 1, f"expected one embedded worker child, found {workers}"
    outcomes: list[Outcome] = []
    with embedded_server.client() as http:
        good = _upload(http, "good.zip", built.good_zip)
        good = _wait(http, f"/v1/models/{good['id']}", _ended)
        assert good["status"] == "ready", good
        train = _upload(http, "train.npz", built.train, "datasets")["id"]
        misfit = _upload(http, "misfit.npz", built.misfit, "datasets")["id"]

        outcomes += [send(http, entry) for entry in corpus.api_corpus(good["id"])]

        # Hostile models: taken (201), then judged by the worker. The first also gets a job at once, before
        # the worker has judged it: the job must fail (or be refused if the verdict came first).
        (first, first_data), *others = built.hostile
        first_id = _upload(http, first.filename, first_data)["id"]
        early = _refused_or_failed(
            http,
            "job on a file-reading model, posted before its verdict",
            {"model_id": first_id, "spec": {"target_sparsity": 0.5}},
            ("invalid_model",),
            first.reason,
        )
        pending = [(first, first_id)] + [(m, _upload(http, m.filename, data)["id"]) for m, data in others]
        for model, model_id in pending:
            body = _wait(http, f"/v1/models/{model_id}", _ended)
            outcomes.append(_verdict(model.name, 201, body, "invalid", model.codes, model.reason))
        outcomes.append(early)

        # Datasets that do not fit the signature: 422 once the model is ready; a failed job when the job was
        # posted while the model was still being validated (the API could not know yet).
        late = http.post(
            "/v1/jobs",
            json={"model_id": good["id"], "eval_dataset_id": misfit, "spec": {"target_sparsity": 0.5}},
        )
        outcomes.append(judge(late, "dataset shape != signature (model ready)", (422,), "expects shape"))
        fresh = _upload(http, "good-again.zip", built.good_zip)
        outcomes.append(
            _refused_or_failed(
                http,
                "dataset shape != signature (model validating)",
                {"model_id": fresh["id"], "eval_dataset_id": misfit, "spec": {"target_sparsity": 0.5}},
                ("dataset_mismatch", "input_mismatch"),
                "shape",
            )
        )
        report(outcomes)

        # The service after all of them.
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert embedded_server.worker_pids() == workers, "the worker process died or was restarted"
        normal = _upload(http, "normal.zip", built.good_zip)
        normal = _wait(http, f"/v1/models/{normal['id']}", _ended)
        assert normal["status"] == "ready", normal
        test = _upload(http, "test.npz", built.test, "datasets")["id"]
        # `(a+)+$` is the textbook catastrophic regex; variable names are short, so it is accepted and the job
        # must still finish (a hang would hit WAIT_S).
        spec = {"target_sparsity": 0.5, "include": ["(a+)+$", "_w"]}
        job = http.post(
            "/v1/jobs",
            json={"model_id": normal["id"], "train_dataset_id": train, "eval_dataset_id": test, "spec": spec},
        )
        assert job.status_code == 202, job.text
        job_body = _wait(http, job.headers["location"], _ended)
        assert job_body["status"] == "succeeded", job_body
    assert leftovers(embedded_server.data_dir) == []
    assert secret.read_bytes() == SECRET, "an uploaded model wrote to the server's file"
