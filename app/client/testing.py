"""An in-memory Secateurs service for your own tests: no server, TensorFlow, network or sleeping.

:class:`FakeService` answers the routes :class:`~app.client.Client` uses through ``httpx.MockTransport``, with
the real API's status codes, headers and body shapes (problem+json errors included), so code that scripts
Secateurs can be tested in milliseconds (httpx's habit: the fake ships beside the real thing)::

    from app.client.testing import FakeService

    def test_my_pruning_script(tmp_path):
        service = FakeService()
        with service.client() as client:            # a Client on the fake, with a clock that never sleeps
            model = client.upload_model("model.zip")
            job = client.create_job(model.id, {"target_sparsity": 0.8}).wait()
            client.download_artifact(job.id, tmp_path / "pruned.zip")
        assert service.jobs[job.id]["status"] == "succeeded"

Nothing is pruned: every poll of a job moves it one step along ``steps`` (queued -> running through a few
stages -> succeeded), its artifact is a small placeholder zip and its metrics a made-up document of the real
shape. :meth:`FakeService.fail_job` makes a job end ``failed`` instead. Uploads are checked only as far as the
API's shape needs (file type; a dataset's arrays, read from the ``.npz`` headers): the fake does not validate
models or specs. Routes it does not implement answer 501 naming them.
"""

from __future__ import annotations

import ast
import base64
import email.parser
import email.policy
import hashlib
import io
import re
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from app.client.client import Client
from app.client.download import artifact_filename

__all__ = ["BASE_URL", "DEFAULT_STEPS", "FakeClock", "FakeService"]

BASE_URL = "http://secateurs.test"
PROBLEM_BASE = "https://secateurs.dev/problems/"
POLL_AFTER_S = 2  # the real API's Retry-After on create and cancel
# (status, stage, progress) a job shows on successive polls; the last one is where it ends.
DEFAULT_STEPS: tuple[tuple[str, str | None, float], ...] = (
    ("queued", None, 0.0),
    ("running", "loading", 0.05),
    ("running", "pruning", 0.5),
    ("running", "saving", 0.9),
    ("succeeded", None, 1.0),
)
_TITLES = {
    401: ("Unauthorized", "unauthorized"),
    403: ("Forbidden", "forbidden"),
    404: ("Not Found", "not-found"),
    409: ("Conflict", "conflict"),
    415: ("Unsupported Media Type", "unsupported-format"),
    422: ("Unprocessable Content", "unprocessable"),
    501: ("Not Implemented", "not-implemented"),
}
_MODEL_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".keras")
_DATASET_SUFFIXES = (
    (".npz", "npz"),
    (".tfrecord.gz", "tfrecord"),
    (".tfrecords", "tfrecord"),
    (".tfrecord", "tfrecord"),
    (".parquet", "parquet"),
    (".tar", "archive"),
    (".zip", "archive"),
)
_NPY_KINDS = {"f": "float", "i": "int", "u": "uint", "c": "complex"}


class FakeClock:
    """Monotonic time that moves only when the client sleeps, so waits (backoff, ``Retry-After``, timeouts)
    run at once and stay exact; ``sleeps`` records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _Problem(Exception):
    """An error answer, raised inside a route and rendered as the API renders it (RFC 9457)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}

    def response(self) -> httpx.Response:
        title, slug = _TITLES[self.status]
        body = {"type": PROBLEM_BASE + slug, "title": title, "status": self.status, "detail": self.detail}
        headers = {"Content-Type": "application/problem+json", **self.headers}
        return httpx.Response(self.status, json=body, headers=headers)


Route = Callable[..., httpx.Response]


