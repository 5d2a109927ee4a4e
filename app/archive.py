"""Safe validation and extraction of uploaded model archives (.zip, .tar.gz, .keras); stdlib only, no TF.

Uploads are hostile until proven otherwise, so one validator (``_Members``) checks every member both when the
API inspects an upload and again while a worker extracts it: no absolute paths, ``..``, backslashes, drive
letters or control characters; no links, devices or fifos; no duplicates; bounded member count, expanded size
and compression ratio. Extraction counts the bytes it really writes instead of trusting headers, never creates
links, and builds the tree in a hidden staging directory renamed into place only once it is complete.

Two stdlib resource traps are closed first: ``zipfile`` loads the whole central directory into memory (we walk
and count it beforehand), and ``tarfile`` reads long-name/pax headers wholly into memory (we meter the
decompressed stream it reads from).
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Literal, Protocol

from app.errors import ArchiveError, ArchiveTooLarge, InsufficientStorage, UnsupportedFormat

GiB = 2**30
ArchiveKind = Literal["zip", "tar.gz"]
UploadFormat = Literal["zip", "tar.gz", "keras"]

ACCEPTED = "a .zip or .tar.gz of a SavedModel directory, or a Keras 3 .keras file"
_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
# Tar metadata (long names, pax records) tarfile may read between two members; real archives use a few KiB.
_HEADER_BUDGET = 1 << 20
# Cap on one zip entry's extra field + comment: tools write tens of bytes; bounds central-directory memory.
_ZIP_ENTRY_METADATA = 4096
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What reading a damaged archive can raise; mapped to ArchiveError in one place per reader.
_CORRUPT: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,  # zipfile's answer to a compression method it cannot read
    struct.error,
)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what an archive may expand to; the defaults suit multi-GB SavedModels."""

    max_members: int = 10_000
    max_uncompressed_bytes: int = 8 * GiB
    max_ratio: float = 200.0
    max_path_length: int = 1024


@dataclass(frozen=True)
class ArchiveInfo:
    """What inspection found; ``root`` is the folder holding the model ("" when it is the archive root)."""

    kind: ArchiveKind
    root: str
    members: int
    uncompressed_bytes: int


def sniff_format(path: Path, filename: str) -> UploadFormat:
    """Decide the upload's format from its magic bytes, using the name only to tell .keras zips from archives.

    Raises UnsupportedFormat (415) naming what was recognised and what is accepted.
    """
    with path.open("rb") as f:
        head = f.read(512)
    label = repr(filename) if filename else "the upload"
    is_keras_name = filename.lower().endswith(".keras")
    if head.startswith(_ZIP_MAGIC):
        return "keras" if is_keras_name else "zip"
    if is_keras_name:
        raise UnsupportedFormat(f"{label} is named .keras but is not a zip file; accepted: {ACCEPTED}")
    if head.startswith(_GZIP_MAGIC):
        return "tar.gz"
    raise UnsupportedFormat(f"{label} is {_describe(head)}; accepted: {ACCEPTED}")


def _describe(head: bytes) -> str:
    """Name common wrong uploads so the error tells the user what to do instead."""
    if not head:
        return "empty"
    if head.startswith(b"PK\x05\x06"):
        return "an empty zip"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "a Keras 2 HDF5 (.h5) file (save it with model.save('model.keras') or export a SavedModel)"
    if head[257:262] == b"ustar":
        return "an uncompressed tar (gzip it: tar czf model.tar.gz DIR)"
    if head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ\x00"):
        return "a bzip2/xz file (use .zip or .tar.gz)"
    return "not a zip or gzip file"


