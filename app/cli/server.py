"""``serve`` (the API, plus the embedded worker when no broker is set) and ``worker``.

The CLI launches workers as processes; nothing under app/ imports worker/."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from app.cli.output import EXIT_OK, EXIT_USAGE
from app.cli.settings import load_settings

if TYPE_CHECKING:
    from app.config import Settings

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


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


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.embedded import EmbeddedWorker, recover
    from app.main import create_app

    settings = load_settings(args)
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

    settings = load_settings(args)
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
        settings, loglevel=args.loglevel, concurrency=args.concurrency, hostname=f"secateurs-{os.getpid()}@%h"
    )

    def _stop(signum: int, frame: object) -> None:
        supervisor.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    supervisor.start()
    supervisor.wait()
    supervisor.stop()
    return EXIT_OK
