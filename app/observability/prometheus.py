"""Prometheus metrics for ``GET /metrics``: HTTP traffic measured in-process, jobs read from the database.

Two sources, because they live in different places:

- HTTP requests are counted by :class:`ObservabilityMiddleware` in the API process, labelled by the route
  *template* (``/v1/jobs/{job_id}``, never the raw path: one series per route, not per job) and status.
- Jobs, the queue and worker heartbeats are the database's, so :class:`StoreCollector` reads them at scrape
  time with a few indexed aggregate queries. Any API process answers the same numbers. Stage durations are
  histograms built from the ``timings`` the worker writes on each job it ends: the collector adds the jobs
  finished since its previous scrape, so the counts only grow (per API process; a restart starts over from the
  whole table, as a restarted exporter's counters do).

Several uvicorn workers / API processes: each counts its own requests. Set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory shared by them (prometheus-client's multiprocess mode) and any process answers the sum; the
job metrics are the database's either way. See docs/operations.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.tables import JobRecord, ModelRecord, as_utc, utcnow
from app.observability.logs import request_context

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STAGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0)
UNMATCHED = "<unmatched>"  # requests no route matched (404s for made-up paths): one series for all of them
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
MODEL_STATUSES = ("validating", "ready", "invalid")
# A job's finished_at is stamped before its transaction commits, so a scrape can see a job appear with a
# finished_at slightly older than the newest one it already counted; re-read this far back (ids dedupe).
_OVERLAP = timedelta(minutes=5)
_BATCH = 5000  # rows per scrape: a first scrape of a large table catches up over a few scrapes


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class HttpMetrics:
    """The request counter and latency histogram. In multiprocess mode the values live in files, not here."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "secateurs_http_requests",
            "HTTP requests answered, by method, route template and status code",
            ("method", "route", "status"),
            registry=registry,
        )
        self.duration = Histogram(
            "secateurs_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response body (uploads/downloads included)",
            ("method", "route"),
            buckets=HTTP_BUCKETS,
            registry=registry,
        )


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class ObservabilityMiddleware:
    """Pure ASGI (no body buffering, streaming untouched): opens the request's log context, and counts the
    request by route template and status when its response has ended (500 if the app raised before answering)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with request_context(scope):
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                route = route_template(scope)
                method = scope.get("method", "GET")
                self.metrics.requests.labels(method, route, str(status)).inc()
                self.metrics.duration.labels(method, route).observe(time.perf_counter() - start)


class _Histogram:
    """Cumulative bucket counts for one label set, fed one observation at a time."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class StoreCollector(Collector):
    """Reads jobs, the queue and heartbeats from the database at each scrape (see the module docstring)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()
        self._stages: dict[str, _Histogram] = {}
        self._durations: dict[str, _Histogram] = {}  # by final status
        self._since: datetime | None = None
        self._seen: dict[str, datetime] = {}  # job id -> finished_at, within the overlap window

    def describe(self) -> Iterable[Metric]:
        return []  # no describe-time queries: registering must not touch the database

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "secateurs_database_up", "1 when the job metrics below could be read from the database"
        )
        try:
            with self._lock:
                families = self._read()
        except Exception:  # the database is down: say so, and keep the HTTP metrics scrapeable
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> list[Metric]:
        now = utcnow()
        with self.sessions() as session:
            jobs = dict(
                session.execute(select(JobRecord.status, func.count()).group_by(JobRecord.status)).all()
            )
            models = dict(
                session.execute(select(ModelRecord.status, func.count()).group_by(ModelRecord.status)).all()
            )
            oldest_queued = session.scalar(
                select(func.min(JobRecord.created_at)).where(JobRecord.status == "queued")
            )
            beats = session.execute(
                select(JobRecord.worker, func.max(JobRecord.heartbeat_at))
                .where(JobRecord.status == "running")
                .group_by(JobRecord.worker)
            ).all()
            self._add_finished(session)

        by_status = GaugeMetricFamily("secateurs_jobs", "Jobs in the database by status", labels=["status"])
        for status in JOB_STATUSES:
            by_status.add_metric([status], jobs.get(status, 0))
        model_family = GaugeMetricFamily(
            "secateurs_models", "Uploaded models in the database by status", labels=["status"]
        )
        for status in MODEL_STATUSES:
            model_family.add_metric([status], models.get(status, 0))
        depth = GaugeMetricFamily("secateurs_queue_depth", "Jobs waiting for a worker (status queued)")
        depth.add_metric([], jobs.get("queued", 0))
        oldest = GaugeMetricFamily(
            "secateurs_queue_oldest_age_seconds", "Age of the oldest queued job; 0 when none waits"
        )
        oldest_at = as_utc(oldest_queued)
        oldest.add_metric([], max(0.0, (now - oldest_at).total_seconds()) if oldest_at else 0.0)
        heartbeat = GaugeMetricFamily(
            "secateurs_worker_heartbeat_age_seconds",
            "Seconds since the newest heartbeat of each worker process holding a running job",
            labels=["worker"],
        )
        for worker, beat in beats:
            at = as_utc(beat)
            if at is not None:
                heartbeat.add_metric([worker or "unknown"], max(0.0, (now - at).total_seconds()))
        return [
            by_status,
            model_family,
            depth,
            oldest,
            heartbeat,
            self._histogram_family(
                "secateurs_job_stage_duration_seconds",
                "Seconds each stage took, over the jobs workers ended (the jobs' recorded timings)",
                "stage",
                self._stages,
            ),
            self._histogram_family(
                "secateurs_job_duration_seconds",
                "Seconds from a job's start to its end, by final status",
                "status",
                self._durations,
            ),
        ]

    def _add_finished(self, session: Session) -> None:
        """Feed the histograms with the jobs that ended since the previous scrape (at most _BATCH of them)."""
        query = select(
            JobRecord.id, JobRecord.status, JobRecord.started_at, JobRecord.finished_at, JobRecord.timings
        )
        query = query.where(JobRecord.finished_at.is_not(None))
        if self._since is not None:
            query = query.where(JobRecord.finished_at >= self._since - _OVERLAP)
        rows = session.execute(query.order_by(JobRecord.finished_at).limit(_BATCH)).all()
        for job_id, status, started_at, finished_at, timings in rows:
            finished = as_utc(finished_at)
            if job_id in self._seen or finished is None:
                continue
            self._seen[job_id] = finished
            self._since = finished if self._since is None else max(self._since, finished)
            started = as_utc(started_at)
            if started is not None:
                self._durations.setdefault(status, _Histogram(STAGE_BUCKETS)).observe(
                    max(0.0, (finished - started).total_seconds())
                )
            for stage, seconds in (timings or {}).items():
                if stage != "total" and isinstance(seconds, int | float):
                    self._stages.setdefault(stage, _Histogram(STAGE_BUCKETS)).observe(float(seconds))
        if self._since is not None:
            horizon = self._since - _OVERLAP
            self._seen = {k: v for k, v in self._seen.items() if v >= horizon}

    @staticmethod
    def _histogram_family(
        name: str, documentation: str, label: str, series: dict[str, _Histogram]
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=[label])
        for value, hist in sorted(series.items()):
            family.add_metric([value], hist.cumulative(), sum_value=hist.sum)
        return family


class Metrics:
    """What one API app exposes: its HTTP metrics and the store collector, rendered by :meth:`render`."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir()
        self.registry = CollectorRegistry(auto_describe=False)
        # Multiprocess mode: the metric objects write to files; a fresh registry reads them all at each scrape.
        self.http = HttpMetrics(None if self.multiprocess else self.registry)
        self.store: StoreCollector | None = None

    def attach_store(self, sessions: sessionmaker[Session]) -> None:
        self.store = StoreCollector(sessions)

    def render(self) -> bytes:
        registry = self.registry
        if self.multiprocess:
            registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(registry)
        parts = [generate_latest(registry)]
        if self.store is not None:
            parts.append(generate_latest(_Single(self.store)))  # type: ignore[arg-type]
        return b"".join(parts)


class _Single:
    """A registry-shaped view of one collector, for generate_latest."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterable[Metric]:
        return self.collector.collect()