class FakeService:
    """The service in memory. ``models``, ``datasets`` and ``jobs`` hold the JSON bodies it answers with (by
    id; edit them to set up a state), ``requests`` every request it got.

    ``steps``: the (status, stage, progress) a job shows on successive polls. ``artifact``: the bytes of every
    job's ``saved_model`` file (default: a small placeholder zip). ``metrics``: the metrics document of every
    job (``job_id``/``model_id``/``spec`` are filled in; default: a made-up one of the real shape).
    ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
    ``dataset_sources``: the prefixes datasets may be registered from by reference (every tenant's, the
    real server's SECATEURS_DATASET_SOURCES for "*"); None (the default) allows any s3:// or file:/// source,
    {} none (403, as an unconfigured server answers).

    Datasets other than a small ``.npz`` (other file kinds, references) start ``validating`` and are ``ready``
    on their next poll (their ``arrays`` stay unknown); :meth:`fail_dataset` makes one ``invalid`` instead. A job
    on a dataset still validating is refused with 409, on an invalid one with 422, as the real API does.
    """

    def __init__(
        self,
        *,
        steps: Sequence[tuple[str, str | None, float]] = DEFAULT_STEPS,
        artifact: bytes | None = None,
        metrics: dict[str, Any] | None = None,
        api_key: str | None = None,
        dataset_sources: dict[str, list[str]] | None = None,
    ) -> None:
        if not steps or steps[-1][0] not in ("succeeded", "failed", "canceled"):
            raise ValueError("steps must end with a succeeded, failed or canceled state")
        self.steps = tuple(steps)
        self.artifact = artifact if artifact is not None else _placeholder_zip()
        self.metrics = metrics
        self.api_key = api_key
        self.dataset_sources = dataset_sources
        self.models: dict[str, dict[str, Any]] = {}
        self.datasets: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self._step: dict[str, int] = {}
        self._ids = 0
        self._routes: list[tuple[str, re.Pattern[str], Route]] = [
            (method, re.compile(pattern), route)
            for method, pattern, route in (
                ("POST", r"/v1/models", self._upload_model),
                ("GET", r"/v1/models", self._list(self.models)),
                ("GET", r"/v1/models/(?P<id>[^/]+)", self._get_model),
                ("DELETE", r"/v1/models/(?P<id>[^/]+)", self._delete_model),
                ("POST", r"/v1/datasets", self._upload_dataset),
                ("GET", r"/v1/datasets", self._list(self.datasets)),
                ("GET", r"/v1/datasets/(?P<id>[^/]+)", self._get_dataset),
                ("DELETE", r"/v1/datasets/(?P<id>[^/]+)", self._delete_dataset),
                ("POST", r"/v1/jobs", self._create_job),
                ("GET", r"/v1/jobs", self._list(self.jobs)),
                ("GET", r"/v1/jobs/(?P<id>[^/]+)", self._get_job),
                ("POST", r"/v1/jobs/(?P<id>[^/]+)/cancel", self._cancel_job),
                ("GET", r"/v1/jobs/(?P<id>[^/]+)/metrics", self._get_metrics),
                ("GET", r"/v1/jobs/(?P<id>[^/]+)/report", self._get_report),
                ("GET", r"/v1/jobs/(?P<id>[^/]+)/artifacts", self._list_artifacts),
                ("GET", r"/v1/jobs/(?P<id>[^/]+)/artifact", self._download),
                ("GET", r"/v1/jobs/(?P<id>[^/]+)/artifacts/(?P<name>[^/]+)", self._download),
            )
        ]

    # --- what tests use -------------------------------------------------------------------------------------

    @property
    def transport(self) -> httpx.MockTransport:
        """For a Client you build yourself: ``Client(BASE_URL, transport=service.transport, ...)``."""
        return httpx.MockTransport(self.handle)

    def client(self, **kwargs: Any) -> Client:
        """A :class:`Client` on this service, with a :class:`FakeClock` unless ``clock`` is given."""
        kwargs.setdefault("clock", FakeClock())
        kwargs.setdefault("api_key", self.api_key)
        return Client(BASE_URL, transport=self.transport, **kwargs)

    def fail_job(self, job_id: str, code: str = "pruning_failed", message: str = "failed on purpose") -> None:
        """End the job ``failed`` with this error now (its next poll shows it; a wait raises JobFailed)."""
        self._end(self._job(job_id), "failed", {"code": code, "message": message})

    def fail_dataset(
        self, dataset_id: str, code: str = "bad_record", message: str = "invalid on purpose"
    ) -> None:
        """End a dataset's validation ``invalid`` with this error now (a wait raises DatasetInvalid)."""
        dataset = _found(self.datasets, dataset_id, "dataset")
        dataset.update(status="invalid", error={"code": code, "message": message}, progress=None)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one request (the ``MockTransport`` handler)."""
        self.requests.append(request)
        try:
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                raise _Problem(401, "missing or unknown API key", {"WWW-Authenticate": "Bearer"})
            for method, pattern, route in self._routes:
                match = pattern.fullmatch(request.url.path)
                if match and request.method == method:
                    return route(request, **match.groupdict())
            raise _Problem(501, f"FakeService does not implement {request.method} {request.url.path}")
        except _Problem as problem:
            return problem.response()

    # --- models and datasets --------------------------------------------------------------------------------

    def _upload_model(self, request: httpx.Request) -> httpx.Response:
        fields, filename, data = _multipart(request)
        if not filename.lower().endswith(_MODEL_SUFFIXES):
            raise _Problem(415, f"{filename!r} is not a .zip / .tar.gz SavedModel archive or a .keras file")
        model = {
            "id": self._new_id("mdl"),
            "name": fields.get("name") or filename,
            "format": "keras" if filename.lower().endswith(".keras") else "saved_model",
            "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "status": "validating",
            "created_at": _now(),
            "signatures": None,
            "params": None,
            "error": None,
        }
        self.models[model["id"]] = model
        return httpx.Response(201, json=model, headers={"Location": f"/v1/models/{model['id']}"})

    def _get_model(self, request: httpx.Request, id: str) -> httpx.Response:
        model = _found(self.models, id, "model")
        if model["status"] == "validating":  # a worker "loads" it between two polls
            model.update(status="ready", signatures={"serving_default": {"inputs": {}, "outputs": {}}})
        return httpx.Response(200, json=model)

    def _delete_model(self, request: httpx.Request, id: str) -> httpx.Response:
        _found(self.models, id, "model")
        if any(j["model_id"] == id and j["status"] in ("queued", "running") for j in self.jobs.values()):
            raise _Problem(409, f"model {id} is used by a queued or running job; cancel it first")
        del self.models[id]
        return httpx.Response(204)

    def _upload_dataset(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("content-type", "").startswith("application/json"):
            return self._register_dataset(request)
        fields, filename, data = _multipart(request)
        kind = next((k for suffix, k in _DATASET_SUFFIXES if filename.lower().endswith(suffix)), None)
        if kind is None:
            raise _Problem(
                415, f"{filename!r} is not an .npz, .tfrecord(.gz), .tfrecords, .parquet, .tar or .zip"
            )
        description = _json_field(fields.get("description"), "description")
        dataset = self._new_dataset(
            name=fields.get("name") or filename,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        if kind == "npz":
            arrays = _npz_arrays(data)
            first = next((a for name, a in arrays.items() if name == "x" or name.startswith("x.")), None)
            first = first or next(iter(arrays.values()))
            dataset.update(arrays=arrays, n_samples=first["shape"][0] if first["shape"] else 0)
        else:
            fmt = description.get("format") or (_archive_format(data) if kind == "archive" else kind)
            dataset.update(format=fmt, status="validating", progress=0.0)
        self.datasets[dataset["id"]] = dataset
        return httpx.Response(201, json=dataset, headers={"Location": f"/v1/datasets/{dataset['id']}"})

    def _register_dataset(self, request: httpx.Request) -> httpx.Response:
        body = _json_object(request)
        source, fmt = body.get("source"), body.get("format")
        if not isinstance(source, str) or not source.startswith(("s3://", "file:///")) or ".." in source:
            raise _Problem(422, f"source {source!r} is not an s3://bucket/... or file:///abs/... URI")
        if fmt not in ("npz", "tfrecord", "parquet", "image_folder"):
            raise _Problem(422, f"format {fmt!r} is not one of npz, tfrecord, parquet, image_folder")
        if self.dataset_sources is not None:
            prefixes = [p for ps in self.dataset_sources.values() for p in ps]
            folder = source if source.endswith("/") else source + "/"
            if not any(folder.startswith(p) for p in prefixes):
                raise _Problem(
                    403, f"the source {source!r} is not under a prefix SECATEURS_DATASET_SOURCES allows"
                )
        dataset = self._new_dataset(name=body.get("name") or source, size_bytes=None, sha256=None)
        dataset.update(format=fmt, source=source, status="validating", progress=0.0)
        self.datasets[dataset["id"]] = dataset
        return httpx.Response(201, json=dataset, headers={"Location": f"/v1/datasets/{dataset['id']}"})

    def _new_dataset(self, *, name: str, size_bytes: int | None, sha256: str | None) -> dict[str, Any]:
        return {
            "id": self._new_id("ds"),
            "name": name,
            "format": "npz",
            "source": None,
            "status": "ready",
            "size_bytes": size_bytes,
            "sha256": sha256,
            "arrays": None,
            "n_samples": None,
            "shards": None,
            "features": None,
            "class_names": None,
            "error": None,
            "progress": None,
            "created_at": _now(),
        }

    def _get_dataset(self, request: httpx.Request, id: str) -> httpx.Response:
        dataset = _found(self.datasets, id, "dataset")
        if dataset["status"] in ("validating", "converting"):  # a worker "reads" it between two polls
            dataset.update(status="ready", progress=1.0, shards=1)
        return httpx.Response(200, json=dataset)

    def _delete_dataset(self, request: httpx.Request, id: str) -> httpx.Response:
        _found(self.datasets, id, "dataset")
        del self.datasets[id]
        return httpx.Response(204)

    def _list(self, items: dict[str, dict[str, Any]]) -> Route:
        """Newest first, ``{"items", "next_cursor"}`` pages (the cursor is an offset here), job filters."""

        def route(request: httpx.Request) -> httpx.Response:
            query = request.url.params
            rows = [
                row
                for row in reversed(items.values())
                if all(row.get(key) == query[key] for key in ("status", "model_id") if key in query)
            ]
            start, limit = int(query.get("cursor", 0)), min(int(query.get("limit", 50)), 200)
            more = start + limit < len(rows)
            page = {"items": rows[start : start + limit], "next_cursor": str(start + limit) if more else None}
            return httpx.Response(200, json=page)

        return route

    # --- jobs -----------------------------------------------------------------------------------------------

    def _create_job(self, request: httpx.Request) -> httpx.Response:
        body = _json_object(request)
        if not isinstance(body.get("spec"), dict):
            raise _Problem(422, "the body needs a 'spec' object (the pruning spec)")
        _found(self.models, str(body.get("model_id")), "model")
        for role in ("train_dataset_id", "eval_dataset_id", "calibration_dataset_id"):
            if body.get(role) is not None:
                dataset = _found(self.datasets, str(body[role]), "dataset")
                if dataset["status"] in ("validating", "converting"):
                    raise _Problem(
                        409, f"dataset {dataset['id']} is {dataset['status']}; wait until its status is ready"
                    )
                if dataset["status"] == "invalid":
                    reason = (dataset.get("error") or {}).get("message", "unknown reason")
                    raise _Problem(422, f"dataset {dataset['id']} is invalid and cannot be used: {reason}")
        job_id = self._new_id("job")
        status, stage, progress = self.steps[0]
        self.jobs[job_id] = {
            "id": job_id,
            "model_id": body["model_id"],
            "train_dataset_id": body.get("train_dataset_id"),
            "eval_dataset_id": body.get("eval_dataset_id"),
            "calibration_dataset_id": body.get("calibration_dataset_id"),
            "status": status,
            "stage": stage,
            "progress": progress,
            "attempts": 0,
            "cancel_requested": False,
            "created_at": _now(),
            "started_at": None,
            "finished_at": None,
            "error": None,
            "spec": body["spec"],
            "webhook_url": body.get("webhook_url"),
            "webhook_id": None,
            "webhook_status": None,
            "webhook_deliveries": [],
            "expired_at": None,
            "links": {
                "self": f"/v1/jobs/{job_id}",
                "metrics": f"/v1/jobs/{job_id}/metrics",
                "artifact": f"/v1/jobs/{job_id}/artifact",
                "report": f"/v1/jobs/{job_id}/report",
            },
        }
        self._step[job_id] = 0
        return self._job_answer(202, self.jobs[job_id])

    def _job_answer(self, status_code: int, job: dict[str, Any]) -> httpx.Response:
        headers = {"Location": f"/v1/jobs/{job['id']}", "Retry-After": str(POLL_AFTER_S)}
        return httpx.Response(status_code, json=job, headers=headers)

    def _get_job(self, request: httpx.Request, id: str) -> httpx.Response:
        job = self._job(id)
        if job["status"] in ("queued", "running"):
            if job["cancel_requested"]:  # a running job stops at its next stage boundary
                self._end(job, "canceled", {"code": "canceled", "message": "canceled by request"})
            else:
                self._advance(job)
        return httpx.Response(200, json=job)

    def _advance(self, job: dict[str, Any]) -> None:
        step = min(self._step[job["id"]] + 1, len(self.steps) - 1)
        self._step[job["id"]] = step
        status, stage, progress = self.steps[step]
        if status == "running" and job["started_at"] is None:
            job.update(started_at=_now(), attempts=1)
        if status in ("queued", "running"):
            job.update(status=status, stage=stage, progress=progress)
        else:
            error = None if status == "succeeded" else {"code": status, "message": f"the job {status}"}
            self._end(job, status, error)

    def _end(self, job: dict[str, Any], status: str, error: dict[str, str] | None) -> None:
        job.update(status=status, error=error, finished_at=_now())
        if status == "succeeded":
            job.update(stage=None, progress=1.0)

    def _cancel_job(self, request: httpx.Request, id: str) -> httpx.Response:
        job = self._job(id)
        if job["status"] not in ("queued", "running"):
            raise _Problem(409, f"job {id} already ended with status {job['status']!r}; nothing to cancel")
        job["cancel_requested"] = True
        if job["status"] == "queued":
            error = {"code": "canceled", "message": "canceled by request before it started"}
            self._end(job, "canceled", error)
        return self._job_answer(202, job)

    def _succeeded(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        if job["status"] != "succeeded":
            hint = "poll GET /v1/jobs/{id} until status is 'succeeded'"
            if job["status"] in ("failed", "canceled"):
                hint = f"the job ended {job['status']!r}; see its 'error'"
            raise _Problem(409, f"job {job_id} is {job['status']!r}, so it has no output yet: {hint}")
        return job

    def _get_metrics(self, request: httpx.Request, id: str) -> httpx.Response:
        job = self._succeeded(id)
        document = self.metrics if self.metrics is not None else self._made_up_metrics(job)
        ids = {"job_id": id, "model_id": job["model_id"], "spec": job["spec"]}
        return httpx.Response(200, json={**document, **ids})

    def _made_up_metrics(self, job: dict[str, Any]) -> dict[str, Any]:
        sparsity = float(job["spec"].get("target_sparsity") or 0.5)
        total, size = 10_000, len(self.artifact)

        def side(zeros: float, accuracy: float) -> dict[str, Any]:
            params = {"total": total, "prunable": total, "nonzero": round(total * (1 - zeros))}
            return {
                "metrics": {"accuracy": accuracy},
                "params": params,
                "sparsity": zeros,
                "size_bytes": {"saved_model": size, "zip": size},
            }

        return {
            "baseline": side(0.0, 0.9),
            "pruned": side(sparsity, 0.89),
            "delta": {"accuracy": -0.01},
            "layers": [],
            "notes": ["made up by app.client.testing.FakeService: no model was pruned"],
            "versions": {"secateurs": "fake"},
        }

    def _get_report(self, request: httpx.Request, id: str) -> httpx.Response:
        self._succeeded(id)
        page = f"<!doctype html><title>Job {id}</title><h1>Job {id}</h1><p>FakeService report</p>"
        return httpx.Response(200, text=page, headers={"Content-Type": "text/html; charset=utf-8"})

    def _list_artifacts(self, request: httpx.Request, id: str) -> httpx.Response:
        self._succeeded(id)
        item = {
            "name": "saved_model",
            "media_type": "application/zip",
            "size_bytes": len(self.artifact),
            "sha256": hashlib.sha256(self.artifact).hexdigest(),
            "href": f"/v1/jobs/{id}/artifacts/saved_model",
        }
        return httpx.Response(200, json={"items": [item]})

    def _download(self, request: httpx.Request, id: str, name: str = "saved_model") -> httpx.Response:
        """The whole file with the validators the client verifies (ETag and Repr-Digest: its SHA-256)."""
        self._succeeded(id)
        if name != "saved_model":
            raise _Problem(404, f"job {id} has no artifact {name!r}; it has ['saved_model']")
        digest = hashlib.sha256(self.artifact).digest()
        headers = {
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{artifact_filename(id, name)}"',
            "ETag": f'"{digest.hex()}"',
            "Repr-Digest": f"sha-256=:{base64.b64encode(digest).decode()}:",
            "Accept-Ranges": "bytes",
        }
        return httpx.Response(200, content=self.artifact, headers=headers)

    # --- helpers --------------------------------------------------------------------------------------------

    def _job(self, job_id: str) -> dict[str, Any]:
        return _found(self.jobs, job_id, "job")

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_{self._ids:020x}"


def _found(items: dict[str, dict[str, Any]], item_id: str, what: str) -> dict[str, Any]:
    if item_id not in items:
        raise _Problem(404, f"no {what} with id {item_id!r}")
    return items[item_id]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _json_object(request: httpx.Request) -> dict[str, Any]:
    try:
        body = httpx.Response(200, content=request.read()).json()
    except ValueError as exc:
        raise _Problem(422, f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _Problem(422, "the body must be a JSON object")
    return body


def _archive_format(data: bytes) -> str:
    """What a .zip / .tar of a dataset holds, guessed from its member names as the real API does."""
    try:
        if data.startswith(b"PK"):
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        else:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                names = tar.getnames()
    except (zipfile.BadZipFile, tarfile.TarError) as exc:
        raise _Problem(422, f"the archive is not a valid zip or tar ({exc})") from exc
    files = [n.lower() for n in names if not n.endswith("/")]
    if files and all(n.endswith(".parquet") for n in files):
        return "parquet"
    if files and all(n.endswith((".tfrecord", ".tfrecords", ".tfrecord.gz")) for n in files):
        return "tfrecord"
    if any("/" in n and n.endswith((".jpg", ".jpeg", ".png")) for n in files):
        return "image_folder"
    raise _Problem(
        422,
        "the archive holds neither only .parquet / .tfrecord shards nor an image folder (<class>/<image>); "
        'say what it holds with the form field description, e.g. {"format": "tfrecord"}',
    )


def _json_field(raw: str | None, name: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = httpx.Response(200, content=raw.encode()).json()
    except ValueError as exc:
        raise _Problem(422, f"the form field {name!r} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _Problem(422, f"the form field {name!r} must be a JSON object")
    return value


def _multipart(request: httpx.Request) -> tuple[dict[str, str], str, bytes]:
    """(text fields, file name, file bytes) of a multipart/form-data upload with one ``file`` field."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise _Problem(415, f"expected multipart/form-data with a 'file' field, got {content_type!r}")
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.read())
    fields: dict[str, str] = {}
    upload: tuple[str, bytes] | None = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if name == "file":
            upload = (part.get_filename() or "upload", payload)
        elif isinstance(name, str):
            fields[name] = payload.decode()
    if upload is None:
        raise _Problem(422, "the upload has no 'file' field")
    return fields, *upload


