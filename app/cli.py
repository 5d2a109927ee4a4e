"""`secateurs` console script.

Server side: ``serve`` (API, plus the embedded worker when no broker is set) and ``worker``; ``keys`` and
``webhooks`` are admin commands that work on the database directly (they run where the server's settings are).
Client side: ``prune``, ``jobs``, ``models`` talk HTTP through :mod:`app.client` only, exactly as any other
service would, so the CLI is also the client's first user.

The CLI launches workers as processes; nothing under app/ imports worker/.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import logging
import os
import signal
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from app.drop_warning import DEFAULT_WARN_DROP, drop_warning, spec_line

if TYPE_CHECKING:
    from app.client import Client, Job
    from app.config import Settings

# Exit codes (documented in `secateurs --help` and the README).
EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job (or the model) ended failed / canceled / invalid
EXIT_USAGE = 2  # bad arguments or files, or the server refused the request (4xx problem)
EXIT_UNAVAILABLE = 3  # no connection, 5xx / 429, or a corrupt download
EXIT_TIMEOUT = 4  # --wait ran past --timeout (the job goes on running)
EXIT_INTERRUPTED = 130

DEFAULT_URL = "http://127.0.0.1:8000"
EXPORT_FORMATS = ("float32", "float16", "dynamic_range", "int8")  # app.schemas.spec.TFLiteFormat
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

EPILOG = """\
exit codes:
  0  success
  1  the job failed or was canceled (its error code and message are printed)
  2  usage or validation error: bad arguments or files, or the server refused the request (4xx; detail printed)
  3  server unavailable: no connection, a 5xx/429 answer, or a download that failed verification
  4  timeout: --wait ran past --timeout (the job goes on running on the server)

