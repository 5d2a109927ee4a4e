"""`secateurs` console script: serve (API, plus the embedded worker when no broker is set) and worker.

The CLI launches workers as processes; nothing under app/ imports worker/.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from app.config import Settings


def _settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "data_dir", None):
        os.environ["SECATEURS_DATA_DIR"] = str(args.data_dir)
    from app.config import get_settings

    get_settings.cache_clear()
    try:
        return get_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        sys.exit(f"secateurs: bad configuration: {exc}")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.embedded import EmbeddedWorker, recover
    from app.main import create_app

    settings = _settings(args)
    host = args.host or settings.host
    port = args.port or settings.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("secateurs")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    worker = None
    if settings.embedded and not args.no_worker:
        jobs, models = recover(settings)
        if jobs or models:
            log.info("recovered after restart: re-sent %d job(s) and %d model validation(s)", jobs, models)
        worker = EmbeddedWorker(settings)
        worker.start()
        log.info("embedded mode: data in %s, one worker child process, no external server", settings.data_dir)
    app = create_app(settings, embedded_worker=worker)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    finally:
        if worker is not None:
            worker.stop()
    return 0


def worker(args: argparse.Namespace) -> int:
    from app.embedded import settings_env, worker_command

    settings = _settings(args)
    if settings.embedded and not settings.broker_url:
        print(
            "secateurs worker: no SECATEURS_BROKER_URL set; using the embedded file transport in "
            f"{settings.broker_dir}",
            file=sys.stderr,
        )
    command = worker_command(concurrency=args.concurrency, loglevel=args.loglevel)
    os.execve(sys.executable, command, settings_env(settings))
    return 0  # pragma: no cover  (execve does not return)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="secateurs", description="Prune TensorFlow models over HTTP.")
    sub = parser.add_subparsers(dest="command", required=True)
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
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
