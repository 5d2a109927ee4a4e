"""Client commands: ``prune``, ``jobs``, ``models`` and ``datasets`` talk HTTP through :mod:`app.client` only, exactly as
any other service would, so the CLI is also the client's first user. Client errors map to exit codes in one
place (:func:`_exit_for`)."""

from __future__ import annotations

import argparse
import json
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from app.cli.output import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Output,
    export_lines,
    human_size,
    job_row,
    job_text,
    metrics_summary,
    table,
)
from app.drop_warning import DEFAULT_WARN_DROP, drop_warning, spec_line
from app.schemas.vocabulary import ONNX_ARTIFACT, TARGET_FIELDS, TFLiteFormat

if TYPE_CHECKING:
    from app.client import Client, Job

DEFAULT_URL = "http://127.0.0.1:8000"
EXPORT_FORMATS: tuple[str, ...] = get_args(TFLiteFormat)


class UsageError(Exception):
    """A problem with the command line or local files, found before anything was sent."""


def _exit_for(exc: BaseException) -> tuple[int, dict[str, Any], str]:
    """(exit code, JSON error object, message for people) for anything a client command can raise."""
    from app.client import (
        ApiError,
        ConnectionFailed,
        DatasetInvalid,
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
    if isinstance(exc, DatasetInvalid):
        error = {"kind": "dataset", "status": "invalid", "code": exc.code, "message": exc.message}
        return EXIT_JOB_FAILED, {**error, "dataset": exc.dataset.raw}, str(exc)
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
    if not any(spec.get(field) is not None for field in TARGET_FIELDS):
        raise UsageError(f"give --sparsity (or {', '.join(TARGET_FIELDS[:-1])} or {TARGET_FIELDS[-1]} in --spec)")
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
            size = human_size(path.stat().st_size)
            lines.append(f"{item['name']}: {path} ({size}, length and sha-256 verified)")
        lines.extend(export_lines(metrics))
    elif args.output is not None:
        path = client.download_artifact(job.id, args.output)
        report["artifact"] = str(path)
        lines.append(f"artifact: {path} ({human_size(path.stat().st_size)}, length and sha-256 verified)")
    if args.metrics is not None:
        args.metrics.write_text(json.dumps(metrics, indent=2))
        report["metrics_file"] = str(args.metrics)
        lines.append(f"metrics:  {args.metrics}")
    report["metrics"] = metrics
    output.result(report, "\n".join(lines))
    return EXIT_OK


def _with_exports(spec: dict[str, Any], exports: list[str] | None) -> dict[str, Any]:
    """``--export tflite:int8`` (repeatable) added to the spec's ``export.tflite``, ``--export onnx`` as
    ``export.onnx: true`` (other keys kept)."""
    if not exports:
        return spec
    export = dict(spec.get("export") or {})
    formats = list(export.get("tflite") or [])
    for item in exports:
        if item == ONNX_ARTIFACT:
            export["onnx"] = True
        elif item not in formats:
            formats.append(item)
    return {**spec, "export": {**export, "tflite": formats}}


def export_format(value: str) -> str:
    """``tflite:FORMAT`` -> FORMAT; ``onnx`` -> ``onnx``."""
    if value == ONNX_ARTIFACT:
        return value
    kind, _, fmt = value.partition(":")
    if kind != "tflite" or fmt not in EXPORT_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected tflite:FORMAT with FORMAT one of {', '.join(EXPORT_FORMATS)}, or onnx"
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
        calibration = _existing(getattr(args, "calibration", None), "--calibration")
        report: dict[str, Any] = {}
        model_id = args.model
        if Path(args.model).exists():
            with _model_file(Path(args.model)) as upload:
                model = client.upload_model(upload, name=args.name or Path(args.model).name)
            output.note(f"uploaded model {model.id} ({human_size(model.size_bytes)}, {model.status})")
            report["model"] = model.raw
            model_id = model.id
        elif not args.model.startswith("mdl_"):
            raise UsageError(f"MODEL {args.model}: no such file or directory, and not a model id (mdl_...)")
        dataset_ids: dict[str, str | None] = {"train": None, "eval": None, "calibration": None}
        for role, path in (("train", train), ("eval", evaluation), ("calibration", calibration)):
            if path is not None:
                dataset = client.upload_dataset(path)
                if dataset.pending:  # not a small .npz: a worker reads it before a job may use it
                    output.note(f"{role} dataset {dataset.id} is {dataset.status}; waiting until it is ready")
                    dataset = client.wait_dataset(dataset.id, timeout=args.timeout)
                output.note(f"uploaded {role} dataset {dataset.id} ({dataset.n_samples} samples)")
                report[f"{role}_dataset"] = dataset.raw
                dataset_ids[role] = dataset.id
        job = client.create_job(
            model_id,
            spec,
            dataset_ids["train"],
            dataset_ids["eval"],
            calibration_dataset_id=dataset_ids["calibration"],
        )
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
        rows = [job_row(j) for j in jobs]
        output.result(
            [j.raw for j in jobs],
            lambda: table(rows, ["id", "status", "stage", "progress", "model", "created"]),
        )
        return EXIT_OK

    return _run_client(args, run)


def jobs_show(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        job = client.get_job(args.job_id)
        output.result(job.raw, lambda: job_text(job))
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
            f"report of job {args.job_id}: {args.output} ({human_size(len(page.encode()))}); open it in a browser",
        )
        return EXIT_OK

    return _run_client(args, run)


def jobs_download(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        path = client.download_artifact(args.job_id, args.output, name=args.artifact)
        output.result(
            {"job_id": args.job_id, "artifact": args.artifact, "path": str(path)},
            f"{args.artifact}: {path} ({human_size(path.stat().st_size)}, length and sha-256 verified)",
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
                "size": human_size(m.size_bytes),
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


# --- datasets -----------------------------------------------------------------------------------------------


def _json_object_arg(value: str | None, option: str) -> dict[str, Any] | None:
    """A JSON object given inline (``'{"image": {...}}'``) or as a file path."""
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise UsageError(f"{option}: {value!r} is neither a JSON object nor a file")
        text = path.read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{option} is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise UsageError(f"{option} must be a JSON object")
    return parsed


def _dataset_row(d: Any) -> dict[str, Any]:
    return {
        "id": d.id,
        "name": d.name,
        "format": d.format,
        "status": d.status,
        "samples": d.n_samples,
        "size": human_size(d.size_bytes) if d.size_bytes is not None else None,
        "created": d.created_at.strftime("%Y-%m-%d %H:%M:%S") if d.created_at else None,
    }


def _dataset_text(d: Any) -> str:
    lines = [f"dataset {d.id} ({d.name}): {d.format}, {d.status}"]
    if d.source:
        lines.append(f"  source: {d.source}")
    if d.progress is not None and d.pending:
        lines.append(f"  progress: {d.progress:.0%}")
    for label, value in (("samples", d.n_samples), ("shards", d.shards), ("classes", d.class_names)):
        if value is not None:
            lines.append(f"  {label}: {value}")
    if d.arrays:
        lines.append(
            "  arrays: " + ", ".join(f"{k} {v.get('shape')} {v.get('dtype')}" for k, v in d.arrays.items())
        )
    if d.error is not None:
        lines.append(f"  error [{d.error.code}]: {d.error.message}")
    return "\n".join(lines)


def _maybe_wait(client: Client, output: Output, dataset: Any, args: argparse.Namespace) -> int:
    if not args.wait or not dataset.pending:
        output.result(dataset.raw, lambda: _dataset_text(dataset))
        return EXIT_OK
    output.note(f"dataset {dataset.id} is {dataset.status}; waiting for a worker to read it")
    ready = client.wait_dataset(dataset.id, timeout=args.timeout)
    output.result(ready.raw, lambda: _dataset_text(ready))
    return EXIT_OK


def datasets_add(args: argparse.Namespace) -> int:
    """Register data by reference (``s3://`` or ``file:///``): the server must allow its prefix."""

    def run(client: Client, output: Output) -> int:
        dataset = client.register_dataset(
            args.source,
            format=args.format,
            features=_json_object_arg(args.features, "--features"),
            inputs=_json_object_arg(args.inputs, "--inputs"),
            label=args.label,
            compression=args.compression,
            name=args.name,
        )
        return _maybe_wait(client, output, dataset, args)

    return _run_client(args, run)


def datasets_upload(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        path = _existing(args.file, "dataset file")
        assert path is not None
        description = _json_object_arg(args.description, "--description")
        dataset = client.upload_dataset(path, name=args.name, description=description)
        return _maybe_wait(client, output, dataset, args)

    return _run_client(args, run)


def datasets_list(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        datasets = client.list_datasets(limit=args.limit)
        rows = [_dataset_row(d) for d in datasets]
        output.result(
            [d.raw for d in datasets],
            lambda: table(rows, ["id", "name", "format", "status", "samples", "size", "created"]),
        )
        return EXIT_OK

    return _run_client(args, run)


def datasets_show(args: argparse.Namespace) -> int:
    def run(client: Client, output: Output) -> int:
        dataset = client.get_dataset(args.dataset_id)
        output.result(dataset.raw, lambda: _dataset_text(dataset))
        return EXIT_OK

    return _run_client(args, run)