client commands (prune, jobs, models) read SECATEURS_URL (default http://127.0.0.1:8000) and SECATEURS_API_KEY;
with --json they print exactly one JSON document on stdout, also on failure ({"error": {...}}).
"""


# --- settings (server-side commands) ------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "data_dir", None):
        os.environ["SECATEURS_DATA_DIR"] = str(args.data_dir)
    from app.config import get_settings

    get_settings.cache_clear()
    try:
        return get_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        sys.exit(f"secateurs: bad configuration: {exc}")


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def auth_banner(settings: Settings, host: str) -> tuple[bool, str]:
    """(may start, what to say) for ``serve`` on ``host``.

    With keys not required, anyone who connects can use the API: only sensible when nobody but this machine
    can connect, so a non-loopback address needs auth on (production always has it). With auth on and no key
    yet, the service starts and answers 401 until a key is created. ``serve`` says at start which case it is.
    """
    from app.auth import any_active_key, auth_required
    from app.db.engine import init_db, make_engine, make_session_factory

    if settings.db_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    try:
        init_db(engine)
        sessions = make_session_factory(engine)
        required = auth_required(settings, sessions)
        has_key = any_active_key(settings, sessions)
    finally:
        engine.dispose()
    create = "`secateurs keys create --tenant NAME`"
    if required and has_key:
        return True, f"auth: on (requests need 'Authorization: Bearer <key>'; listening on {host})"
    if required:  # safe on any address: every request gets 401 until a key exists
        return True, (
            f"auth: on, but no active API key exists yet, so every request will get 401; create one with "
            f"{create} (same SECATEURS_DATA_DIR / SECATEURS_DATABASE_URL)"
        )
    why = "SECATEURS_AUTH=disabled" if settings.auth == "disabled" else "no API key exists yet"
    if not is_loopback(host):
        return False, (
            f"secateurs serve: refusing to listen on {host}: auth is off ({why}), so the API would be open to "
            f"whoever reaches it. Create a key first ({create}), set SECATEURS_AUTH=required, or bind to 127.0.0.1"
        )
    return True, (
        f"auth: off ({why}); listening on loopback {host} only, so only this machine can call the API. "
        f"Create a key with {create} before binding to another address"
    )


# --- serve / worker -----------------------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.embedded import EmbeddedWorker, recover
    from app.main import create_app

    settings = _settings(args)
    host = args.host or settings.host
    port = args.port or settings.port
    from app.observability.logs import configure_logging

    configure_logging(settings.log_format)
    log = logging.getLogger("secateurs")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    may_start, banner = auth_banner(settings, host)
    if not may_start:
        print(banner, file=sys.stderr)
        return EXIT_USAGE
    log.info("%s", banner)
    worker = None
    if settings.embedded and not args.no_worker:
        jobs, models = recover(settings)
        if jobs or models:
            log.info("recovered after restart: re-sent %d job(s) and %d model validation(s)", jobs, models)
        worker = EmbeddedWorker(settings)
        worker.start()
        log.info("embedded mode: data in %s, one worker child process, no external server", settings.data_dir)
    app = create_app(settings, embedded_worker=worker, maintenance=True)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; with the default action that kills
    # this process before the `finally` below, orphaning the worker child. Turn it into SystemExit instead.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # Start-up leaves ~130,000 long-lived objects (FastAPI, pydantic, SQLAlchemy); full collections walking
    # them took 67-244 ms under load, the slowest 1% of status polls. Frozen, they are never scanned again.
    gc.collect()
    gc.freeze()
    try:
        # JSON logs: uvicorn's own log config would put its text handlers back; without one it uses the root's.
        log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
        uvicorn.run(
            app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10, log_config=log_config
        )
    finally:
        if worker is not None:
            worker.stop()
    return EXIT_OK


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def worker(args: argparse.Namespace) -> int:
    from app.embedded import EmbeddedWorker

    settings = _settings(args)
    if settings.embedded and not settings.broker_url:
        print(
            "secateurs worker: no SECATEURS_BROKER_URL set; using the embedded file transport in "
            f"{settings.broker_dir}",
            file=sys.stderr,
        )
    from app.observability.logs import configure_logging

    configure_logging(settings.log_format)
    from app.storage import Storage
    from app.storage.base import StoreMisconfigured

    try:  # before any child starts: a worker that can never reach its store must not restart forever
        Storage.from_settings(settings).check()
    except StoreMisconfigured as exc:
        print(f"secateurs worker: refusing to start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # unreachable for now: the jobs retry, then fail with a reason
        logging.getLogger("secateurs").warning("blob store not reachable at start: %s", exc)
    supervisor = EmbeddedWorker(
        settings, loglevel=args.loglevel, concurrency=args.concurrency, hostname="secateurs@%h"
    )

    def _stop(signum: int, frame: object) -> None:
        supervisor.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    supervisor.start()
    supervisor.wait()
    supervisor.stop()
    return EXIT_OK


# --- output -------------------------------------------------------------------------------------------------


class Output:
    """Where results go: one JSON document on stdout with --json, else text for people. Notes and progress
    always go to stderr, so stdout stays parseable and pipeable in both modes."""

    def __init__(self, as_json: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def result(self, data: Any, text: str | Callable[[], str]) -> None:
        if self.as_json:
            print(json.dumps(data, indent=2, default=str), file=self.out)
        else:
            print(text() if callable(text) else text, file=self.out)

    def note(self, message: str) -> None:
        print(message, file=self.err, flush=True)


def _size(n: int | float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"  # pragma: no cover


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Left-aligned columns, header in capitals; '-' for missing values."""
    if not rows:
        return "(none)"
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "progress": f"{job.progress * 100:.0f}%",
        "model": job.model_id,
        "created": job.created_at.strftime("%Y-%m-%d %H:%M:%S") if job.created_at else None,
    }


def _job_text(job: Job) -> str:
    lines = [
        f"id:          {job.id}",
        f"status:      {job.status}",
        f"stage:       {job.stage or '-'}",
        f"progress:    {job.progress * 100:.0f}%",
        f"model:       {job.model_id}",
        f"train:       {job.train_dataset_id or '-'}",
        f"eval:        {job.eval_dataset_id or '-'}",
        f"created:     {job.created_at or '-'}",
        f"started:     {job.started_at or '-'}",
        f"finished:    {job.finished_at or '-'}",
    ]
    if job.error:
        lines.append(f"error:       [{job.error.code}] {job.error.message}")
    lines.append(f"spec:        {json.dumps(job.spec, sort_keys=True)}")
    return "\n".join(lines)


