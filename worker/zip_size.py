"""The deflate zip size of a model directory, computed in a background thread without writing the zip.

The baseline's ``size_bytes.zip`` used to be measured by zipping the whole input SavedModel to disk and deleting
the file: 7 s of a 100 s job on a 200 MB model, spent before pruning could start. Here the same zip is written
into a sink that only counts bytes (``ZipFile`` on a seekable byte counter, so headers are written exactly as
into a file), in a thread that overlaps loading, evaluation and pruning: ``zlib`` and file reads release the
GIL. The bytes equal ``worker.evaluation.size.zip_dir``'s file (same entries, order, timestamps, level; a
test compares them), so baseline and pruned sizes stay comparable. ``cancel`` stops it within one chunk.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

from worker.evaluation.size import ZipCanceled, write_zip

__all__ = ["ZipSizeInBackground", "deflate_zip_size"]


class _CountingSink(io.RawIOBase):
    """A seekable file that keeps no bytes: its size is the furthest position ever written."""

    def __init__(self) -> None:
        super().__init__()
        self.position = 0
        self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        n = memoryview(data).nbytes
        self.position += n
        self.size = max(self.size, self.position)
        return n

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position


def deflate_zip_size(src_dir: Path, compresslevel: int = 6, stop: threading.Event | None = None) -> int:
    """Bytes of ``zip_dir(src_dir, ...)``'s zip, without writing it; raises ``ZipCanceled`` once ``stop`` is set."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise NotADirectoryError(f"{src_dir} is not a directory")
    sink = _CountingSink()
    write_zip(src_dir, sink, compresslevel, stop)  # type: ignore[arg-type]
    return sink.size


class ZipSizeInBackground:
    """``deflate_zip_size(src_dir)`` in a daemon thread: ``result()`` waits for it, ``cancel()`` stops it."""

    def __init__(self, src_dir: Path, compresslevel: int = 6) -> None:
        self._stop = threading.Event()
        self._size: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(Path(src_dir), compresslevel), name="zip-size", daemon=True
        )
        self._thread.start()

    def _run(self, src_dir: Path, compresslevel: int) -> None:
        try:
            self._size = deflate_zip_size(src_dir, compresslevel, self._stop)
        except ZipCanceled:
            pass
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> int:
        """The zip size; re-raises whatever the thread raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._size is None:
            raise RuntimeError("the zip size computation was canceled")
        return self._size

    def cancel(self) -> None:
        """Stop the thread at its next chunk and wait for it (idempotent; harmless once finished)."""
        self._stop.set()
        self._thread.join()
