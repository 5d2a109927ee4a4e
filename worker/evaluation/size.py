"""Model size: on-disk bytes of a model directory, its zipped form (what a user downloads), and weight counts.

The zip is deterministic -- sorted entries, fixed timestamps, permissions from the files -- so the same
pruned model always gives the same bytes (stable ETag, comparable sizes between baseline and pruned).
Unstructured zeros do not shrink the SavedModel (variables are stored dense) but deflate well, which is why
both sizes are reported.

Deflate is the slow part (15-25 MB/s a core at level 6 on float weights), so files are compressed the way pigz
does it: fixed 1 MiB blocks, each deflated on its own with the previous block's last 32 KiB as its dictionary
and ended by a sync flush, the results concatenated into one valid raw deflate stream. A block's bytes depend
only on its input, its dictionary and the level, never on which thread ran it, so the zip is byte-identical
for 1 or N threads: the baseline size counted on one thread beside a running job equals the artifact zip
written on every core.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import uuid
import zipfile
import zlib
from collections import deque
from collections.abc import Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = ["ZipCanceled", "dir_size", "param_counts", "write_zip", "zip_dir"]

_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest time a zip can hold
_CHUNK = 1 << 20  # read size, and the deflate block: part of the output format, never tie it to the host
_WINDOW = 1 << 15  # deflate's back-reference distance: all of the previous block a block can use


def dir_size(path: Path) -> int:
    """Total bytes of the regular files under ``path``; symlinks are neither followed nor counted."""
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _entries(src_dir: Path) -> list[tuple[Path, str, bool]]:
    """(path, arcname, is_dir) in sorted order; symlinks and special files are skipped (not ours to ship)."""
    entries: list[tuple[Path, str, bool]] = []
    for root, dirs, files in os.walk(src_dir, followlinks=False):
        dirs.sort()
        base = Path(root)
        for name in dirs:
            path = base / name
            if not path.is_symlink():
                entries.append((path, path.relative_to(src_dir).as_posix() + "/", True))
        for name in sorted(files):
            path = base / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                entries.append((path, path.relative_to(src_dir).as_posix(), False))
    return sorted(entries, key=lambda entry: entry[1])


def zip_dir(src_dir: Path, out_zip: Path, compresslevel: int = 6, threads: int | None = None) -> int:
    """Zip ``src_dir``'s contents (arcnames relative to it) into ``out_zip``; returns the zip's byte size.

    Written to a temporary name beside ``out_zip`` and renamed, so readers never see a half-written zip.
    Files are streamed in chunks: SavedModel variables can be larger than memory allows. ``threads``
    deflate threads, ``None`` = every core this process may run on (the save stage has them to itself).
    """
    src_dir, out_zip = Path(src_dir), Path(out_zip)
    if not src_dir.is_dir():
        raise NotADirectoryError(f"{src_dir} is not a directory")
    if out_zip.resolve().is_relative_to(src_dir.resolve()):
        raise ValueError("the zip must not be written inside the directory being zipped")
    tmp = out_zip.with_name(f".{out_zip.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as fh:
            write_zip(src_dir, fh, compresslevel, None, None, threads)
        os.replace(tmp, out_zip)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return out_zip.stat().st_size


class ZipCanceled(Exception):
    """``write_zip`` was told to stop (its ``stop`` event was set)."""


def _cores() -> int:
    """CPUs this process may use (its affinity mask: a container's cpuset, a taskset), not the host's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _deflate_block(data: bytes, zdict: bytes, level: int) -> bytes:
    """One block as raw deflate that continues a stream whose last bytes were ``zdict``; the sync flush
    byte-aligns its end so the next block's output can simply be appended."""
    comp = (
        zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zdict=zdict)
        if zdict
        else zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    )
    return comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)


class _BlockDeflate:
    """The ``compress``/``flush`` pair ``zipfile`` calls on an entry's compressor, producing the block stream
    (module docstring); ``zipfile`` still computes CRC and sizes from the raw bytes and writes every header.

    With a pool, blocks are deflated on its threads and handed back in order; at most ``depth`` wait
    (memory ~ depth x 2 blocks, whatever the file size). Without one, each is deflated in the caller.
    """

    def __init__(self, level: int, pool: ThreadPoolExecutor | None, depth: int) -> None:
        self._level = level
        self._pool = pool
        self._depth = depth
        self._buffer = bytearray()
        self._tail = b""  # the previous block's last _WINDOW bytes: the next one's dictionary
        self._pending: deque[Future[bytes]] = deque()
        self._abandoned = False

    def _block(self, data: bytes) -> bytes:
        zdict, self._tail = self._tail, data[-_WINDOW:]
        if self._pool is None:
            return _deflate_block(data, zdict, self._level)
        self._pending.append(self._pool.submit(_deflate_block, data, zdict, self._level))
        done = []
        while len(self._pending) > self._depth or (self._pending and self._pending[0].done()):
            done.append(self._pending.popleft().result())
        return b"".join(done)

    def use_pool(self, pool: ThreadPoolExecutor, depth: int) -> None:
        """Deflate the following blocks on ``pool`` (nothing is pending without one: order is kept)."""
        self._pool, self._depth = pool, depth

    def compress(self, data: bytes | memoryview) -> bytes:
        if not self._buffer and type(data) is bytes and len(data) == _CHUNK:
            return self._block(data)  # write_zip's reads: no copy
        self._buffer += data
        out = []
        while len(self._buffer) >= _CHUNK:
            out.append(self._block(bytes(self._buffer[:_CHUNK])))
            del self._buffer[:_CHUNK]
        return b"".join(out)

    def flush(self) -> bytes:
        if self._abandoned:
            return b""
        out = [self._block(bytes(self._buffer))] if self._buffer else []
        self._buffer.clear()
        out.extend(future.result() for future in self._pending)
        self._pending.clear()
        # The stream's end: an empty final block (what a raw compressobj flushes without input, also the
        # whole stream of an empty file, as zipfile's own compressor writes it).
        out.append(zlib.compressobj(self._level, zlib.DEFLATED, -zlib.MAX_WBITS).flush(zlib.Z_FINISH))
        return b"".join(out)

    def abandon(self) -> None:
        """Canceled: drop the blocks in flight so closing the entry does not wait to deflate them."""
        self._abandoned = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._buffer.clear()


