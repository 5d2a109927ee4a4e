"""Admin commands that work on the server's database (and blob store) directly: ``keys``, ``webhooks`` and
``cleanup``. They run where the server's settings are, not over HTTP."""

from __future__ import annotations

import argparse
import json
import sys

from app.cli.output import EXIT_OK, EXIT_USAGE, Output, table
from app.cli.settings import load_settings


def keys_create(args: argparse.Namespace) -> int:
    from app.auth import create_key

    settings = load_settings(args)
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

    settings = load_settings(args)
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

    settings = load_settings(args)
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

    settings = load_settings(args)
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

    settings = load_settings(args)
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

    settings = load_settings(args)
    storage = Storage.from_settings(settings)  # creates the data directory, where SQLite's file lives
    engine = make_engine(settings.db_url)
    try:
        init_db(engine)
        report = sweep(settings, make_session_factory(engine), storage)
    finally:
        engine.dispose()
    counts = report.as_dict()
    Output(args.json).result(counts, "removed: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    return EXIT_OK
