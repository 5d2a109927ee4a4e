"""Archive safety: each trap is built for real with zipfile/tarfile; inspect AND extract must refuse it."""

from __future__ import annotations

import gzip
import io
import re
import stat
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.archive import (
    ArchiveInfo,
    ArchiveLimits,
    _Members,
    _write_member,
    extract_archive,
    inspect_archive,
    inspect_keras,
    sniff_format,
)
from app.errors import ArchiveError, ArchiveTooLarge, UnsupportedFormat

PB = b"\x08\x01fake-saved-model-proto"
MODEL = {
    "saved_model.pb": PB,
    "fingerprint.pb": b"fp",
    "variables/variables.index": b"index",
    "variables/variables.data-00000-of-00001": bytes(range(256)) * 40,
}

Entry = tuple[str, bytes]


def make_zip(path: Path, entries: list[Entry] | dict[str, bytes], *, dirs: tuple[str, ...] = ()) -> Path:
    items = entries.items() if isinstance(entries, dict) else entries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on the duplicate names some tests want
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for d in dirs:
                zf.writestr(d, b"")
            for name, data in items:
                zf.writestr(name, data)
    return path


def make_targz(
    path: Path, entries: list[Entry] | dict[str, bytes], *, extra: list[tarfile.TarInfo] = ()
) -> Path:
    items = entries.items() if isinstance(entries, dict) else entries
    with tarfile.open(path, "w:gz") as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


