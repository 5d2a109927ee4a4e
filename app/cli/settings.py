"""The server's settings for the commands that run beside it (serve, worker and the admin commands)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.config import Settings


def load_settings(args: argparse.Namespace) -> Settings:
    """``--data-dir`` wins over the environment; the settings are read afresh (not the cached ones) and a bad
    value ends the command with the reason, not a traceback."""
    if getattr(args, "data_dir", None):
        os.environ["SECATEURS_DATA_DIR"] = str(args.data_dir)
    from app.config import get_settings

    get_settings.cache_clear()
    try:
        return get_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        sys.exit(f"secateurs: bad configuration: {exc}")
