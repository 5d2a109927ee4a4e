"""The Secateurs HTTP client: one ``httpx.Client``, typed resources, typed errors, waits and downloads.

Depends on httpx only (no FastAPI, pydantic, SQLAlchemy, Celery, NumPy or TensorFlow), so any service can
script Secateurs without installing the server. Every request goes through :meth:`Client._send`, which is
where transport errors and problem+json answers become :mod:`app.client.errors` exceptions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx

from app.client.download import artifact_filename, download_to
from app.client.errors import (
    DatasetInvalid,
    JobCanceled,
    JobFailed,
    ModelInvalid,
    ServiceUnavailable,
    TooManyRequests,
    WaitTimeout,
    connection_failed,
    parse_retry_after,
    raise_for_problem,
)
from app.client.resources import Dataset, Job, Model

__all__ = ["Client", "Clock", "SystemClock"]

PAGE_SIZE = 200  # the server's largest page: fewest round trips when listing everything
DEFAULT_MAX_POLL = 10.0
BACKOFF_FACTOR = 1.5
T = TypeVar("T")


class Clock(Protocol):
    """Time as waits see it; a test passes a fake one to check backoff without sleeping for real."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Client:
    """A Secateurs API client. Use as a context manager (or call :meth:`close`) to release connections.

    ``api_key`` is sent as ``Authorization: Bearer <key>``; ``timeout`` bounds each HTTP request (not a whole
    job: waits take their own ``timeout``); ``transport`` replaces httpx's network transport (tests pass
    ``httpx.MockTransport``); ``clock`` replaces real time in waits.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        headers = {"User-Agent": "secateurs-client/0.1", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.clock: Clock = clock or SystemClock()
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    # --- lifecycle ------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the one door to the network ------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; raise ConnectionFailed for transport errors and ApiError for 4xx/5xx answers."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise connection_failed(exc, self.base_url) from exc
        raise_for_problem(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body = self._send(method, path, **kwargs).json()
        if not isinstance(body, dict):
            raise TypeError(f"{method} {path} returned {type(body).__name__}, expected a JSON object")
        return body

    def _pages(self, path: str, params: dict[str, Any], limit: int | None) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paginated list (``{"items", "next_cursor"}``), up to ``limit`` items."""
        seen = 0
        query = {k: v for k, v in params.items() if v is not None}
        while True:
            size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - seen)
            page = self._json("GET", path, params={**query, "limit": size})
            for item in page.get("items", []):
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            cursor = page.get("next_cursor")
            if not cursor:
                return
            query["cursor"] = cursor

    @staticmethod
    def _idempotency(key: str | None) -> dict[str, str]:
        return {"Idempotency-Key": key} if key else {}

    def _upload(
        self,
        route: str,
        path: Path,
        name: str | None,
        idempotency_key: str | None,
        fields: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """multipart/form-data with the file object itself: httpx streams it from disk in chunks (with a
        Content-Length from the file size), so a multi-GB model never sits in memory."""
        path = Path(path)
        data = {**({"name": name} if name else {}), **(fields or {})} or None
        with path.open("rb") as fh:
            return self._json(
                "POST",
                route,
                files={"file": (path.name, fh, "application/octet-stream")},
                data=data,
                headers=self._idempotency(idempotency_key),
            )

    # --- models ---------------------------------------------------------------------------------------------

    def upload_model(
        self, path: Path | str, name: str | None = None, idempotency_key: str | None = None
    ) -> Model:
        """Upload a ``.zip`` / ``.tar.gz`` SavedModel archive or a ``.keras`` file; it starts ``validating``."""
        return Model.from_json(self._upload("/v1/models", Path(path), name, idempotency_key))

    def get_model(self, model_id: str) -> Model:
        return Model.from_json(self._json("GET", f"/v1/models/{model_id}"))

    def list_models(self, limit: int | None = None) -> list[Model]:
        """Models newest first; all of them (following ``next_cursor``) unless ``limit`` caps the count."""
        return [Model.from_json(item) for item in self._pages("/v1/models", {}, limit)]

    def delete_model(self, model_id: str) -> None:
        """Delete a model and its files (Conflict while a queued or running job uses it)."""
        self._send("DELETE", f"/v1/models/{model_id}")

    def wait_model_ready(self, model_id: str, timeout: float | None = 600.0, poll: float = 1.0) -> Model:
        """Poll until a worker has loaded the model; return it ``ready`` or raise ModelInvalid / WaitTimeout."""

        def fetch() -> tuple[Model, httpx.Response]:
            response = self._send("GET", f"/v1/models/{model_id}")
            return Model.from_json(response.json()), response

        model = self._poll(fetch, lambda m: m.status != "validating", timeout, poll, DEFAULT_MAX_POLL, None)
        if model.status == "invalid":
            raise ModelInvalid(model)
        return model

    # --- datasets -------------------------------------------------------------------------------------------

    def upload_dataset(
        self,
        path: Path | str,
        name: str | None = None,
        idempotency_key: str | None = None,
        *,
        description: dict[str, Any] | None = None,
    ) -> Dataset:
        """Upload a dataset file: an ``.npz`` with ``x`` (or ``x.<input name>``) and ``y`` (a small one is
        checked at once and ``ready``), a ``.tfrecord`` / ``.tfrecord.gz`` / ``.tfrecords``, a ``.parquet``, or a
        ``.tar`` / ``.zip`` of shards or of an image folder (``<class>/<image>``). ``description``: ``format``,
        ``compression``, ``features``, ``inputs``, ``label`` (API.md). All but a small ``.npz`` start
        ``validating``: :meth:`wait_dataset` waits for the verdict."""
        fields = {"description": json.dumps(description)} if description is not None else None
        return Dataset.from_json(self._upload("/v1/datasets", Path(path), name, idempotency_key, fields))

    def register_dataset(
        self,
        source: str,
        *,
        format: str,
        features: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        label: str | None = None,
        compression: str | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> Dataset:
        """Register data where it lies (``s3://bucket/prefix/`` or ``file:///abs/dir/``, a folder or one file)
        without sending its bytes; the server must allow the prefix (SECATEURS_DATASET_SOURCES, else Forbidden).
        It starts ``validating``: :meth:`wait_dataset` waits until a worker has read a sample."""
        body: dict[str, Any] = {"source": source, "format": format}
        for key, value in (
            ("features", features),
            ("inputs", inputs),
            ("label", label),
            ("compression", compression),
            ("name", name),
        ):
            if value is not None:
                body[key] = value
        return Dataset.from_json(
            self._json("POST", "/v1/datasets", json=body, headers=self._idempotency(idempotency_key))
        )

    def wait_dataset(
        self,
        dataset_id: str,
        timeout: float | None = 3600.0,
        poll: float = 1.0,
        on_progress: Callable[[Dataset], None] | None = None,
    ) -> Dataset:
        """Poll until the dataset is ``ready`` (returned) or ``invalid`` (DatasetInvalid); WaitTimeout after
        ``timeout`` seconds (None = no limit) while the worker goes on. Converting a large upload takes minutes."""

        def fetch() -> tuple[Dataset, httpx.Response]:
            response = self._send("GET", f"/v1/datasets/{dataset_id}")
            return Dataset.from_json(response.json()), response

        dataset = self._poll(fetch, lambda d: not d.pending, timeout, poll, DEFAULT_MAX_POLL, on_progress)
        if dataset.status == "invalid":
            raise DatasetInvalid(dataset)
        return dataset

    def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.from_json(self._json("GET", f"/v1/datasets/{dataset_id}"))

    def list_datasets(self, limit: int | None = None) -> list[Dataset]:
        return [Dataset.from_json(item) for item in self._pages("/v1/datasets", {}, limit)]

    def delete_dataset(self, dataset_id: str) -> None:
        self._send("DELETE", f"/v1/datasets/{dataset_id}")

    # --- jobs -----------------------------------------------------------------------------------------------

    def create_job(
        self,
        model_id: str,
        spec: dict[str, Any],
        train_dataset_id: str | None = None,
        eval_dataset_id: str | None = None,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        calibration_dataset_id: str | None = None,
    ) -> Job:
        """Queue a pruning job (202). With the same ``idempotency_key`` a retry returns the original job.
        ``webhook_url`` receives the signed job.succeeded / job.failed / job.canceled event (verify it with
        :meth:`webhook_secret`); without it the tenant's default URL, if any, does. ``calibration_dataset_id``:
        inputs for criteria wanda / sparsegpt and ``reconstruct`` (else the train dataset's inputs serve)."""
        body: dict[str, Any] = {"model_id": model_id, "spec": spec}
        if train_dataset_id:
            body["train_dataset_id"] = train_dataset_id
        if eval_dataset_id:
            body["eval_dataset_id"] = eval_dataset_id
        if calibration_dataset_id:
            body["calibration_dataset_id"] = calibration_dataset_id
        if webhook_url:
            body["webhook_url"] = webhook_url
        response = self._send("POST", "/v1/jobs", json=body, headers=self._idempotency(idempotency_key))
        return self._job(response)

    def _job(self, response: httpx.Response) -> Job:
        return Job.from_json(response.json(), self, parse_retry_after(response.headers.get("retry-after")))

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("GET", f"/v1/jobs/{job_id}"), self)

    def list_jobs(
        self, status: str | None = None, model_id: str | None = None, limit: int | None = None
    ) -> list[Job]:
        """Jobs newest first, filtered by ``status`` / ``model_id``; all pages unless ``limit`` caps the count."""
        items = self._pages("/v1/jobs", {"status": status, "model_id": model_id}, limit)
        return [Job.from_json(item, self) for item in items]

    def cancel_job(self, job_id: str) -> Job:
        """Ask the job to stop: a queued one ends ``canceled`` at once, a running one at its next boundary.
        Conflict if it already ended."""
        return self._job(self._send("POST", f"/v1/jobs/{job_id}/cancel"))

    def metrics(self, job_id: str) -> dict[str, Any]:
        """The metrics document (baseline vs pruned); Conflict before the job succeeded."""
        return self._json("GET", f"/v1/jobs/{job_id}/metrics")

    def report(self, job_id: str) -> str:
        """The job's self-contained HTML report; Conflict before the job succeeded."""
        return self._send("GET", f"/v1/jobs/{job_id}/report").text

    def list_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The job's files: ``[{"name", "media_type", "size_bytes", "sha256", "href"}]``, the SavedModel
        zip (``saved_model``) first; Conflict before the job succeeded."""
        return list(self._json("GET", f"/v1/jobs/{job_id}/artifacts")["items"])

    def download_artifact(
        self, job_id: str, dest: Path | str, *, name: str = "saved_model", max_resumes: int = 3
    ) -> Path:
        """Stream the job's file ``name`` (default the pruned SavedModel zip; ``tflite_int8``, ... for
        exports) to ``dest`` (a file path, or an existing directory to put ``artifact_filename`` in),
        verifying length and SHA-256 and resuming with Range when cut. NotFound names the job's files."""
        target = Path(dest)
        if target.is_dir():
            target = target / artifact_filename(job_id, name)
        url = f"/v1/jobs/{job_id}/artifacts/{quote(name, safe='')}"
        return download_to(self._http, url, target, max_resumes=max_resumes)

    # --- webhooks -------------------------------------------------------------------------------------------

    def webhook_secret(self, rotate: bool = False) -> str:
        """The ``whsec_...`` secret that signs this tenant's webhooks (Standard Webhooks); made on first ask.
        ``rotate=True`` replaces it; the old one keeps co-signing deliveries for 24 h."""
        if rotate:
            return str(self._json("POST", "/v1/webhooks/secret/rotate")["secret"])
        return str(self._json("GET", "/v1/webhooks/secret")["secret"])

    def default_webhook_url(self) -> str | None:
        """The URL that jobs created without ``webhook_url`` report to, if the tenant set one."""
        return self._json("GET", "/v1/webhooks").get("default_url")

    def set_default_webhook_url(self, url: str | None) -> str | None:
        """Set (or clear, with None) the tenant's default webhook URL; Unprocessable names why one is refused."""
        return self._json("PUT", "/v1/webhooks", json={"default_url": url}).get("default_url")

    def wait_job(
        self,
        job_id: str,
        timeout: float | None = 3600.0,
        poll: float = 1.0,
        on_progress: Callable[[Job], None] | None = None,
        max_poll: float = DEFAULT_MAX_POLL,
        first_delay: float | None = None,
    ) -> Job:
        """Poll the job until it ends; return it when ``succeeded``.

        The interval starts at ``poll`` and grows by x1.5 per poll up to ``max_poll``, so a long job costs few
        requests while a short one is noticed quickly. A ``Retry-After`` header on a poll's answer replaces the
        computed interval; a 503/429 while polling is waited out the same way rather than ending the wait.
        ``first_delay`` (seconds) comes before the first poll: :meth:`Job.wait` passes the ``Retry-After`` of
        the answer that created the job. ``on_progress`` gets every state seen. Raises JobFailed / JobCanceled (with the job's ``error``), or
        WaitTimeout after ``timeout`` seconds (None = no limit) while the job goes on running.
        """

        def fetch() -> tuple[Job, httpx.Response]:
            response = self._send("GET", f"/v1/jobs/{job_id}")
            return self._job(response), response

        job = self._poll(fetch, lambda j: j.done, timeout, poll, max_poll, on_progress, first_delay)
        if job.status == "failed":
            raise JobFailed(job)
        if job.status == "canceled":
            raise JobCanceled(job)
        return job

    def _poll(
        self,
        fetch: Callable[[], tuple[T, httpx.Response]],
        done: Callable[[T], bool],
        timeout: float | None,
        poll: float,
        max_poll: float,
        on_progress: Callable[[T], None] | None,
        first_delay: float | None = None,
    ) -> T:
        """The backoff loop shared by job and model waits (see :meth:`wait_job`)."""
        if poll <= 0:
            raise ValueError("poll must be > 0 seconds")
        clock = self.clock
        deadline = None if timeout is None else clock.monotonic() + timeout
        if first_delay:
            clock.sleep(first_delay if timeout is None else min(first_delay, timeout))
        interval = poll
        cap = max(max_poll, poll)
        last: T | None = None
        while True:
            try:
                state, response = fetch()
            except (ServiceUnavailable, TooManyRequests) as exc:
                hint = exc.retry_after  # transient: wait as told and ask again
            else:
                last = state
                if on_progress is not None:
                    on_progress(state)
                if done(state):
                    return state
                hint = parse_retry_after(response.headers.get("retry-after"))
            delay = interval if hint is None else hint
            if deadline is not None:
                remaining = deadline - clock.monotonic()
                if remaining <= 0:
                    what = getattr(last, "id", "the resource")
                    status = getattr(last, "status", "unknown")
                    raise WaitTimeout(
                        f"gave up waiting for {what} after {timeout:g} s (last status: {status}); "
                        "it goes on running on the server",
                        last=last,
                    )
                delay = min(delay, remaining)
            clock.sleep(delay)
            interval = min(interval * BACKOFF_FACTOR, cap)