def metrics_summary(metrics: dict[str, Any]) -> str:
    """One line a person reads after a job: sparsity (parameters when channels were removed: the compact
    model has no zeros left to count), the headline metric before -> after, zip size."""
    baseline = metrics.get("baseline") or {}
    pruned = metrics.get("pruned") or {}
    parts = []
    compacted = bool((metrics.get("structure") or {}).get("compact"))
    totals = ((baseline.get("params") or {}).get("total"), (pruned.get("params") or {}).get("total"))
    if compacted and all(isinstance(t, int) for t in totals):
        parts.append(f"params {totals[0]:,} -> {totals[1]:,} (channels removed)")  # zeros are gone, too
    elif isinstance(pruned.get("sparsity"), int | float):
        parts.append(f"sparsity {pruned['sparsity']:.2f}")
    before, after = baseline.get("metrics") or {}, pruned.get("metrics") or {}
    for name in ("accuracy", "r2", "mse", "mae"):
        if isinstance(before.get(name), int | float) and isinstance(after.get(name), int | float):
            parts.append(f"{name} {before[name]:.3f} -> {after[name]:.3f}")
            break
    zips = (baseline.get("size_bytes") or {}).get("zip"), (pruned.get("size_bytes") or {}).get("zip")
    if all(isinstance(z, int) for z in zips):
        parts.append(f"zip {_size(zips[0])} -> {_size(zips[1])}")
    return ", ".join(parts) or "no metrics summary available"


# --- client commands: errors -> exit codes in one place -----------------------------------------------------


class UsageError(Exception):
    """A problem with the command line or local files, found before anything was sent."""


def _exit_for(exc: BaseException) -> tuple[int, dict[str, Any], str]:
    """(exit code, JSON error object, message for people) for anything a client command can raise."""
    from app.client import (
        ApiError,
        ConnectionFailed,
        DigestMismatch,
        JobError,
        ModelInvalid,
        WaitTimeout,
    )

    if isinstance(exc, JobError):
        error = {"kind": "job", "status": exc.job.status, "code": exc.code, "message": exc.message}
        text = f"job {exc.job.id} {exc.job.status} [{exc.code}]: {exc.message}"
        return EXIT_JOB_FAILED, {**error, "job": exc.job.raw}, text
    if isinstance(exc, ModelInvalid):
        error = {"kind": "model", "status": "invalid", "code": exc.code, "message": exc.message}
        return EXIT_JOB_FAILED, {**error, "model": exc.model.raw}, str(exc)
    if isinstance(exc, ApiError):
        error = {
            "kind": "api",
            "status": exc.status,
            "title": exc.title,
            "detail": exc.detail,
            "type": exc.type,
        }
        if exc.errors:
            error["errors"] = exc.errors
        if exc.retry_after is not None:
            error["retry_after"] = exc.retry_after
        text = f"{exc.status} {exc.title}: {exc.detail}"
        code = EXIT_USAGE if 400 <= exc.status < 500 and exc.status != 429 else EXIT_UNAVAILABLE
        return code, error, text
    if isinstance(exc, ConnectionFailed):
        text = f"{exc} (is `secateurs serve` running there? set --url or SECATEURS_URL)"
        return EXIT_UNAVAILABLE, {"kind": "connection", "message": str(exc)}, text
    if isinstance(exc, DigestMismatch):
        return EXIT_UNAVAILABLE, {"kind": "download", "message": str(exc)}, str(exc)
    if isinstance(exc, WaitTimeout):
        last = getattr(exc.last, "raw", None)
        return EXIT_TIMEOUT, {"kind": "timeout", "message": str(exc), "last": last}, str(exc)
    if isinstance(exc, UsageError):
        return EXIT_USAGE, {"kind": "usage", "message": str(exc)}, str(exc)
    raise exc


def _run_client(args: argparse.Namespace, command: Callable[[Client, Output], int]) -> int:
    from app.client import Client, SecateursClientError

    output = Output(args.json)
    try:
        with Client(args.url, api_key=args.api_key or None) as client:
            return command(client, output)
    except (SecateursClientError, UsageError) as exc:
        code, error, text = _exit_for(exc)
        output.note(f"secateurs: {text}")
        if output.as_json:
            print(json.dumps({"error": error}, indent=2, default=str), file=output.out)
        return code


# --- prune / jobs wait --------------------------------------------------------------------------------------


