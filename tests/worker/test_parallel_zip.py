"""Block-parallel deflate of the artifact zip: same bytes on any thread count, a valid zip, serial-like size."""

from __future__ import annotations

import io
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from worker.evaluation import size as size_mod
from worker.evaluation.size import ZipCanceled, write_zip, zip_dir
from worker.evaluation.zip_size import deflate_zip_size

_CHUNK = size_mod._CHUNK


def _serial_zip_size(src_dir: Path, level: int = 6) -> int:
    """Plain zipfile, one deflate stream per file: the size block deflate is measured against."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for path in sorted(src_dir.rglob("*")):
            zf.write(path, path.relative_to(src_dir).as_posix())
    return len(buf.getvalue())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "variables").mkdir(parents=True)
    rng = np.random.default_rng(0)
    # Float weights: 3.5 blocks, so a partial last block and dictionaries across three block boundaries.
    weights = rng.normal(size=(7 * _CHUNK) // 8).astype(np.float32)
    weights.tofile(root / "variables" / "variables.data-00000-of-00001")
    (root / "saved_model.pb").write_bytes(b"".join(b"node %d op Conv2D; " % (i % 50) for i in range(40_000)))
    (root / "variables" / "variables.index").write_bytes(b"")
    (root / "assets").mkdir()
    return root


def _zip_bytes(src_dir: Path, threads: int) -> bytes:
    buf = io.BytesIO()
    write_zip(src_dir, buf, 6, None, None, threads)
    return buf.getvalue()


def test_bytes_do_not_depend_on_the_thread_count(tree: Path, tmp_path: Path) -> None:
    one = _zip_bytes(tree, 1)
    assert _zip_bytes(tree, 2) == one
    assert _zip_bytes(tree, 4) == one
    assert zip_dir(tree, tmp_path / "out.zip") == len(one)  # threads=None: every core
    assert (tmp_path / "out.zip").read_bytes() == one


def test_zip_is_valid_and_round_trips(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zip"
    zip_dir(tree, out, threads=2)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None  # every entry's CRC checks out
        assert zf.namelist() == [
            "assets/",
            "saved_model.pb",
            "variables/",
            "variables/variables.data-00000-of-00001",
            "variables/variables.index",
        ]
        for info in zf.infolist():
            if not info.is_dir():
                assert info.compress_type == zipfile.ZIP_DEFLATED
                assert zf.read(info) == (tree / info.filename).read_bytes()


def test_counted_size_equals_the_zip_file(tree: Path, tmp_path: Path) -> None:
    assert deflate_zip_size(tree) == zip_dir(tree, tmp_path / "out.zip", threads=2)


def test_size_is_close_to_a_single_deflate_stream(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(3 * _CHUNK) // 4).astype(np.float32)
    weights[rng.random(weights.size) < 0.8] = 0  # pruned: mostly zeros, very compressible
    weights.tofile(src / "w.bin")
    (src / "text.txt").write_bytes(
        b"".join(b"line %d of a repetitive file\n" % (i % 977) for i in range(200_000))
    )
    ours = zip_dir(src, tmp_path / "ours.zip", threads=2)
    serial = _serial_zip_size(src)
    assert ours < 0.5 * sum(p.stat().st_size for p in src.iterdir())
    assert abs(ours - serial) <= 0.01 * serial


def test_zeros_over_many_blocks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(5 * _CHUNK + 123)  # zeros, with a few marks so a misplaced block would show
    for i in range(0, len(data), 777_777):
        data[i : i + 8] = b"marker%02d" % (i // 777_777)
    (src / "zeros.bin").write_bytes(bytes(data))
    out = tmp_path / "z.zip"
    size = zip_dir(src, out, threads=3)
    assert size < 100_000
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None and zf.read("zeros.bin") == data
    assert _zip_bytes(src, 1) == out.read_bytes()


def test_zip64_entries(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files over 2 GiB get ZIP64 headers; a lowered limit exercises that path without writing 2 GiB."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", _CHUNK)
    out = tmp_path / "out.zip"
    zip_dir(tree, out, threads=2)
    with zipfile.ZipFile(out) as zf:
        info = zf.getinfo("variables/variables.data-00000-of-00001")
        assert info.extract_version >= zipfile.ZIP64_VERSION
        assert zf.testzip() is None and zf.read(info) == (tree / info.filename).read_bytes()
    assert out.read_bytes() == _zip_bytes(tree, 1)


def test_block_stream_is_one_raw_deflate_stream() -> None:
    """Blocks ended by sync flushes and the final empty block decode as one stream, for odd write sizes too."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 8, size=2 * _CHUNK + 5000, dtype=np.uint8).tobytes()
    deflate = size_mod._BlockDeflate(6, None, 2)
    parts = [deflate.compress(data[i : i + 300_001]) for i in range(0, len(data), 300_001)]
    stream = b"".join(parts) + deflate.flush()
    whole = size_mod._BlockDeflate(6, None, 2)
    assert stream == whole.compress(data) + whole.flush()  # block boundaries do not follow the writes
    decoder = zlib.decompressobj(-zlib.MAX_WBITS)
    assert decoder.decompress(stream) == data and decoder.eof and decoder.unused_data == b""
    empty = size_mod._BlockDeflate(6, None, 2).flush()
    assert zlib.decompress(empty, -zlib.MAX_WBITS) == b""


def test_stop_cancels_with_threads(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "noise.bin").write_bytes(np.random.default_rng(3).bytes(8 * _CHUNK))
    stop = threading.Event()
    stop.set()
    with pytest.raises(ZipCanceled):
        write_zip(src, io.BytesIO(), 6, stop, None, 2)
    with pytest.raises(ValueError, match="at least 1"):
        write_zip(src, io.BytesIO(), 6, None, None, 0)


def test_closed_gate_holds_until_opened(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "noise.bin").write_bytes(np.random.default_rng(4).bytes(2 * _CHUNK))
    gate = threading.Event()
    buf = io.BytesIO()
    worker = threading.Thread(target=write_zip, args=(src, buf, 6, None, gate, 2))
    worker.start()
    worker.join(0.3)
    assert worker.is_alive()  # paused before its first block
    gate.set()
    worker.join(10)
    assert not worker.is_alive()
    assert buf.getvalue() == _zip_bytes(src, 1)


def test_a_boost_mid_file_moves_to_every_core_and_keeps_the_bytes(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The baseline size counts on one thread beside a job; once the job waits for it (``result()``), the
    rest of the file is deflated on a pool. Boosted after the first block: same bytes, and a pool was made."""
    monkeypatch.setattr(size_mod, "_cores", lambda: 2)
    pools: list[int] = []
    real_pool = size_mod.ThreadPoolExecutor

    def counting_pool(workers: int, **kwargs: object) -> object:
        pools.append(workers)
        return real_pool(workers, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(size_mod, "ThreadPoolExecutor", counting_pool)
    boost = threading.Event()
    real_block = size_mod._deflate_block

    def block_then_boost(data: bytes, zdict: bytes, level: int) -> bytes:
        boost.set()  # from the second block on, write_zip sees it
        return real_block(data, zdict, level)

    monkeypatch.setattr(size_mod, "_deflate_block", block_then_boost)
    buf = io.BytesIO()
    write_zip(tree, buf, 6, None, None, threads=1, boost=boost)
    monkeypatch.setattr(size_mod, "_deflate_block", real_block)
    assert pools == [2]
    assert buf.getvalue() == _zip_bytes(tree, 1)
    assert deflate_zip_size(tree, boost=threading.Event()) == len(buf.getvalue())
