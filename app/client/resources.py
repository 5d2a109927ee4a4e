"""Typed views of the API's JSON bodies: small frozen dataclasses, no pydantic (the client depends on httpx only).

Each keeps the full JSON in ``raw`` so fields the server adds later (the contract allows additions) are never
lost to a client that predates them, and ``--json`` output can print exactly what the server said.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

TERMINAL = frozenset({"succeeded", "failed", "canceled"})


class JobWaiter(Protocol):
    """What :meth:`Job.wait` needs from whoever fetched the job (:class:`app.client.Client` is one): a
    protocol, so the resources import no client and the client's modules form no import circle."""

    def wait_job(
        self,
        job_id: str,
        *,
        timeout: float | None = ...,
        poll: float = ...,
        on_progress: Callable[[Job], None] | None = ...,
        first_delay: float | None = ...,
    ) -> Job: ...


def _when(value: Any) -> datetime | None:
    """ISO 8601 from the server (``Z`` or an offset) -> aware datetime; None stays None."""
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True)
class ErrorInfo:
    """A job's or model's ``error``: a stable ``code`` for programs and a ``message`` for people."""

    code: str
    message: str

    @classmethod
    def from_json(cls, data: Any) -> ErrorInfo | None:
        if not isinstance(data, dict):
            return None
        return cls(code=str(data.get("code", "")), message=str(data.get("message", "")))


@dataclass(frozen=True)
class Model:
    """An uploaded model. ``status`` is ``validating`` until a worker loaded it, then ``ready`` or ``invalid``."""

    id: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    status: str
    created_at: datetime | None
    signatures: dict[str, Any] | None = None
    params: int | None = None
    error: ErrorInfo | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        return cls(
            id=data["id"],
            name=data.get("name", ""),
            format=data.get("format", ""),
            size_bytes=int(data.get("size_bytes", 0)),
            sha256=data.get("sha256", ""),
            status=data["status"],
            created_at=_when(data.get("created_at")),
            signatures=data.get("signatures"),
            params=data.get("params"),
            error=ErrorInfo.from_json(data.get("error")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Dataset:
    """A dataset: an uploaded file or data registered by reference (``source``). ``status`` is ``validating``
    (then ``converting`` when shards are made) until a worker has read it, then ``ready`` or ``invalid`` (with
    ``error``); a small ``.npz`` is ``ready`` at once. ``arrays`` maps each array name to ``{"shape", "dtype"}``
    (empty until known); ``n_samples``, ``size_bytes``, ``sha256`` are None until known (``sha256`` stays None
    for references)."""

    id: str
    name: str
    size_bytes: int | None
    sha256: str | None
    arrays: dict[str, Any]
    n_samples: int | None
    created_at: datetime | None
    format: str = "npz"
    source: str | None = None
    status: str = "ready"
    shards: int | None = None
    features: dict[str, Any] | None = None
    class_names: list[str] | None = None
    error: ErrorInfo | None = None
    progress: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dataset:
        def optional_int(value: Any) -> int | None:
            return None if value is None else int(value)

        return cls(
            id=data["id"],
            name=data.get("name", ""),
            size_bytes=optional_int(data.get("size_bytes")),
            sha256=data.get("sha256"),
            arrays=dict(data.get("arrays") or {}),
            n_samples=optional_int(data.get("n_samples")),
            created_at=_when(data.get("created_at")),
            format=data.get("format", "npz"),
            source=data.get("source"),
            status=data.get("status", "ready"),
            shards=optional_int(data.get("shards")),
            features=data.get("features"),
            class_names=data.get("class_names"),
            error=ErrorInfo.from_json(data.get("error")),
            progress=data.get("progress"),
            raw=dict(data),
        )

    @property
    def pending(self) -> bool:
        """A worker still owes it a verdict (``validating`` or ``converting``)."""
        return self.status in ("validating", "converting")


@dataclass(frozen=True)
class Job:
    """One state of a pruning job as the server last reported it (fetch again for a newer one).

    ``job.wait(...)`` polls through the client that produced it, so code can go from ``create_job`` to a
    finished job without passing the client around again.
    """

    id: str
    model_id: str
    status: str
    stage: str | None
    progress: float
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    error: ErrorInfo | None
    spec: dict[str, Any]
    train_dataset_id: str | None = None
    eval_dataset_id: str | None = None
    calibration_dataset_id: str | None = None
    # The job's webhook: its URL, then once the job ended the message's status (pending, sending, delivered,
    # failed, gone) and every delivery attempt ({attempt, at, status_code, error, next_retry_at, ...}).
    webhook_url: str | None = None
    webhook_status: str | None = None
    webhook_deliveries: list[dict[str, Any]] = field(default_factory=list, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    client: JobWaiter | None = field(default=None, repr=False, compare=False)
    # The Retry-After (seconds) of the answer this state came in, e.g. 2 on a create's 202: when to look again.
    retry_after: float | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(
        cls, data: dict[str, Any], client: JobWaiter | None = None, retry_after: float | None = None
    ) -> Job:
        return cls(
            id=data["id"],
            model_id=data.get("model_id", ""),
            status=data["status"],
            stage=data.get("stage"),
            progress=float(data.get("progress") or 0.0),
            created_at=_when(data.get("created_at")),
            started_at=_when(data.get("started_at")),
            finished_at=_when(data.get("finished_at")),
            error=ErrorInfo.from_json(data.get("error")),
            spec=dict(data.get("spec") or {}),
            train_dataset_id=data.get("train_dataset_id"),
            eval_dataset_id=data.get("eval_dataset_id"),
            calibration_dataset_id=data.get("calibration_dataset_id"),
            webhook_url=data.get("webhook_url"),
            webhook_status=data.get("webhook_status"),
            webhook_deliveries=list(data.get("webhook_deliveries") or []),
            raw=dict(data),
            client=client,
            retry_after=retry_after,
        )

    @property
    def done(self) -> bool:
        """True once the job can no longer change: succeeded, failed or canceled."""
        return self.status in TERMINAL

    def wait(
        self,
        timeout: float | None = 3600.0,
        poll: float = 1.0,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job ends; see :meth:`Client.wait_job` (same arguments, same errors). The first poll
        comes after this state's ``retry_after`` when the server sent one (it does on create and cancel)."""
        if self.client is None:
            raise RuntimeError("this Job was built without a client; use client.wait_job(job.id) instead")
        return self.client.wait_job(
            self.id, timeout=timeout, poll=poll, on_progress=on_progress, first_delay=self.retry_after
        )