def inspect_archive(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> ArchiveInfo:
    """Validate a SavedModel archive without extracting it; ArchiveError/ArchiveTooLarge on any problem."""
    kind = _kind_by_magic(path)
    members = _Members(limits, path.stat().st_size)
    if kind == "zip":
        with _open_zip(path, limits) as zf:
            for _ in _zip_entries(zf, path, members):
                pass
    else:
        with _open_tar(path) as (tf, meter):
            for _ in _tar_entries(tf, meter, members):
                pass
    return ArchiveInfo(kind, members.model_root(), members.count, members.declared)


def inspect_keras(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> ArchiveInfo:
    """Validate a .keras file (a zip with config.json at its root) with the same safety checks as archives."""
    if _kind_by_magic(path) != "zip":
        raise UnsupportedFormat("a .keras file must be a zip archive; this one is not")
    members = _Members(limits, path.stat().st_size)
    with _open_zip(path, limits) as zf:
        for _ in _zip_entries(zf, path, members):
            pass
    if members.kinds.get("config.json") != "file":
        raise ArchiveError("the .keras file has no config.json at its root; save it with Keras 3 save()")
    return ArchiveInfo("zip", "", members.count, members.declared)


def extract_archive(path: Path, dest: Path, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract a SavedModel archive so that ``dest`` holds saved_model.pb directly; return ``dest``.

    Everything is re-checked while extracting (the file may have changed since inspection, and headers may
    lie): real bytes written are counted against the limits. The tree is built in a hidden sibling directory
    and renamed onto ``dest`` (which must not exist or be empty) only when complete, with the single top
    folder, if any, stripped. Nothing is left behind on failure.
    """
    return _extract(path, dest, limits, _kind_by_magic(path), lambda members: members.model_root())


def _extract(
    path: Path,
    dest: Path,
    limits: ArchiveLimits,
    kind: DatasetArchiveKind,
    root_of: Callable[[_Members], str],
) -> Path:
    """Extraction into a hidden staging folder, renamed onto ``dest``: ``root_of`` names the folder (relative
    to the archive root) that becomes ``dest``."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"extraction target {dest} exists and is not an empty directory")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    except OSError as exc:  # no room even for the staging folder: the same 507 as a full disk mid-write
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("the disk is full: the model cannot be extracted") from exc
        raise
    try:
        members = _Members(limits, path.stat().st_size)
        made: set[Path] = {staging}
        if kind == "zip":
            with _open_zip(path, limits) as zf:
                for info, rel, is_dir in _zip_entries(zf, path, members):
                    if is_dir:
                        _make_dirs(staging, rel, made)
                        continue
                    with _reading(rel, partial(zf.open, info)) as src:
                        _write_member(src, staging, rel, info.file_size, members, made)
        else:
            with _open_tar(path, gz=kind == "tar.gz") as (tf, meter):
                for tinfo, rel in _tar_entries(tf, meter, members):
                    if tinfo.isdir():
                        _make_dirs(staging, rel, made)
                        continue
                    with _reading(rel, partial(tf.extractfile, tinfo)) as src:
                        _write_member(src, staging, rel, tinfo.size, members, made)
        root = root_of(members)
        top = staging / root if root else staging
        os.chmod(top, 0o755)
        os.rename(top, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# ----------------------------------------------------------------------------------------------------------
# dataset archives (issue 20): a .tar, .tar.gz or .zip of shards or of an image folder


DatasetArchiveKind = Literal["zip", "tar", "tar.gz"]
DATASET_ARCHIVES = "a .tar or .zip of TFRecord/Parquet shards or of an image folder (<class>/<image>)"


@dataclass(frozen=True)
class DatasetArchiveInfo:
    """What inspection found: the member files (relative POSIX paths, archive order), their declared total."""

    kind: DatasetArchiveKind
    files: tuple[str, ...]
    members: int
    uncompressed_bytes: int


def dataset_archive_kind(path: Path) -> DatasetArchiveKind | None:
    """``zip``, ``tar`` (ustar magic at offset 257) or ``tar.gz`` by the file's bytes; None for anything else."""
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_GZIP_MAGIC):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def inspect_dataset_archive(path: Path, limits: ArchiveLimits = ArchiveLimits()) -> DatasetArchiveInfo:
    """Validate a dataset archive without extracting it, with the model archives' member checks (no absolute
    paths, ``..``, links, devices, duplicates; bounded members, expansion and ratio); ArchiveError /
    ArchiveTooLarge / UnsupportedFormat. What the files hold is the worker's to check."""
    kind = dataset_archive_kind(path)
    if kind is None:
        raise UnsupportedFormat(f"the upload is not a zip or tar archive; accepted: {DATASET_ARCHIVES}")
    members = _Members(limits, path.stat().st_size)
    files: list[str] = []
    if kind == "zip":
        with _open_zip(path, limits) as zf:
            for _, rel, is_dir in _zip_entries(zf, path, members):
                if not is_dir:
                    files.append(rel)
    else:
        with _open_tar(path, gz=kind == "tar.gz") as (tf, meter):
            for tinfo, rel in _tar_entries(tf, meter, members):
                if not tinfo.isdir():
                    files.append(rel)
    if not files:
        raise ArchiveError("the archive holds no files")
    return DatasetArchiveInfo(kind, tuple(files), members.count, members.declared)


def extract_dataset_archive(path: Path, dest: Path, limits: ArchiveLimits = ArchiveLimits()) -> Path:
    """Extract a dataset archive into ``dest`` (missing or empty) as it is (no top folder stripped), with
    every check of :func:`extract_archive` re-applied to the bytes really written; nothing is left behind on
    failure. For the worker (worker/data/convert.py), which then reads the shards or images."""
    kind = dataset_archive_kind(path)
    if kind is None:
        raise UnsupportedFormat(f"the file is not a zip or tar archive; accepted: {DATASET_ARCHIVES}")
    return _extract(path, dest, limits, kind, lambda _members: "")


# ----------------------------------------------------------------------------------------------------------
# member validation, shared by inspection and extraction


class _Members:
    """Checks members one at a time in archive order, so a bad archive fails at its first bad member."""

    def __init__(self, limits: ArchiveLimits, archive_bytes: int) -> None:
        self.limits = limits
        self.archive_bytes = max(archive_bytes, 1)
        self.count = 0
        self.declared = 0
        self.written = 0
        self.kinds: dict[str, Literal["file", "dir"]] = {}

    def add(self, name: str, *, is_dir: bool, size: int) -> str:
        """Validate one member; return its normalised relative path ("" for the archive root itself)."""
        self.count += 1
        if self.count > self.limits.max_members:
            raise ArchiveTooLarge(f"the archive has more than {self.limits.max_members} members")
        rel = _safe_relpath(name, self.limits.max_path_length)
        if size < 0:
            raise ArchiveError(f"archive member {name!r} declares a negative size; the archive is corrupt")
        if not is_dir:
            self.declared += size
            self._check_expansion(self.declared, "declares")
        self._register(rel, name, is_dir)
        return rel

    def wrote(self, n: int) -> None:
        """Count bytes really written, so a lying header cannot beat the limits."""
        self.written += n
        self._check_expansion(self.written, "expands to")

    def _check_expansion(self, total: int, verb: str) -> None:
        limit = self.limits.max_uncompressed_bytes
        if total > limit:
            raise ArchiveTooLarge(f"the archive {verb} more than the {human_size(limit)} uncompressed limit")
        ratio = total / self.archive_bytes
        if ratio > self.limits.max_ratio:
            raise ArchiveTooLarge(
                f"the archive {verb} more than {self.limits.max_ratio:g} times its own size "
                f"({human_size(self.archive_bytes)}); refusing it as a likely decompression bomb"
            )

    def _register(self, rel: str, name: str, is_dir: bool) -> None:
        if not rel:
            if not is_dir:
                raise ArchiveError(f"archive member {name!r} has no file name")
            return
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if self.kinds.setdefault(parent, "dir") == "file":
                raise ArchiveError(f"archive member {name!r} lies inside {parent!r}, which is a file")
        previous = self.kinds.get(rel)
        if is_dir:
            if previous == "file":
                raise ArchiveError(f"{rel!r} appears in the archive both as a file and as a directory")
            self.kinds[rel] = "dir"
            return
        if previous == "file":
            raise ArchiveError(f"the archive holds {rel!r} more than once; duplicate entries are refused")
        if previous == "dir":
            raise ArchiveError(f"{rel!r} appears in the archive both as a file and as a directory")
        self.kinds[rel] = "file"

    def model_root(self) -> str:
        """The folder holding saved_model.pb: the root, or the single top folder; else ArchiveError."""
        if self.kinds.get("saved_model.pb") == "file":
            return ""
        tops = {p.split("/", 1)[0] for p in self.kinds}
        if len(tops) == 1:
            (top,) = tops
            if self.kinds.get(f"{top}/saved_model.pb") == "file":
                return top
        hint = ""
        deeper = sorted(p for p, k in self.kinds.items() if k == "file" and p.endswith("/saved_model.pb"))
        if deeper:
            hint = f" (found {deeper[0]!r}; zip the SavedModel directory itself, not a folder around it)"
        elif {"config.json", "metadata.json"} <= self.kinds.keys():
            hint = " (this looks like a Keras .keras file: upload it with a .keras file name)"
        raise ArchiveError("no saved_model.pb found at the archive root or inside a single top folder" + hint)


def _safe_relpath(name: str, max_length: int) -> str:
    """Normalise a member name to a relative POSIX path, refusing anything that could escape or confuse."""
    shown = repr(name[:120] + ("..." if len(name) > 120 else ""))
    if len(name) > max_length:
        raise ArchiveError(f"archive member {shown} has a path longer than {max_length} characters")
    if "\\" in name:
        raise ArchiveError(f"archive member {shown} contains a backslash; use '/' as the path separator")
    if _CONTROL.search(name):
        raise ArchiveError(f"archive member {shown} contains control characters in its name")
    if name.startswith("/") or _DRIVE.match(name):
        raise ArchiveError(f"archive member {shown} has an absolute path; members must be relative")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive member {shown} contains '..' and would land outside the model directory")
    if any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts):
        raise ArchiveError(f"archive member {shown} has a path component longer than 255 bytes")
    return "/".join(parts)


def human_size(n: float) -> str:
    """Sizes in error messages, e.g. '8 GB', '4.9 KB' (binary units, as the limits are set)."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}".replace(".0 ", " ")
    return f"{n:.0f} bytes"


def _kind_by_magic(path: Path) -> ArchiveKind:
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_GZIP_MAGIC):
        return "tar.gz"
    raise UnsupportedFormat(f"the upload is {_describe(head)}; accepted: {ACCEPTED}")


# ----------------------------------------------------------------------------------------------------------
# zip


@contextmanager
def _open_zip(path: Path, limits: ArchiveLimits) -> Iterator[zipfile.ZipFile]:
    if count_zip_entries(path, stop_after=limits.max_members) > limits.max_members:
        raise ArchiveTooLarge(f"the archive has more than {limits.max_members} members")
    try:
        zf = zipfile.ZipFile(path)
    except _CORRUPT as exc:
        raise ArchiveError(f"the file is not a valid zip archive ({exc}); was it truncated?") from exc
    with zf:
        yield zf


def count_zip_entries(path: Path, stop_after: int) -> int:
    """Count central-directory entries (up to ``stop_after + 1``) before zipfile loads the directory whole.

    zipfile parses every entry into memory at open, so a small upload with millions of entries or huge extra
    fields could exhaust the API's memory; this walk reads only fixed headers. ArchiveError if damaged.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        tail_len = min(size, 22 + 0xFFFF + 20)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            raise ArchiveError("the zip has no end-of-central-directory record; it is truncated or not a zip")
        eocd = size - tail_len + at
        cd_size, cd_offset = struct.unpack_from("<II", tail, at + 12)
        cd_end = eocd
        # A zip64 end record sits between the directory and the classic one whenever the locator is there:
        # Python's zipfile writes them from a 2 GiB offset on, while the classic fields still hold real values.
        located = at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07"
        if (
            located
            or cd_size == 0xFFFFFFFF
            or cd_offset == 0xFFFFFFFF
            or tail[at + 10 : at + 12] == b"\xff\xff"
        ):
            if not located:
                raise ArchiveError("the zip64 directory locator is missing; the archive is corrupt")
            (z64_offset,) = struct.unpack_from("<Q", tail, at - 20 + 8)
            f.seek(z64_offset)
            rec = f.read(56)
            if len(rec) < 56 or rec[:4] != b"PK\x06\x06":
                raise ArchiveError("the zip64 end-of-directory record is missing; the archive is corrupt")
            (cd_size,) = struct.unpack_from("<Q", rec, 40)
            cd_end = z64_offset
        start = cd_end - cd_size
        if start < 0:
            raise ArchiveError("the zip's central directory starts before the file does; it is corrupt")
        f.seek(start)
        pos, count = start, 0
        while pos < cd_end:
            head = f.read(46)
            if len(head) < 46 or head[:4] != b"PK\x01\x02":
                raise ArchiveError("the zip's central directory is damaged; the archive is corrupt")
            name_len, extra_len, comment_len = struct.unpack_from("<HHH", head, 28)
            count += 1
            if count > stop_after:
                break
            if extra_len + comment_len > _ZIP_ENTRY_METADATA:
                raise ArchiveError("a zip entry carries an oversized extra field or comment; refusing it")
            f.seek(name_len + extra_len + comment_len, os.SEEK_CUR)
            pos += 46 + name_len + extra_len + comment_len
    return count


def _zip_entries(
    zf: zipfile.ZipFile, path: Path, members: _Members
) -> Iterator[tuple[zipfile.ZipInfo, str, bool]]:
    """Yield (info, relative path, is_dir) per member after the safety checks; nothing is decompressed."""
    size = path.stat().st_size
    with path.open("rb") as raw:
        for info in zf.infolist():
            shown = info.filename[:120]
            if info.flag_bits & 0x41:
                raise ArchiveError(f"zip member {shown!r} is encrypted; upload an unencrypted archive")
            is_dir = info.is_dir()
            ftype = stat.S_IFMT(info.external_attr >> 16)
            if ftype == stat.S_IFLNK:
                raise ArchiveError(f"zip member {shown!r} is a symbolic link; links are not allowed")
            if ftype not in (0, stat.S_IFDIR if is_dir else stat.S_IFREG):
                raise ArchiveError(f"zip member {shown!r} is not a plain file or directory (mode {ftype:o})")
            if not is_dir and info.compress_type not in _ZIP_METHODS:
                raise ArchiveError(
                    f"zip member {shown!r} uses compression method {info.compress_type}; "
                    "use deflate (the default of zip tools) or store"
                )
            rel = members.add(info.filename, is_dir=is_dir, size=0 if is_dir else info.file_size)
            _check_local_header(raw, info, size)
            yield info, rel, is_dir


def _check_local_header(raw: IO[bytes], info: zipfile.ZipInfo, size: int) -> None:
    """Cheap truncation check: the member's local header is where the directory says and its data fits."""
    missing = f"zip member {info.filename[:120]!r} has no data; the archive is truncated"
    try:
        raw.seek(info.header_offset)
        head = raw.read(30)
    except _CORRUPT as exc:  # a negative offset once zipfile corrects for missing bytes
        raise ArchiveError(missing) from exc
    if len(head) < 30 or head[:4] != _ZIP_MAGIC:
        raise ArchiveError(missing)
    name_len, extra_len = struct.unpack_from("<HH", head, 26)
    if info.header_offset + 30 + name_len + extra_len + info.compress_size > size:
        raise ArchiveError(f"zip member {info.filename[:120]!r} runs past the end of the file; truncated")


# ----------------------------------------------------------------------------------------------------------
# tar.gz


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _MeteredReader:
    """The decompressed stream tarfile reads from, with a byte credit topped up per member.

    tarfile reads GNU long names and pax headers wholly into memory, so a small tar.gz could make it allocate
    gigabytes before yielding a member we could refuse. Credit = the previous member's data + a header budget.
    """

    def __init__(self, raw: _Readable) -> None:
        self.raw = raw
        self.credit = _HEADER_BUDGET

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(min(n, _CHUNK) if n >= 0 else _CHUNK)  # short reads are fine for tarfile
        self.credit -= len(data)
        if self.credit < 0:
            raise ArchiveError("the tar archive has oversized headers or trailing data; refusing it")
        return data


@contextmanager
def _open_tar(path: Path, *, gz: bool = True) -> Iterator[tuple[tarfile.TarFile, _MeteredReader]]:
    with gzip.open(path, "rb") if gz else path.open("rb") as raw:
        meter = _MeteredReader(raw)
        # Opening reads the first member's headers; later read errors are mapped where they occur, so
        # errors raised by the caller's body (e.g. disk writes) are not mistaken for a corrupt archive.
        try:
            tf = tarfile.open(fileobj=meter, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
        except _CORRUPT as exc:
            raise ArchiveError(f"the file is not a valid tar.gz archive ({exc}); was it truncated?") from exc
        with tf:
            yield tf, meter


def _tar_entries(
    tf: tarfile.TarFile, meter: _MeteredReader, members: _Members
) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """Yield (member, relative path) in stream order after the safety checks; then verify the gzip trailer."""
    it = iter(tf)
    while True:
        try:
            member = next(it, None)
        except _CORRUPT as exc:
            raise ArchiveError(f"the tar.gz archive is corrupt or truncated ({exc})") from exc
        if member is None:
            break
        shown = member.name[:120]
        if member.issym() or member.islnk():
            kind = "symbolic" if member.issym() else "hard"
            raise ArchiveError(
                f"tar member {shown!r} is a {kind} link to {member.linkname[:120]!r}; links are not allowed"
            )
        if member.ischr() or member.isblk() or member.isfifo():
            raise ArchiveError(f"tar member {shown!r} is a device or pipe; only files and folders allowed")
        if member.issparse():
            raise ArchiveError(f"tar member {shown!r} is a sparse file; create the archive without --sparse")
        if not (member.isreg() or member.isdir()):
            raise ArchiveError(f"tar member {shown!r} has unsupported type {member.type!r}")
        rel = members.add(member.name, is_dir=member.isdir(), size=0 if member.isdir() else member.size)
        meter.credit = -(-member.size // 512) * 512 + _HEADER_BUDGET
        yield member, rel
    meter.credit = _HEADER_BUDGET
    try:  # read to the end so gzip verifies its CRC and length, and truncation is noticed
        while meter.read(_CHUNK):
            pass
    except _CORRUPT as exc:
        raise ArchiveError(f"the tar.gz archive is corrupt or truncated ({exc})") from exc


# ----------------------------------------------------------------------------------------------------------
# writing


@contextmanager
def _reading(rel: str, opener: Callable[[], IO[bytes] | None]) -> Iterator[IO[bytes]]:
    """Open one member's data, mapping the reader's corruption errors to ArchiveError."""
    try:
        src = opener()
    except _CORRUPT as exc:
        raise ArchiveError(f"archive member {rel!r} cannot be read ({exc}); the archive is corrupt") from exc
    if src is None:
        raise ArchiveError(f"archive member {rel!r} has no data")
    with src:
        yield src


def _make_dirs(root: Path, rel: str, made: set[Path]) -> Path:
    """Create ``root/rel`` one component at a time with mode 0755, whatever the umask."""
    current = root
    for part in rel.split("/") if rel else ():
        current = current / part
        if current not in made:
            os.mkdir(current, 0o755)
            os.chmod(current, 0o755)
            made.add(current)
    return current


def _write_member(
    src: IO[bytes], root: Path, rel: str, declared: int, members: _Members, made: set[Path]
) -> None:
    """Copy one member in chunks, refusing more bytes than declared and counting every byte written."""
    parent, _, name = rel.rpartition("/")
    target = _make_dirs(root, parent, made) / name
    written = 0
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(fd, 0o644)
            while True:
                try:
                    chunk = src.read(_CHUNK)
                except _CORRUPT as exc:
                    raise ArchiveError(f"archive member {rel!r} is corrupt ({exc})") from exc
                if not chunk:
                    break
                written += len(chunk)
                if written > declared:
                    raise ArchiveError(
                        f"archive member {rel!r} holds more data than the {declared} bytes its header "
                        "declares; the archive is corrupt or forged"
                    )
                members.wrote(len(chunk))
                out.write(chunk)
    except OSError as exc:  # read-side OSErrors were turned into ArchiveError above; these are the disk's
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("the disk filled up while extracting the model") from exc
        raise
    if written != declared:
        raise ArchiveError(
            f"archive member {rel!r} ended after {written} of its {declared} declared bytes; it is truncated"
        )