def patch_zip_member(path: Path, name: str, local_at: int, central_at: int, fmt: str, value: int) -> None:
    """Overwrite one header field of member ``name`` in its local header and its central-directory record."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
        cd = zf.start_dir
    struct.pack_into(fmt, data, info.header_offset + local_at, value)
    while True:
        assert data[cd : cd + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, cd + 28)
        if data[cd + 46 : cd + 46 + name_len] == name.encode():
            struct.pack_into(fmt, data, cd + central_at, value)
            break
        cd += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))


def prefixed(prefix: str) -> dict[str, bytes]:
    return {prefix + k: v for k, v in MODEL.items()}


def assert_refused(
    path: Path,
    tmp_path: Path,
    match: str,
    exc: type[Exception] = ArchiveError,
    limits: ArchiveLimits = ArchiveLimits(),
) -> None:
    """Both inspection and extraction must refuse, and extraction must leave nothing behind."""
    with pytest.raises(exc, match=re.escape(match)):
        inspect_archive(path, limits)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(exc, match=re.escape(match)):
        extract_archive(path, out / "model", limits)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- valid


@pytest.mark.parametrize(
    ("maker", "prefix", "root"),
    [
        (make_zip, "", ""),
        (make_zip, "my_model/", "my_model"),
        (make_targz, "", ""),
        (make_targz, "./", ""),
        (make_targz, "export/", "export"),
    ],
)
def test_valid_archives_inspect_and_extract(
    tmp_path: Path, maker: Callable[..., Path], prefix: str, root: str
) -> None:
    suffix = ".zip" if maker is make_zip else ".tar.gz"
    path = maker(tmp_path / f"m{suffix}", prefixed(prefix))

    info = inspect_archive(path)
    assert info == ArchiveInfo(
        kind="zip" if maker is make_zip else "tar.gz",
        root=root,
        members=len(MODEL),
        uncompressed_bytes=sum(len(v) for v in MODEL.values()),
    )

    dest = tmp_path / "models" / "m1"
    assert extract_archive(path, dest) == dest
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(MODEL)
    for name, data in MODEL.items():
        assert (dest / name).read_bytes() == data
        assert stat.S_IMODE((dest / name).stat().st_mode) == 0o644
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "variables").stat().st_mode) == 0o755
    assert [p.name for p in dest.parent.iterdir()] == ["m1"]  # no staging directory left beside it


def test_zip_with_explicit_directory_entries(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", prefixed("m/"), dirs=("m/", "m/variables/", "m/assets/"))
    info = inspect_archive(path)
    assert (info.root, info.members) == ("m", len(MODEL) + 3)
    dest = extract_archive(path, tmp_path / "dest")
    assert (dest / "assets").is_dir() and (dest / "saved_model.pb").read_bytes() == PB


def test_extract_into_existing_empty_dir_but_not_a_full_one(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", MODEL)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (extract_archive(path, empty) / "saved_model.pb").exists()
    with pytest.raises(FileExistsError):
        extract_archive(path, empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m.zip"]


# ----------------------------------------------------------------------------------------- model location


def test_missing_saved_model_pb(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", {"variables/variables.index": b"x", "readme.txt": b"hi"})
    assert_refused(
        path, tmp_path, "no saved_model.pb found at the archive root or inside a single top folder"
    )


def test_two_top_folders(tmp_path: Path) -> None:
    path = make_targz(tmp_path / "m.tar.gz", {**prefixed("a/"), "b/notes.txt": b"x"})
    assert_refused(path, tmp_path, "no saved_model.pb found")


def test_model_nested_too_deep_says_where_it_is(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", prefixed("outer/inner/"))
    assert_refused(path, tmp_path, "found 'outer/inner/saved_model.pb'")


def test_keras_file_uploaded_as_zip_gets_a_hint(tmp_path: Path) -> None:
    path = make_zip(
        tmp_path / "m.zip", {"config.json": b"{}", "metadata.json": b"{}", "model.weights.h5": b""}
    )
    assert_refused(path, tmp_path, "looks like a Keras .keras file")


# ------------------------------------------------------------------------------------------- unsafe names

BAD_NAMES = [
    ("../evil", "'..'"),
    ("m/../../evil", "'..'"),
    ("/etc/passwd", "absolute path"),
    ("C:/Windows/evil.dll", "absolute path"),
    ("m\\..\\..\\evil", "backslash"),
    ("m/evil\nname", "control characters"),
]


@pytest.mark.parametrize(("name", "match"), BAD_NAMES)
def test_unsafe_names_in_zip(tmp_path: Path, name: str, match: str) -> None:
    path = make_zip(tmp_path / "m.zip", {**MODEL, name: b"pwned"})
    assert_refused(path, tmp_path, match)
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize(("name", "match"), BAD_NAMES)
def test_unsafe_names_in_tar(tmp_path: Path, name: str, match: str) -> None:
    path = make_targz(tmp_path / "m.tar.gz", {**MODEL, name: b"pwned"})
    assert_refused(path, tmp_path, match)


def test_overlong_path(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", {**MODEL, "a/" * 40 + "f": b"x"})
    assert_refused(path, tmp_path, "longer than 50 characters", limits=ArchiveLimits(max_path_length=50))


# ---------------------------------------------------------------------------------- links, devices, dupes


def _tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("special", "match"),
    [
        (_tar_special("variables/link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link to '/etc/passwd'"),
        (_tar_special("variables/hard", tarfile.LNKTYPE, "saved_model.pb"), "hard link"),
        (_tar_special("dev/tty", tarfile.CHRTYPE), "device or pipe"),
        (_tar_special("dev/sda", tarfile.BLKTYPE), "device or pipe"),
        (_tar_special("pipe", tarfile.FIFOTYPE), "device or pipe"),
    ],
)
def test_tar_links_and_devices(tmp_path: Path, special: tarfile.TarInfo, match: str) -> None:
    path = make_targz(tmp_path / "m.tar.gz", MODEL, extra=[special])
    assert_refused(path, tmp_path, match)


def test_zip_symlink_member(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", MODEL)
    with zipfile.ZipFile(path, "a") as zf:
        link = zipfile.ZipInfo("variables/escape")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    assert_refused(path, tmp_path, "symbolic link")


def test_zip_encrypted_member(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", {**MODEL, "assets/secret.txt": b"flagged as encrypted"})
    patch_zip_member(path, "assets/secret.txt", 6, 8, "<H", 0x1)  # general purpose flags, bit 0 = encrypted
    assert_refused(path, tmp_path, "encrypted")


def test_duplicate_names_in_zip(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", [*MODEL.items(), ("saved_model.pb", b"second copy")])
    assert_refused(path, tmp_path, "more than once")


def test_duplicate_names_in_tar(tmp_path: Path) -> None:
    path = make_targz(tmp_path / "m.tar.gz", [*MODEL.items(), ("./variables/variables.index", b"again")])
    assert_refused(path, tmp_path, "more than once")


def test_file_that_is_also_a_directory(tmp_path: Path) -> None:
    path = make_targz(tmp_path / "m.tar.gz", [*MODEL.items(), ("saved_model.pb/inner", b"x")])
    assert_refused(path, tmp_path, "which is a file")


# ----------------------------------------------------------------------------------------- size limits


def test_zip_bomb_by_ratio(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "bomb.zip", {**MODEL, "variables/zeros": bytes(50 * 2**20)})
    assert path.stat().st_size < 200_000
    assert_refused(path, tmp_path, "decompression bomb", ArchiveTooLarge)


def test_targz_bomb_by_ratio(tmp_path: Path) -> None:
    path = make_targz(tmp_path / "bomb.tar.gz", {**MODEL, "variables/zeros": bytes(50 * 2**20)})
    assert_refused(path, tmp_path, "decompression bomb", ArchiveTooLarge)


def test_total_uncompressed_size_limit(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "m.zip", MODEL)
    limits = ArchiveLimits(max_uncompressed_bytes=5000)
    assert_refused(path, tmp_path, "uncompressed limit", ArchiveTooLarge, limits=limits)


@pytest.mark.parametrize("maker", [make_zip, make_targz])
def test_too_many_members(tmp_path: Path, maker: Callable[..., Path]) -> None:
    path = maker(tmp_path / "m.bin", {**MODEL, **{f"assets/{i}": b"" for i in range(20)}})
    limits = ArchiveLimits(max_members=10)
    assert_refused(path, tmp_path, "more than 10 members", ArchiveTooLarge, limits=limits)


def test_tar_oversized_pax_header_is_refused_before_it_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "m.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for name, data in MODEL.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "fingerprint.pb":
                info.pax_headers = {"comment": "z" * (3 * 2**20)}
            tf.addfile(info, io.BytesIO(data))
    assert_refused(path, tmp_path, "oversized headers")


# --------------------------------------------------------------------------------- corrupt / not archives


def test_truncated_zip(tmp_path: Path) -> None:
    full = make_zip(tmp_path / "full.zip", MODEL).read_bytes()
    path = tmp_path / "cut.zip"
    path.write_bytes(full[: len(full) // 2])
    assert_refused(path, tmp_path, "truncated")


def test_zip_with_data_cut_out_but_directory_kept(tmp_path: Path) -> None:
    full = make_zip(tmp_path / "full.zip", MODEL).read_bytes()
    with zipfile.ZipFile(tmp_path / "full.zip") as zf:
        second = zf.infolist()[1]
        cd_start = zf.start_dir
    # keep the first member and the central directory, drop the other members' data
    path = tmp_path / "holed.zip"
    path.write_bytes(full[: second.header_offset] + full[cd_start:])
    assert_refused(path, tmp_path, "truncated")


def test_truncated_targz(tmp_path: Path) -> None:
    full = make_targz(tmp_path / "full.tar.gz", MODEL).read_bytes()
    for cut in (len(full) // 2, len(full) - 4):
        path = tmp_path / f"cut{cut}.tar.gz"
        path.write_bytes(full[:cut])
        with pytest.raises(ArchiveError, match="truncated"):
            inspect_archive(path)
        with pytest.raises(ArchiveError, match="truncated"):
            extract_archive(path, tmp_path / f"out{cut}")
        assert not (tmp_path / f"out{cut}").exists()


def test_gzip_that_is_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "m.tar.gz"
    path.write_bytes(gzip.compress(b"just some text, not a tar archive" * 10))
    assert_refused(path, tmp_path, "not a valid tar.gz")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.zip"
    path.write_bytes(bytes(range(7, 256)) * 10)
    with pytest.raises(UnsupportedFormat, match=r"not a zip or gzip file.*accepted"):
        sniff_format(path, "m.zip")
    assert_refused(path, tmp_path, "is not a zip or gzip file; accepted: a .zip", UnsupportedFormat)


def test_lying_zip_header_does_not_beat_the_limit(tmp_path: Path) -> None:
    """A member claiming 1000 bytes but inflating to 4 MiB passes inspection, then fails extraction."""
    real = bytes(range(256)) * (4 * 2**20 // 256)
    path = make_zip(tmp_path / "liar.zip", {**MODEL, "variables/big": real})
    patch_zip_member(path, "variables/big", 22, 24, "<I", 1000)  # uncompressed size

    limits = ArchiveLimits(max_uncompressed_bytes=2 * 2**20)
    assert inspect_archive(path, limits).uncompressed_bytes == sum(map(len, MODEL.values())) + 1000
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveError):
        extract_archive(path, out / "model", limits)
    assert list(out.iterdir()) == []


def test_writer_refuses_more_bytes_than_declared(tmp_path: Path) -> None:
    """The byte counter itself, fed by a reader that ignores the header (as a buggy decompressor could)."""
    members = _Members(ArchiveLimits(), archive_bytes=10**6)
    with pytest.raises(ArchiveError, match="more data than the 10 bytes"):
        _write_member(io.BytesIO(b"x" * 11), tmp_path, "f", 10, members, {tmp_path})
    members = _Members(ArchiveLimits(max_uncompressed_bytes=100), archive_bytes=10**6)
    with pytest.raises(ArchiveTooLarge):
        _write_member(io.BytesIO(b"x" * 101), tmp_path, "g", 101, members, {tmp_path})
    with pytest.raises(ArchiveError, match="ended after 3 of its 5"):
        _write_member(io.BytesIO(b"abc"), tmp_path, "h", 5, _Members(ArchiveLimits(), 10**6), {tmp_path})


# ------------------------------------------------------------------------------------------ format sniffing


def test_sniff_format(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "a.zip", MODEL)
    t = make_targz(tmp_path / "a.tar.gz", MODEL)
    assert sniff_format(z, "model.zip") == "zip"
    assert sniff_format(z, "whatever") == "zip"
    assert sniff_format(z, "Model.KERAS") == "keras"
    assert sniff_format(t, "model.tgz") == "tar.gz"
    with pytest.raises(UnsupportedFormat, match=r"named \.keras but is not a zip"):
        sniff_format(t, "model.keras")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"\x89HDF\r\n\x1a\n" + bytes(100), "HDF5"),
        (b"PK\x05\x06" + bytes(18), "empty zip"),
        (b"BZh91AY&SY", "bzip2"),
    ],
)
def test_sniff_names_common_wrong_uploads(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "upload"
    path.write_bytes(content)
    with pytest.raises(UnsupportedFormat, match=match):
        sniff_format(path, "upload.bin")


def test_sniff_uncompressed_tar(tmp_path: Path) -> None:
    path = tmp_path / "m.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("saved_model.pb")
        info.size = len(PB)
        tf.addfile(info, io.BytesIO(PB))
    with pytest.raises(UnsupportedFormat, match="uncompressed tar"):
        sniff_format(path, "m.tar")


def test_inspect_keras(tmp_path: Path) -> None:
    good = make_zip(
        tmp_path / "m.keras", {"metadata.json": b"{}", "config.json": b"{}", "model.weights.h5": b"w"}
    )
    assert sniff_format(good, "m.keras") == "keras"
    assert inspect_keras(good) == ArchiveInfo(kind="zip", root="", members=3, uncompressed_bytes=5)

    no_config = make_zip(tmp_path / "n.keras", {"metadata.json": b"{}", "model.weights.h5": b"w"})
    with pytest.raises(ArchiveError, match=r"no config\.json"):
        inspect_keras(no_config)

    unsafe = make_zip(tmp_path / "u.keras", {"config.json": b"{}", "../../evil": b"x"})
    with pytest.raises(ArchiveError, match=r"'\.\.'"):
        inspect_keras(unsafe)

    with pytest.raises(UnsupportedFormat):
        inspect_keras(make_targz(tmp_path / "t.keras", {"config.json": b"{}"}))


def test_zip_with_zip64_end_records_below_4_gib_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's zipfile adds the zip64 end records once the directory offset passes 2 GiB and still writes the
    real offset into the classic record below 4 GiB (every 2-4 GB upload): the locator alone must be enough.
    ZIP64_LIMIT lowered so a few KB take that path."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1024)
    incompressible = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    path = make_zip(tmp_path / "m.zip", {**MODEL, "variables/variables.data-00000-of-00001": incompressible})
    data = path.read_bytes()
    eocd = data.rfind(b"PK\x05\x06")
    assert data[eocd - 20 : eocd - 16] == b"PK\x06\x07"  # the locator is there...
    assert struct.unpack_from("<I", data, eocd + 16)[0] != 0xFFFFFFFF  # ...and the classic offset is real
    monkeypatch.undo()
    inspect_archive(path, ArchiveLimits())
    out = tmp_path / "out"
    extract_archive(path, out, ArchiveLimits())
    assert (out / "saved_model.pb").read_bytes() == PB
