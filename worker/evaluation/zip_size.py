"""The deflate zip size of a model directory, computed in a background thread without writing the zip.

The baseline's ``size_bytes.zip`` used to be measured by zipping the whole input SavedModel to disk and deleting
the file: 7 s of a 100 s job on a 200 MB model, spent before pruning could start. Here the same zip is written
into a sink that only counts bytes (``ZipFile`` on a seekable byte counter, so headers are written exactly as
into a file), in a thread that overlaps loading, evaluation and pruning: ``zlib`` and file reads release the
GIL. The bytes equal ``worker.evaluation.size.zip_dir``'s file (same entries, order, timestamps, level and
deflate blocks; a test compares them), so baseline and pruned sizes stay comparable. It deflates on ONE thread
(the job has the other core), where the artifact zip uses all of them: same bytes either way. ``cancel``
stops it within one chunk.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path

from worker.evaluation.size import ZipCanceled, write_zip

__all__ = ["ZipSizeInBackground", "deflate_zip_size", "shared_zip_size"]


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


def deflate_zip_size(
    src_dir: Path,
    compresslevel: int = 6,
    stop: threading.Event | None = None,
    gate: threading.Event | None = None,
    boost: threading.Event | None = None,
) -> int:
    """Bytes of ``zip_dir(src_dir, ...)``'s zip, without writing it; raises ``ZipCanceled`` once ``stop`` is set.
    One deflate thread (it runs beside a job) until ``boost`` is set: then every core (``write_zip``)."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise NotADirectoryError(f"{src_dir} is not a directory")
    sink = _CountingSink()
    write_zip(src_dir, sink, compresslevel, stop, gate, threads=1, boost=boost)  # type: ignore[arg-type]
    return sink.size


def cache_path(src_dir: Path, compresslevel: int) -> Path:
    """Beside the directory (an uploaded model's extracted SavedModel never changes), so every later job on
    the same model reads the number instead of compressing hundreds of MB again. ``blocks``: a size cached by
    the single-stream zip of before block deflate is ~20 bytes a MiB smaller, so it is not read."""
    return src_dir.parent / f".{src_dir.name}.zip-size-blocks-{compresslevel}"


class ZipSizeInBackground:
    """``deflate_zip_size(src_dir)`` in a daemon thread: ``result()`` waits for it, ``cancel()`` stops it.
    With ``cache``, a size computed before for this directory is read back, and a new one is written."""

    def __init__(self, src_dir: Path, compresslevel: int = 6, cache: bool = False) -> None:
        self._stop = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self._boost = threading.Event()
        self._size: int | None = None
        self._error: BaseException | None = None
        self._cache = cache_path(Path(src_dir), compresslevel) if cache else None
        self._thread = threading.Thread(
            target=self._run, args=(Path(src_dir), compresslevel), name="zip-size", daemon=True
        )
        self._thread.start()

    def _run(self, src_dir: Path, compresslevel: int) -> None:
        try:
            if self._cache is not None and self._cache.is_file():
                with contextlib.suppress(ValueError):
                    self._size = int(self._cache.read_text())
                    return
            self._size = deflate_zip_size(src_dir, compresslevel, self._stop, self._gate, self._boost)
            if self._cache is not None:
                tmp = self._cache.with_name(f"{self._cache.name}.{os.getpid()}.tmp")
                tmp.write_text(str(self._size))
                os.replace(tmp, self._cache)  # two workers may race: both write the same number
        except ZipCanceled:
            pass
        except OSError as exc:
            if self._size is None:  # a cache we could not write is no reason to fail the job
                self._error = exc
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    @property
    def canceled(self) -> bool:
        return self._stop.is_set()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def pause(self) -> None:
        """Hold the thread at its next chunk (while latency is measured: a busy core would be noise)."""
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    def result(self) -> int:
        """The zip size; re-raises whatever the thread raised. The caller now only waits for it, so the rest
        is deflated on every core (a one-shot ResNet-50 job's save stage waited ~6 s on one thread)."""
        self._gate.set()
        self._boost.set()
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


# One computation per model directory per process, shared: a validation starts it (the model is known to be
# worth measuring, and the worker is otherwise idle until the job arrives), the job attaches to it.
_shared: dict[Path, ZipSizeInBackground] = {}
_shared_lock = threading.Lock()
_SHARED_MAX = 4


def shared_zip_size(src_dir: Path, compresslevel: int = 6) -> ZipSizeInBackground:
    """The process's cached computation for ``src_dir`` (running or done), or a new one; a canceled or
    failed one is replaced. Always ``cache=True``: only for directories that never change (uploads)."""
    key = Path(src_dir).resolve()
    with _shared_lock:
        current = _shared.get(key)
        if current is None or current.canceled or current.failed:
            current = ZipSizeInBackground(key, compresslevel, cache=True)
            _shared[key] = current
            while len(_shared) > _SHARED_MAX:
                _shared.pop(next(iter(_shared)))
        return current
