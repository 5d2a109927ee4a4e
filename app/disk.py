"""A full disk, wherever it shows: the API answers 507 "free some space" for it, not 503 "retry shortly"."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# A full disk, or the service account's quota used up: either way nothing more can be written.
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"
_PG_DISK_FULL = "53100"  # SQLSTATE disk_full


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` is a full disk however it surfaced: an OSError from a write, or a database driver's
    error (SQLite's SQLITE_FULL, PostgreSQL's SQLSTATE 53100), also when wrapped (SQLAlchemy's ``.orig``,
    ``raise ... from``). Such a failure deserves 507 and "free some space", not 503 "retry shortly"."""
    current: BaseException | None = exc
    for _ in range(8):  # a short chain; never loops on a cycle
        if current is None:
            return False
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if getattr(current, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if getattr(current, "sqlstate", None) == _PG_DISK_FULL:
            return True
        current = getattr(current, "orig", None) or current.__cause__
    return False


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding ``path``, so uploads are refused (507) before the disk fills."""
    return shutil.disk_usage(path).free
