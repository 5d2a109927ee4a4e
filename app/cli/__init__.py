"""`secateurs` console script: the parser table and :func:`main`.

Server side (:mod:`.server`): ``serve`` (API, plus the embedded worker when no broker is set) and ``worker``.
Admin (:mod:`.admin`): ``keys``, ``webhooks`` and ``cleanup`` work on the database directly (they run where the
server's settings are). Client side (:mod:`.remote`): ``prune``, ``jobs``, ``models`` talk HTTP through
:mod:`app.client` only. :mod:`.output` formats what they print and holds the exit codes.

Importing this package loads no server stack (FastAPI, SQLAlchemy, pydantic): each command imports what it
needs when it runs, so the client commands start fast and work with only httpx installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from app.cli.admin import cleanup, keys_create, keys_list, keys_revoke, webhooks_secret, webhooks_set_url
from app.cli.output import EXIT_INTERRUPTED
from app.cli.remote import (
    DEFAULT_URL,
    EXPORT_FORMATS,
    datasets_add,
    datasets_list,
    datasets_show,
    datasets_upload,
    export_format,
    jobs_cancel,
    jobs_download,
    jobs_list,
    jobs_report,
    jobs_show,
    jobs_wait,
    models_list,
    prune,
)
from app.cli.server import serve, worker
from app.drop_warning import DEFAULT_WARN_DROP

EPILOG = """\
exit codes:
  0  success
  1  the job failed or was canceled (its error code and message are printed)
  2  usage or validation error: bad arguments or files, or the server refused the request (4xx; detail printed)
  3  server unavailable: no connection, a 5xx/429 answer, or a download that failed verification
  4  timeout: --wait ran past --timeout (the job goes on running on the server)

client commands (prune, jobs, models, datasets) read SECATEURS_URL (default http://127.0.0.1:8000) and SECATEURS_API_KEY;
with --json they print exactly one JSON document on stdout, also on failure ({"error": {...}}).
"""


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
        "--calibration",
        type=Path,
        default=None,
        help=".npz of inputs (labels ignored) for criteria wanda / sparsegpt and reconstruct; without it "
        "--train serves. With it and no criterion in --spec, preset fast prunes with sparsegpt",
    )
    p_prune.add_argument(
        "--spec",
        default=None,
        help='JSON pruning spec: a file, or the object itself (\'{"granularity": "channel"}\'); '
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
        type=export_format,
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
        "-o",
        "--output",
        type=Path,
        default=Path("report.html"),
        help="where to write it (default report.html)",
    )
    p_report.set_defaults(func=jobs_report)

    p_models = sub.add_parser("models", help="list models")
    models_sub = p_models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p_mlist = models_sub.add_parser("list", parents=[common], help="models, newest first")
    p_mlist.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p_mlist.set_defaults(func=models_list)

    p_datasets = sub.add_parser("datasets", help="register, upload, list or show datasets")
    datasets_sub = p_datasets.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    dataset_wait = argparse.ArgumentParser(add_help=False)
    dataset_wait.add_argument("--wait", action="store_true", help="wait until a worker has read it (ready)")
    dataset_wait.add_argument(
        "--timeout", type=_positive, default=3600.0, help="seconds to wait with --wait (default 3600)"
    )
    p_dadd = datasets_sub.add_parser(
        "add",
        parents=[common, dataset_wait],
        help="register data by reference (s3:// or file:///), read where it lies",
        description="Register SOURCE (a folder ending in / or one file) without uploading it; the server must "
        "allow its prefix (SECATEURS_DATASET_SOURCES). It starts validating; --wait waits for ready.",
    )
    p_dadd.add_argument("source", metavar="SOURCE", help="s3://bucket/prefix/ or file:///abs/dir/")
    p_dadd.add_argument(
        "--format",
        required=True,
        choices=("tfrecord", "parquet", "image_folder", "npz"),
        help="how it is stored",
    )
    p_dadd.add_argument("--features", default=None, help="JSON object (or file): TFRecord features")
    p_dadd.add_argument(
        "--inputs", default=None, help="JSON object (or file): signature input -> feature/column"
    )
    p_dadd.add_argument("--label", default=None, help="the feature or column holding the labels")
    p_dadd.add_argument("--compression", choices=("GZIP", "ZLIB"), default=None, help="TFRecord compression")
    p_dadd.add_argument("--name", default=None, help="display name (default: the source)")
    p_dadd.set_defaults(func=datasets_add)
    p_dup = datasets_sub.add_parser(
        "upload",
        parents=[common, dataset_wait],
        help="upload an .npz, .tfrecord(.gz), .parquet, or a .tar/.zip of shards or of an image folder",
    )
    p_dup.add_argument("file", type=Path, metavar="FILE")
    p_dup.add_argument(
        "--description",
        default=None,
        help="JSON object (or file): format, compression, features, inputs, label",
    )
    p_dup.add_argument("--name", default=None, help="display name (default: the file name)")
    p_dup.set_defaults(func=datasets_upload)
    p_dlist = datasets_sub.add_parser("list", parents=[common], help="datasets, newest first")
    p_dlist.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p_dlist.set_defaults(func=datasets_list)
    p_dshow = datasets_sub.add_parser("show", parents=[common], help="one dataset's status, shape and error")
    p_dshow.add_argument("dataset_id", metavar="ID")
    p_dshow.set_defaults(func=datasets_show)

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