def _npz_arrays(data: bytes) -> dict[str, dict[str, Any]]:
    """``{name: {"shape", "dtype"}}`` of an ``.npz``, read from each member's ``.npy`` header (no NumPy)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise _Problem(415, "the dataset is not an .npz file (a zip of .npy arrays)") from exc
    arrays = {}
    with archive:
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as fh:
                    arrays[member[: -len(".npy")]] = _npy_header(fh.read(4096), member)
    if not arrays:
        raise _Problem(422, "the .npz holds no arrays; it needs 'x' (inputs) and 'y' (labels)")
    return arrays


def _npy_header(head: bytes, member: str) -> dict[str, Any]:
    if not head.startswith(b"\x93NUMPY"):
        raise _Problem(422, f"{member} is not a .npy array")
    size_bytes = 2 if head[6] == 1 else 4
    length = int.from_bytes(head[8 : 8 + size_bytes], "little")
    header = ast.literal_eval(head[8 + size_bytes : 8 + size_bytes + length].decode("latin-1"))
    descr = str(header["descr"])
    if "O" in descr:
        raise _Problem(422, f"array {member[:-4]!r} holds Python objects (pickles), which are refused")
    kind, width = descr[1:2], descr[2:]
    if kind == "b":
        dtype = "bool"
    elif kind in _NPY_KINDS and width.isdigit():
        dtype = f"{_NPY_KINDS[kind]}{int(width) * 8}"
    else:
        dtype = descr
    return {"shape": list(header["shape"]), "dtype": dtype}


def _placeholder_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("saved_model.pb", b"placeholder written by app.client.testing.FakeService")
        archive.writestr("variables/README", b"no model was pruned: this is a fake artifact")
    return buffer.getvalue()