def _read_spec(given: str | None, sparsity: float | None) -> dict[str, Any]:
    """``--spec`` is a JSON file, or the JSON object itself (``--spec '{"granularity": "channel"}'``)."""
    spec: dict[str, Any] = {}
    if given is not None:
        inline = given.lstrip().startswith("{")
        path = Path(given)
        if not inline and not path.exists():
            raise UsageError(f"--spec {given} does not exist (give a JSON file or a JSON object)")
        try:
            loaded = json.loads(given if inline else path.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read --spec {path}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise UsageError(f"--spec {'(inline)' if inline else path} is not JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise UsageError(f"--spec {given} must hold a JSON object (the pruning spec)")
        spec = loaded
    if sparsity is not None:
        spec["target_sparsity"] = sparsity
    if not any(spec.get(kind) is not None for kind in ("target_sparsity", "search", "sweep", "sensitivity")):
        raise UsageError("give --sparsity (or target_sparsity, search, sweep or sensitivity in --spec)")
    return spec


def _existing(path: Path | None, what: str) -> Path | None:
    if path is not None and not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    return path


@contextmanager
def _model_file(source: Path) -> Iterator[Path]:
    """A SavedModel directory is zipped (streamed, to a temp file) so it can be uploaded; files pass as is."""
    if not source.is_dir():
        yield source
        return
    if not (source / "saved_model.pb").is_file():
        raise UsageError(
            f"{source} is a directory without saved_model.pb; give a SavedModel directory or archive"
        )
    with tempfile.TemporaryDirectory(prefix="secateurs-") as tmp:
        archive = Path(tmp) / f"{source.resolve().name or 'model'}.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(source.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(source).as_posix())
        yield archive


def _finish(
    client: Client,
    output: Output,
    job: Job,
    args: argparse.Namespace,
    report: dict[str, Any],
) -> int:
    """Wait with a progress line, then download the artifact / metrics as asked; print the outcome."""
    from app.client import ProgressPrinter

    progress = ProgressPrinter(output.err)
    try:
        job = client.wait_job(
            job.id, timeout=args.timeout, poll=args.poll, on_progress=progress, first_delay=job.retry_after
        )
    finally:
        progress.close()
    report["job"] = job.raw
    metrics = client.metrics(job.id)
    report["summary"] = metrics_summary(metrics)
    warning = drop_warning(job.raw, metrics, getattr(args, "warn_drop", DEFAULT_WARN_DROP))
    if warning is not None:  # advice only: stderr, exit code unchanged
        output.note(f"secateurs: {warning}")
        report["warning"] = warning
    lines = [f"job {job.id} succeeded: {report['summary']}"]
    if args.output is not None and (job.raw.get("spec") or {}).get("export"):
        # with exports, -o is a directory that receives every file of the job (SavedModel zip first)
        args.output.mkdir(parents=True, exist_ok=True)
        report["artifacts"] = {}
        for item in client.list_artifacts(job.id):
            path = client.download_artifact(job.id, args.output, name=item["name"])
            report["artifacts"][item["name"]] = str(path)
            size = _size(path.stat().st_size)
            lines.append(f"{item['name']}: {path} ({size}, length and sha-256 verified)")
        lines.extend(_export_lines(metrics))
    elif args.output is not None:
        path = client.download_artifact(job.id, args.output)
        report["artifact"] = str(path)
        lines.append(f"artifact: {path} ({_size(path.stat().st_size)}, length and sha-256 verified)")
    if args.metrics is not None:
        args.metrics.write_text(json.dumps(metrics, indent=2))
        report["metrics_file"] = str(args.metrics)
        lines.append(f"metrics:  {args.metrics}")
    report["metrics"] = metrics
    output.result(report, "\n".join(lines))
    return EXIT_OK


def _export_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per export: size, zip size and accuracy (or the converter's reason)."""
    lines = []
    for name, entry in (metrics.get("exports") or {}).items():
        if "error" in entry:
            lines.append(f"{name}: not produced: {entry['error']}")
            continue
        quality = entry.get("metrics") or {}
        accuracy = f", accuracy {quality['accuracy']:.4f}" if "accuracy" in quality else ""
        lines.append(f"{name}: {_size(entry['size_bytes'])}, zipped {_size(entry['zip_bytes'])}{accuracy}")
    return lines


def _with_exports(spec: dict[str, Any], exports: list[str] | None) -> dict[str, Any]:
    """``--export tflite:int8`` (repeatable) added to the spec's ``export.tflite`` (other keys kept)."""
    if not exports:
        return spec
    export = dict(spec.get("export") or {})
    formats = list(export.get("tflite") or [])
    for item in exports:
        if item not in formats:
            formats.append(item)
    return {**spec, "export": {**export, "tflite": formats}}


def _export_format(value: str) -> str:
    kind, _, fmt = value.partition(":")
    if kind != "tflite" or fmt not in EXPORT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected tflite:FORMAT with FORMAT one of {', '.join(EXPORT_FORMATS)}"
        )
    return fmt


def prune(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        spec = _read_spec(args.spec, args.sparsity)
        if args.preset is not None:
            spec["preset"] = args.preset
        spec = _with_exports(spec, args.export)
        train = _existing(args.train, "--train")
        evaluation = _existing(args.eval, "--eval")
        report: dict[str, Any] = {}
        model_id = args.model
        if Path(args.model).exists():
            with _model_file(Path(args.model)) as upload:
                model = client.upload_model(upload, name=args.name or Path(args.model).name)
            output.note(f"uploaded model {model.id} ({_size(model.size_bytes)}, {model.status})")
            report["model"] = model.raw
            model_id = model.id
        elif not args.model.startswith("mdl_"):
            raise UsageError(f"MODEL {args.model}: no such file or directory, and not a model id (mdl_...)")
        dataset_ids: dict[str, str | None] = {"train": None, "eval": None}
        for role, path in (("train", train), ("eval", evaluation)):
            if path is not None:
                dataset = client.upload_dataset(path)
                output.note(f"uploaded {role} dataset {dataset.id} ({dataset.n_samples} samples)")
                report[f"{role}_dataset"] = dataset.raw
                dataset_ids[role] = dataset.id
        job = client.create_job(model_id, spec, dataset_ids["train"], dataset_ids["eval"])
        output.note(spec_line(job.raw.get("spec")))  # what will run, presets resolved by the API
        report["job"] = job.raw
        if not (args.wait or args.output is not None or args.metrics is not None):
            output.result(
                report,
                f"job {job.id} {job.status}; follow it with `secateurs jobs wait {job.id} -o pruned.zip`",
            )
            return EXIT_OK
        output.note(f"job {job.id} {job.status}")
        return _finish(client, output, job, args, report)

    return _run_client(args, run)


# --- jobs / models ------------------------------------------------------------------------------------------


def jobs_list(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        jobs = client.list_jobs(status=args.status, model_id=args.model, limit=args.limit)
        rows = [_job_row(j) for j in jobs]
        output.result(
            [j.raw for j in jobs],
            lambda: table(rows, ["id", "status", "stage", "progress", "model", "created"]),
        )
        return EXIT_OK

    return _run_client(args, run)


def jobs_show(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        job = client.get_job(args.job_id)
        output.result(job.raw, lambda: _job_text(job))
        return EXIT_OK

    return _run_client(args, run)


def jobs_cancel(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        job = client.cancel_job(args.job_id)
        if job.status == "canceled":
            text = f"job {job.id} canceled"
        else:
            text = f"job {job.id} is {job.status}; it stops at its next stage boundary"
        output.result(job.raw, text)
        return EXIT_OK

    return _run_client(args, run)


def jobs_report(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        page = client.report(args.job_id)
        args.output.write_text(page, encoding="utf-8")
        output.result(
            {"job_id": args.job_id, "report": str(args.output), "bytes": len(page.encode())},
            f"report of job {args.job_id}: {args.output} ({_size(len(page.encode()))}); open it in a browser",
        )
        return EXIT_OK

    return _run_client(args, run)


def jobs_download(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        path = client.download_artifact(args.job_id, args.output, name=args.artifact)
        output.result(
            {"job_id": args.job_id, "artifact": args.artifact, "path": str(path)},
            f"{args.artifact}: {path} ({_size(path.stat().st_size)}, length and sha-256 verified)",
        )
        return EXIT_OK

    return _run_client(args, run)


def jobs_wait(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        return _finish(client, output, client.get_job(args.job_id), args, {})

    return _run_client(args, run)


def models_list(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        models = client.list_models(limit=args.limit)
        rows = [
            {
                "id": m.id,
                "name": m.name,
                "format": m.format,
                "status": m.status,
                "size": _size(m.size_bytes),
                "created": m.created_at.strftime("%Y-%m-%d %H:%M:%S") if m.created_at else None,
            }
            for m in models
        ]
        output.result(
            [m.raw for m in models],
            lambda: table(rows, ["id", "name", "format", "status", "size", "created"]),
        )
        return EXIT_OK

    return _run_client(args, run)


# --- keys (admin, direct database) --------------------------------------------------------------------------


def keys_create(args: argparse.Namespace) -> int:
    from app.auth import create_key

    settings = _settings(args)
    try:
        key_id, key = create_key(settings, args.tenant)
    except ValueError as exc:  # a tenant name the server would refuse
        print(f"secateurs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    Output(args.json).result(
        {"key_id": key_id, "tenant": args.tenant, "key": key},
        f"created API key {key_id} for tenant {args.tenant!r}:\n\n    {key}\n\n"
        "This is the only time the key is shown: store it now. Clients send it as "
        "'Authorization: Bearer <key>' (secateurs CLI: SECATEURS_API_KEY or --api-key).",
    )
    return EXIT_OK


def keys_revoke(args: argparse.Namespace) -> int:
    from app.auth import revoke_key

    settings = _settings(args)
    output = Output(args.json)
    if not revoke_key(settings, args.key_id):
        message = f"no active API key with id {args.key_id!r} (see `secateurs keys list`)"
        output.note(f"secateurs: {message}")
        if output.as_json:
            print(json.dumps({"error": {"kind": "usage", "message": message}}), file=output.out)
        return EXIT_USAGE
    output.result({"key_id": args.key_id, "revoked": True}, f"revoked API key {args.key_id}")
    return EXIT_OK


def keys_list(args: argparse.Namespace) -> int:
    from app.auth import list_keys

    settings = _settings(args)
    keys = list_keys(settings)
    columns: list[str] = []
    for key in keys:
        columns += [c for c in key if c not in columns and not isinstance(key[c], dict | list)]
    Output(args.json).result(keys, lambda: table(keys, columns))
    return EXIT_OK


# --- webhooks (admin, direct database) ----------------------------------------------------------------------


def webhooks_secret(args: argparse.Namespace) -> int:
    from app.auth import check_tenant
    from app.webhooks.tenants import admin_secret

    settings = _settings(args)
    try:
        check_tenant(args.tenant)
    except ValueError as exc:
        print(f"secateurs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = admin_secret(settings, args.tenant, rotate_it=args.rotate)
    text = f"webhook signing secret of tenant {args.tenant!r}:\n\n    {out.secret}\n"
    if out.previous_secret_expires_at is not None:
        text += f"\nThe previous secret also signs deliveries until {out.previous_secret_expires_at:%Y-%m-%d %H:%M:%S} UTC."
    Output(args.json).result({"tenant": args.tenant, **out.model_dump(mode="json")}, text)
    return EXIT_OK


def webhooks_set_url(args: argparse.Namespace) -> int:
    from app.auth import check_tenant
    from app.webhooks.tenants import admin_set_url

    settings = _settings(args)
    if (args.url is None) == (not args.clear):
        print("secateurs: give a URL or --clear (not both)", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_tenant(args.tenant)
        url = admin_set_url(settings, args.tenant, None if args.clear else args.url)
    except ValueError as exc:  # a bad tenant name, or UnsafeWebhookUrl (a ValueError) saying why
        print(f"secateurs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    text = f"tenant {args.tenant!r}: " + (f"new jobs report to {url}" if url else "no default webhook URL")
    Output(args.json).result({"tenant": args.tenant, "default_url": url}, text)
    return EXIT_OK


# --- cleanup (admin, direct database) -----------------------------------------------------------------------


def cleanup(args: argparse.Namespace) -> int:
    """One retention pass now, as the API's maintenance loop runs it every SECATEURS_REAPER_INTERVAL_S."""
    from app.db.engine import init_db, make_engine, make_session_factory
    from app.retention import sweep
    from app.storage import Storage

    settings = _settings(args)
    storage = Storage(settings.data_dir)  # creates the data directory, where SQLite's file lives
    engine = make_engine(settings.db_url)
    try:
        init_db(engine)
        report = sweep(settings, make_session_factory(engine), storage)
    finally:
        engine.dispose()
    counts = report.as_dict()
    Output(args.json).result(counts, "removed: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    return EXIT_OK


# --- the parser ---------------------------------------------------------------------------------------------


def _sparsity(value: str) -> float:
    try:
        sparsity = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from exc
    if not 0.0 < sparsity < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1 (exclusive), e.g. 0.8")
    return sparsity


def _non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return number


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return number


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="secateurs",
        description="Prune TensorFlow models over HTTP.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_serve = sub.add_parser("serve", help="run the API (and, with no broker configured, one worker)")
    p_serve.add_argument("--host", default=None, help="default SECATEURS_HOST or 127.0.0.1")
    p_serve.add_argument("--port", type=int, default=None, help="default SECATEURS_PORT or 8000")
    p_serve.add_argument("--data-dir", type=Path, default=None, help="default SECATEURS_DATA_DIR or ./var")
    p_serve.add_argument("--no-worker", action="store_true", help="embedded mode without the worker child")
    p_serve.set_defaults(func=serve)
    p_worker = sub.add_parser("worker", help="run a Celery worker process (production: with Redis)")
    p_worker.add_argument(
        "--concurrency", type=int, default=1, help="jobs at once in this process (default 1)"
    )
    p_worker.add_argument("--loglevel", default="INFO")
    p_worker.add_argument("--data-dir", type=Path, default=None)
    p_worker.set_defaults(func=worker)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("SECATEURS_URL") or DEFAULT_URL,
        help=f"the API's base URL (env SECATEURS_URL; default {DEFAULT_URL})",
    )
    common.add_argument(
        "--api-key",
        default=os.environ.get("SECATEURS_API_KEY"),
        help="API key (env SECATEURS_API_KEY, which keeps it out of the process list)",
    )
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("-o", "--output", type=Path, default=None, help="download the pruned model zip here")
    waiting.add_argument("--metrics", type=Path, default=None, help="write the metrics JSON here")
    waiting.add_argument(
        "--timeout", type=_positive, default=3600.0, help="seconds to wait for the job (default 3600)"
    )
    waiting.add_argument(
        "--poll", type=_positive, default=1.0, help="first poll interval in seconds; it grows to 10 s"
    )
    waiting.add_argument(
        "--warn-drop",
        type=_non_negative,
        default=DEFAULT_WARN_DROP,
        metavar="POINTS",
        help="warn on stderr when accuracy (or R^2) falls by more than this, absolute "
        f"(default {DEFAULT_WARN_DROP}; 1 never warns); the exit code is unchanged",
    )

    p_prune = sub.add_parser(
        "prune",
        parents=[common, waiting],
        help="upload a model (and datasets), start a pruning job, optionally wait and download",
        description="Upload MODEL and the datasets, start a pruning job; with --wait (implied by -o/--metrics) "
        "show progress, then download the pruned model and metrics.",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    p_prune.add_argument(
        "model",
        metavar="MODEL",
        help="a .zip/.tar.gz SavedModel, a SavedModel directory, a .keras file or mdl_ id",
    )
    p_prune.add_argument("--sparsity", type=_sparsity, default=None, help="target sparsity, 0 < s < 1")
    p_prune.add_argument("--train", type=Path, default=None, help=".npz for fine-tuning / gradient criteria")
    p_prune.add_argument("--eval", type=Path, default=None, help=".npz to measure baseline vs pruned")
    p_prune.add_argument(
        "--spec",
        default=None,
        help="JSON pruning spec: a file, or the object itself ('{\"granularity\": \"channel\"}'); "
        "--sparsity overrides its target",
    )
    p_prune.add_argument("--name", default=None, help="display name of the uploaded model")
    p_prune.add_argument(
        "--preset",
        choices=("fast", "recommended"),
        default=None,
        help="fast: one-shot, global LAMP ranking, no fine-tuning; recommended: fine-tuning with distillation "
        "(needs --train). Default: recommended with --train and no schedule/fine_tune in --spec, else fast",
    )
    p_prune.add_argument(
        "--export",
        action="append",
        type=_export_format,
        default=None,
        metavar="tflite:FORMAT",
        help=f"also convert the pruned model (repeatable; FORMAT: {', '.join(EXPORT_FORMATS)}); "
        "-o is then a directory receiving every file",
    )
    p_prune.add_argument("--wait", action="store_true", help="wait for the job, showing stage and percent")
    p_prune.set_defaults(func=prune)

    p_jobs = sub.add_parser("jobs", help="list, show, cancel or wait for jobs")
    jobs_sub = p_jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    p_list = jobs_sub.add_parser("list", parents=[common], help="jobs, newest first")
    p_list.add_argument(
        "--status", choices=["queued", "running", "succeeded", "failed", "canceled"], default=None
    )
    p_list.add_argument("--model", default=None, help="only jobs of this model id")
    p_list.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p_list.set_defaults(func=jobs_list)
    p_show = jobs_sub.add_parser("show", parents=[common], help="one job's state, error and spec")
    p_show.add_argument("job_id", metavar="ID")
    p_show.set_defaults(func=jobs_show)
    p_cancel = jobs_sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    p_cancel.add_argument("job_id", metavar="ID")
    p_cancel.set_defaults(func=jobs_cancel)
    p_wait = jobs_sub.add_parser(
        "wait", parents=[common, waiting], help="wait for a job, then download its artifact / metrics"
    )
    p_wait.add_argument("job_id", metavar="ID")
    p_wait.set_defaults(func=jobs_wait)
    p_download = jobs_sub.add_parser(
        "download", parents=[common], help="download one file of a succeeded job (see its artifacts)"
    )
    p_download.add_argument("job_id", metavar="ID")
    p_download.add_argument(
        "--artifact",
        default="saved_model",
        help="saved_model (default), tflite_float32, tflite_float16, tflite_dynamic_range, tflite_int8, ...",
    )
    p_download.add_argument(
        "-o", "--output", type=Path, default=Path("."), help="file or existing directory (default .)"
    )
    p_download.set_defaults(func=jobs_download)
    p_report = jobs_sub.add_parser(
        "report", parents=[common], help="save a succeeded job's HTML report (self-contained page)"
    )
    p_report.add_argument("job_id", metavar="ID")
    p_report.add_argument(
        "-o", "--output", type=Path, default=Path("report.html"), help="where to write it (default report.html)"
    )
    p_report.set_defaults(func=jobs_report)

    p_models = sub.add_parser("models", help="list models")
    models_sub = p_models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p_mlist = models_sub.add_parser("list", parents=[common], help="models, newest first")
    p_mlist.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p_mlist.set_defaults(func=models_list)

    p_keys = sub.add_parser(
        "keys", help="admin: create, revoke and list API keys (works on the server's database directly)"
    )
    keys_sub = p_keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--data-dir", type=Path, default=None, help="default SECATEURS_DATA_DIR or ./var")
    admin.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p_create = keys_sub.add_parser("create", parents=[admin], help="new key for a tenant; shown once")
    p_create.add_argument("--tenant", required=True, help="the tenant the key acts as")
    p_create.set_defaults(func=keys_create)
    p_revoke = keys_sub.add_parser("revoke", parents=[admin], help="revoke a key at once")
    p_revoke.add_argument("key_id", metavar="KEY_ID")
    p_revoke.set_defaults(func=keys_revoke)
    p_klist = keys_sub.add_parser("list", parents=[admin], help="keys (never their secret)")
    p_klist.set_defaults(func=keys_list)

    p_hooks = sub.add_parser(
        "webhooks", help="admin: a tenant's webhook signing secret and default URL (on the server's database)"
    )
    hooks_sub = p_hooks.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")
    p_secret = hooks_sub.add_parser(
        "secret", parents=[admin], help="show the tenant's signing secret (made if missing)"
    )
    p_secret.add_argument("--tenant", required=True, help="the tenant whose webhooks it signs")
    p_secret.add_argument(
        "--rotate", action="store_true", help="replace it first; the old one co-signs for 24 h"
    )
    p_secret.set_defaults(func=webhooks_secret)
    p_url = hooks_sub.add_parser(
        "set-url", parents=[admin], help="the URL that jobs created without webhook_url report to"
    )
    p_url.add_argument("--tenant", required=True)
    p_url.add_argument(
        "url", metavar="URL", nargs="?", default=None, help="http(s) URL, checked like the API does"
    )
    p_url.add_argument("--clear", action="store_true", help="remove the default URL")
    p_url.set_defaults(func=webhooks_set_url)

    p_cleanup = sub.add_parser(
        "cleanup",
        parents=[admin],
        help="admin: delete models, datasets and job outputs past their retention period (SECATEURS_*_TTL_*)",
    )
    p_cleanup.set_defaults(func=cleanup)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        job = " (the job goes on running on the server)" if args.command in ("prune", "jobs") else ""
        print(f"\nsecateurs: interrupted{job}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