def write_zip(
    src_dir: Path,
    fileobj: BinaryIO,
    compresslevel: int = 6,
    stop: threading.Event | None = None,
    gate: threading.Event | None = None,
    threads: int | None = None,
    boost: threading.Event | None = None,
) -> None:
    """The deterministic zip of ``src_dir`` into a seekable binary file; files streamed in chunks (variables
    can be larger than memory). ``stop`` set -> ``ZipCanceled`` within one chunk; ``gate`` cleared -> waits
    before the next chunk (paused) until it is set again or ``stop`` is. ``threads`` deflate threads
    (``None`` = every core); 1 compresses in the calling thread and starts none. ``boost`` set -> every core
    from the next chunk on (someone now waits for the result). The bytes depend on neither.
    """
    threads = _cores() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    pool = ThreadPoolExecutor(threads, thread_name_prefix="zip-deflate") if threads > 1 else None
    deflate: _BlockDeflate | None = None

    def boosted() -> None:
        nonlocal pool, threads
        cores = _cores()
        if pool is None and cores > 1:
            threads, pool = cores, ThreadPoolExecutor(cores, thread_name_prefix="zip-deflate")
            if deflate is not None:
                deflate.use_pool(pool, 2 * threads)

    try:
        with zipfile.ZipFile(
            fileobj, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel
        ) as zf:
            for path, arcname, is_dir in _entries(src_dir):
                info = zipfile.ZipInfo(arcname, date_time=_EPOCH)
                mode = stat.S_IMODE(os.lstat(path).st_mode)
                if is_dir:
                    info.external_attr = ((stat.S_IFDIR | mode) << 16) | 0x10
                    zf.writestr(info, b"")
                    continue
                info.external_attr = (stat.S_IFREG | mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                if hasattr(info, "compress_level"):  # Python >= 3.13
                    info.compress_level = compresslevel
                else:  # what zipfile would record as the entry's level; ours does the compressing
                    info._compresslevel = compresslevel  # type: ignore[attr-defined]
                info.file_size = path.stat().st_size  # lets zipfile switch to ZIP64 for files over 2 GiB
                with path.open("rb") as src, zf.open(info, "w") as dst:
                    if not hasattr(dst, "_compressor"):
                        raise RuntimeError("zipfile's entry writer has no _compressor to replace")
                    # Two blocks queued per thread keep them all busy while this one reads, checksums, writes.
                    deflate = _BlockDeflate(compresslevel, pool, 2 * threads)
                    dst._compressor = deflate  # type: ignore[attr-defined]
                    while chunk := src.read(_CHUNK):
                        if boost is not None and pool is None and boost.is_set():
                            boosted()
                        while gate is not None and not gate.wait(0.05):
                            if stop is not None and stop.is_set():
                                deflate.abandon()
                                raise ZipCanceled
                        if stop is not None and stop.is_set():
                            deflate.abandon()
                            raise ZipCanceled
                        dst.write(chunk)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def param_counts(arrays: Mapping[str, np.ndarray], prunable: Collection[str]) -> dict[str, Any]:
    """Weight counts of a model from its variables' values (name -> array) and the prunable names.

    Returns API.md's ``params`` (``total``, ``prunable``, ``nonzero`` -- nonzero over EVERY variable), the
    ``sparsity`` the spec targets (zeros among prunable weights / prunable weights; 0.0 with none) and
    ``nonzero_by_name`` (per variable, the ``masks_nonzero`` input of ``flops.estimate_flops``).
    """
    unknown = sorted(set(prunable) - set(arrays))
    if unknown:
        raise ValueError(f"prunable names {unknown} are not among the variables")
    sizes = {name: int(np.size(value)) for name, value in arrays.items()}
    nonzero = {name: int(np.count_nonzero(value)) for name, value in arrays.items()}
    prunable_size = sum(sizes[name] for name in prunable)
    prunable_zeros = sum(sizes[name] - nonzero[name] for name in prunable)
    return {
        "params": {
            "total": sum(sizes.values()),
            "prunable": prunable_size,
            "nonzero": sum(nonzero.values()),
        },
        "sparsity": prunable_zeros / prunable_size if prunable_size else 0.0,
        "nonzero_by_name": nonzero,
    }
