"""The local store: keys are paths below a directory (the data directory unless ``file:///path`` names
another), exactly the files the embedded default always wrote, each moved into place with one atomic rename."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from app.storage.base import BlobInfo, StoreMisconfigured


class LocalBlobStore:
    """Keys are paths below ``root``: today's data directory layout, unchanged."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()
        self._tmp = self.root / "tmp"

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"blob key {key!r} leaves the store")
        return path

    def put_file(self, key: str, path: Path) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, dest)  # same filesystem (uploads land in root/tmp): atomic
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")  # another filesystem: copy, rename
            try:
                shutil.copyfile(path, part)
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)
            path.unlink(missing_ok=True)

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def head(self, key: str) -> BlobInfo:
        st = self.path(key).stat()
        return BlobInfo(key, st.st_size, max(st.st_mtime, st.st_ctime))

    def list(self, prefix: str) -> list[BlobInfo]:
        base = self.path(prefix.rstrip("/"))
        if base.is_file():
            return [self.head(prefix)]
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.is_file():
                out.append(
                    BlobInfo(p.relative_to(self.root).as_posix(), st.st_size, max(st.st_mtime, st.st_ctime))
                )
        return out

    def delete_prefix(self, prefix: str) -> int:
        """Rename into tmp/ first, so readers see the whole blob or nothing, then delete."""
        path = self.path(prefix.rstrip("/"))
        self._tmp.mkdir(parents=True, exist_ok=True)
        trash = self._tmp / f"trash-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return 0
        if trash.is_dir():
            count = sum(1 for p in trash.rglob("*") if p.is_file())
            shutil.rmtree(trash, ignore_errors=True)
            return count
        trash.unlink(missing_ok=True)
        return 1

    def presign_get(self, key: str, expires_s: int, filename: str | None = None) -> str | None:
        return None

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StoreMisconfigured(f"the data directory {self.root} (SECATEURS_DATA_DIR) is not writable")
