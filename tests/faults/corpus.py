"""The corpus of malicious and broken inputs (issue 6, "Archives and datasets" and "Untrusted models").

Two kinds of entries:

- ``BadRequest``: one HTTP request the API must refuse at once with a 4xx problem+json whose ``detail`` says why
  (``reason`` is a word the detail must contain). Builders here make the bytes; nothing touches the network.
- ``HostileModel``: an upload that is structurally fine, so the API takes it (201, ``validating``), and that a
  worker must then mark ``invalid`` with an error ``code`` and a message naming the reason. Built with
  TensorFlow (``tests.support.model_factory``), so only the e2e test uses them.

Sizes assume the limits in ``LIMITS`` (the server under test is started with them): a bomb that needs the
default 8 GiB limit to trip would need 8 GiB of test data.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.app.helpers import SAVED_MODEL, multipart
from tests.support import model_factory

MiB = 2**20
# Settings of the server under test (also as SECATEURS_* variables): small enough to trip with test-sized data.
LIMITS = {"max_uncompressed_bytes": 16 * MiB, "max_compression_ratio": 200.0, "max_archive_members": 500}


@dataclass(frozen=True)
class BadRequest:
    """One request and what the API must answer: a status in ``expect`` and ``reason`` in the detail."""

    name: str
    method: str
    path: str
    expect: tuple[int, ...]
    reason: str
    files: dict[str, tuple[str, bytes]] | None = None
    data: dict[str, str] | None = None
    content: bytes | None = None
    json_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def request_kwargs(self) -> dict[str, Any]:
        """Arguments for ``httpx.Client.request`` / Starlette's TestClient (same API)."""
        kwargs: dict[str, Any] = {"headers": dict(self.headers)}
        if self.files is not None:
            kwargs["files"] = self.files
            if self.data is not None:
                kwargs["data"] = self.data
        elif self.content is not None:
            kwargs["content"] = self.content
        elif self.json_body is not None:
            kwargs["json"] = self.json_body
        return kwargs


@dataclass(frozen=True)
class HostileModel:
    """An upload the API accepts and a worker must refuse: the model ends ``invalid`` with ``code``."""

    name: str
    filename: str
    build: Callable[[Path], bytes]
    codes: tuple[str, ...]
    reason: str


# ----------------------------------------------------------------------------------------------------------
# archive builders


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_with_raw_entries(entries: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    """A zip written entry by entry (duplicates and odd modes allowed: zipfile only warns)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": the point of one entry
        for info, data in entries:
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def zip_symlink() -> bytes:
    link = zipfile.ZipInfo("variables/variables.index")
    link.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK: the entry's data is the link target
    rest = [(zipfile.ZipInfo(n), d) for n, d in SAVED_MODEL.items() if n != "variables/variables.index"]
    return zip_with_raw_entries([*rest, (link, b"/etc/passwd")])


def zip_duplicate() -> bytes:
    entries = [(zipfile.ZipInfo(n), d) for n, d in SAVED_MODEL.items()]
    return zip_with_raw_entries([*entries, (zipfile.ZipInfo("saved_model.pb"), b"the second one")])


def zip_ratio_bomb() -> bytes:
    """4 MiB of zeros deflate to ~4 KiB: a ratio near 1000, far above the 200 limit, under the size limit."""
    return zip_of({**SAVED_MODEL, "saved_model.pb": bytes(4 * MiB)})


def zip_declared_bomb() -> bytes:
    """A few bytes whose zip directory claims a 1 TB member (the headers are all the API reads)."""
    data = zip_of({**SAVED_MODEL, "variables/variables.data-00000-of-00001": b"x" * 64}, zipfile.ZIP_STORED)
    name = b"variables/variables.data-00000-of-00001"
    buf = bytearray(data)
    at = 0
    while (at := buf.find(b"PK\x01\x02", at)) >= 0:  # central directory entries: patch this member's size
        name_len = struct.unpack_from("<H", buf, at + 28)[0]
        if bytes(buf[at + 46 : at + 46 + name_len]) == name:
            struct.pack_into("<I", buf, at + 24, 0xFFFFFFFE)  # uncompressed size, just under the zip64 marker
        at += 4
    return bytes(buf)


def zip_size_bomb() -> bytes:
    """Incompressible bytes past the absolute limit (ratio ~1, so only the size limit can refuse it)."""
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, size=LIMITS["max_uncompressed_bytes"] + MiB, dtype=np.uint8).tobytes()
    return zip_of({**SAVED_MODEL, "variables/variables.data-00000-of-00001": payload}, zipfile.ZIP_STORED)


def zip_too_many_members() -> bytes:
    return zip_of({**SAVED_MODEL, **{f"assets/{i}.txt": b"" for i in range(LIMITS["max_archive_members"])}})


def zip_lying_sizes() -> bytes:
    """A member whose headers declare 64 bytes while its deflate stream holds 4 MiB: passes every check the
    API makes (they read headers only), so the worker's extraction, which counts real bytes, must catch it."""
    data = zip_of({**SAVED_MODEL, "variables/variables.data-00000-of-00001": bytes(4 * MiB)})
    name = b"variables/variables.data-00000-of-00001"
    buf = bytearray(data)
    for magic, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        at = 0
        while (at := buf.find(magic, at)) >= 0:
            name_len = struct.unpack_from("<H", buf, at + (26 if magic == b"PK\x03\x04" else 28))[0]
            if bytes(buf[at + name_at : at + name_at + name_len]) == name:
                struct.pack_into("<I", buf, at + size_at, 64)
            at += 4
    return bytes(buf)


def targz_of(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        for info in members:
            payload = (data or {}).get(info.name)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _file(name: str, payload: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    return info, payload


def targz_with(extra: tarfile.TarInfo | None = None, extra_file: tuple[str, bytes] | None = None) -> bytes:
    files = [_file(n, d) for n, d in SAVED_MODEL.items()]
    if extra_file is not None:
        files.append(_file(*extra_file))
    members = [info for info, _ in files] + ([extra] if extra is not None else [])
    return targz_of(members, {info.name: payload for info, payload in files})


def tar_link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def tar_device() -> tarfile.TarInfo:
    info = tarfile.TarInfo("dev-null")
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


# ----------------------------------------------------------------------------------------------------------
# npz builders


def npz(arrays: dict[str, np.ndarray], *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=allow_pickle)
            zf.writestr(f"{name}.npy", member.getvalue())
    return buf.getvalue()


def npy_raw(header: dict[str, Any], data: bytes) -> bytes:
    """An .npy file with any header (numpy's writer refuses lies; the reader on the server must not trust)."""
    text = repr(header).encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def npz_bomb() -> bytes:
    """np.savez_compressed of 64 MiB of zeros: ~64 KiB on the wire, four times the size limit expanded."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf, x=np.zeros((16 * MiB // 4 * 4,), dtype=np.float32).reshape(-1, 16), y=np.zeros(1)
    )
    return buf.getvalue()


X = np.linspace(0, 1, 8 * 64, dtype=np.float32).reshape(8, 64)
Y = np.arange(8, dtype=np.int64) % 10


# ----------------------------------------------------------------------------------------------------------
# the corpus


def _model(name: str, filename: str, data: bytes, expect: tuple[int, ...], reason: str) -> BadRequest:
    return BadRequest(name, "POST", "/v1/models", expect, reason, files={"file": (filename, data)})


def _dataset(name: str, data: bytes, reason: str, expect: tuple[int, ...] = (422,)) -> BadRequest:
    return BadRequest(name, "POST", "/v1/datasets", expect, reason, files={"file": ("data.npz", data)})


def _job(name: str, body: Any, reason: str, expect: tuple[int, ...] = (422,)) -> BadRequest:
    return BadRequest(name, "POST", "/v1/jobs", expect, reason, json_body=body)


def _raw_job(name: str, body: str, reason: str, expect: tuple[int, ...] = (422,)) -> BadRequest:
    """A job request whose body ``json=`` cannot produce (invalid or non-standard JSON)."""
    return BadRequest(
        name,
        "POST",
        "/v1/jobs",
        expect,
        reason,
        content=body.encode(),
        headers={"Content-Type": "application/json"},
    )


def api_corpus(model_id: str) -> list[BadRequest]:
    """Requests refused by the API process alone. ``model_id`` names an existing model (any status but
    invalid), for the job requests whose refusal comes after the model lookup."""
    good_model = zip_of(SAVED_MODEL)
    good_targz = targz_with()
    spec = {"target_sparsity": 0.5}
    nan_x = X.copy()
    nan_x[3, 5] = np.nan
    inf_x = X.copy()
    inf_x[0, 0] = np.inf
    form, ctype = multipart([("file", "model.zip", good_model)])
    truncated_form = (form[: form.rindex(b"--b0undary")], ctype)
    two_files = multipart([("file", "a.npz", npz({"x": X})), ("file", "b.npz", npz({"x": X}))])
    return [
        # model archives: bombs, escapes, links, devices, duplicates, damage, wrong formats
        _model(
            "zip bomb (compression ratio ~1000)", "bomb.zip", zip_ratio_bomb(), (413,), "decompression bomb"
        ),
        _model("zip bomb (1 TB declared in the directory)", "big.zip", zip_declared_bomb(), (413,), "limit"),
        _model(
            "zip bomb (17 MiB stored, over the 16 MiB limit)", "big.zip", zip_size_bomb(), (413,), "limit"
        ),
        _model("zip with 500+ members", "many.zip", zip_too_many_members(), (413,), "members"),
        _model(
            "zip path traversal ../",
            "slip.zip",
            zip_of({**SAVED_MODEL, "../../etc/cron.d/evil": b"* * * * * root sh"}),
            (422,),
            "'..'",
        ),
        _model(
            "zip absolute path",
            "abs.zip",
            zip_of({**SAVED_MODEL, "/etc/passwd": b"root::0:0"}),
            (422,),
            "absolute",
        ),
        _model(
            "zip backslash traversal ..\\..\\",
            "win.zip",
            zip_of({**SAVED_MODEL, "..\\..\\evil.dll": b"MZ"}),
            (422,),
            "backslash",
        ),
        _model(
            "zip member name with NUL/control bytes",
            "ctl.zip",
            zip_of({**SAVED_MODEL, "assets/a\x01b": b""}),
            (422,),
            "control",
        ),
        _model("zip symlink to /etc/passwd", "link.zip", zip_symlink(), (422,), "symbolic link"),
        _model("zip duplicate saved_model.pb", "dup.zip", zip_duplicate(), (422,), "duplicate"),
        _model("zip truncated", "cut.zip", truncated(good_model), (422,), "truncated"),
        _model(
            "zip without saved_model.pb", "empty.zip", zip_of({"readme.txt": b"hi"}), (422,), "saved_model.pb"
        ),
        _model(
            "tar.gz symlink",
            "link.tar.gz",
            targz_with(tar_link("variables/evil", "/etc/shadow", tarfile.SYMTYPE)),
            (422,),
            "symbolic link",
        ),
        _model(
            "tar.gz hard link",
            "hard.tar.gz",
            targz_with(tar_link("variables/evil", "/etc/shadow", tarfile.LNKTYPE)),
            (422,),
            "hard link",
        ),
        _model("tar.gz character device", "dev.tar.gz", targz_with(tar_device()), (422,), "device"),
        _model(
            "tar.gz absolute path",
            "abs.tar.gz",
            targz_with(extra_file=("/root/.ssh/authorized_keys", b"ssh-ed25519 AAAA")),
            (422,),
            "absolute",
        ),
        _model(
            "tar.gz path traversal ../",
            "slip.tar.gz",
            targz_with(extra_file=("../../tmp/evil", b"x")),
            (422,),
            "'..'",
        ),
        _model("tar.gz truncated", "cut.tar.gz", truncated(good_targz), (422,), "truncated"),
        _model(
            "random bytes named .zip", "model.zip", np.random.default_rng(1).bytes(4096), (415,), "accepted"
        ),
        _model(
            "gzip of random bytes (not a tar)",
            "model.tar.gz",
            gzip.compress(b"\x00junk" * 999),
            (422,),
            "tar",
        ),
        _model(".keras that is not a zip", "model.keras", b"\x89HDF\r\n\x1a\n" + bytes(64), (415,), "zip"),
        _model("empty upload", "model.zip", b"", (400,), "empty"),
        # datasets
        _dataset(
            "npz with a pickled object array",
            npz({"x": X, "y": np.array([{"__reduce__": "os.system"}] * 8, dtype=object)}, allow_pickle=True),
            "pickle",
        ),
        _dataset("npz x/y lengths differ", npz({"x": X, "y": Y[:5]}), "same number of samples"),
        _dataset("npz NaN in x", npz({"x": nan_x, "y": Y}), "NaN/inf"),
        _dataset("npz inf in x", npz({"x": inf_x, "y": Y}), "NaN/inf"),
        _dataset("npz complex x", npz({"x": X.astype(np.complex64), "y": Y}), "dtype"),
        _dataset("npz string y", npz({"x": X, "y": np.array(["cat"] * 8)}), "dtype"),
        _dataset(
            "npz with a non-.npy member", zip_of({"x.npy": _npy(X), "run.sh": b"#!/bin/sh\n"}), "not a .npy"
        ),
        _dataset(
            "npy header claims 10^12 elements (16-byte file)",
            zip_of(
                {
                    "x.npy": npy_raw(
                        {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}, bytes(16)
                    )
                }
            ),
            "fewer data bytes",
        ),
        _dataset(
            "npy header with a negative shape",
            zip_of(
                {"x.npy": npy_raw({"descr": "<f4", "fortran_order": False, "shape": (-8, 64)}, bytes(16))}
            ),
            "x",
        ),
        _dataset("npz bomb (64 MiB of zeros compressed)", npz_bomb(), "limit"),
        _dataset("npz without x", npz({"features": X, "y": Y}), "unexpected name"),
        _dataset("single .npy instead of .npz", _npy(X), "single .npy", expect=(415,)),
        # job requests
        _raw_job(
            "deeply nested JSON (100k levels)",
            f'{{"model_id": "{model_id}", "spec": {{"target_sparsity": 0.5, "include": {"[" * 100_000}{"]" * 100_000}}}}}',
            "pars",
            expect=(400, 422),
        ),
        _job(
            "10 MB JSON body",
            {"model_id": model_id, "spec": {**spec, "include": ["k" * 40_000] * 256}},
            "limited to",
            expect=(413,),  # refused before FastAPI reads it into memory (SECATEURS_MAX_JSON_BYTES)
        ),
        _job(
            "10k-character include regex",
            {"model_id": model_id, "spec": {**spec, "include": ["(a+)+" * 2000]}},
            "512",
        ),
        _job(
            "invalid include regex",
            {"model_id": model_id, "spec": {**spec, "exclude": ["(unclosed"]}},
            "regular expression",
        ),
        _raw_job(
            "NaN target_sparsity",
            f'{{"model_id": "{model_id}", "spec": {{"target_sparsity": NaN}}}}',
            "target_sparsity",
        ),
        _job("seed = 10^400", {"model_id": model_id, "spec": {**spec, "seed": 10**400}}, "seed"),
        _job(
            "webhook to the cloud metadata address",
            {"model_id": model_id, "spec": spec, "webhook_url": "http://169.254.169.254/latest/meta-data/"},
            "webhook_url",
        ),
        _job("unknown spec field", {"model_id": model_id, "spec": {**spec, "exec": "rm -rf /"}}, "extra"),
        # wrong content types and headers
        BadRequest(
            "model upload as application/json",
            "POST",
            "/v1/models",
            (415,),
            "multipart/form-data",
            content=b'{"file": "x"}',
            headers={"Content-Type": "application/json"},
        ),
        BadRequest(
            "dataset upload as application/x-evil",
            "POST",
            "/v1/datasets",
            (415,),
            "multipart/form-data",
            content=b"\x00" * 100,
            headers={"Content-Type": "application/x-evil"},
        ),
        BadRequest(
            "job as text/plain",
            "POST",
            "/v1/jobs",
            (400, 415, 422),
            "",
            content=json.dumps({"model_id": model_id, "spec": spec}).encode(),
            headers={"Content-Type": "text/plain"},
        ),
        BadRequest(
            "forged API key",
            "GET",
            "/v1/models",
            (401,),
            "API key",
            headers={"Authorization": "Bearer sk_000000000000_" + "A" * 43},
        ),
        BadRequest(
            "Idempotency-Key with a tab (not printable)",
            "POST",
            "/v1/jobs",
            (400,),
            "printable ASCII",
            json_body={"model_id": model_id, "spec": spec},
            headers={"Idempotency-Key": "key\twith-tab"},
        ),
        BadRequest(
            "Idempotency-Key of 300 characters",
            "POST",
            "/v1/jobs",
            (400,),
            "limit",
            json_body={"model_id": model_id, "spec": spec},
            headers={"Idempotency-Key": "k" * 300},
        ),
        BadRequest("id '..' (path traversal)", "GET", "/v1/jobs/%2E%2E/artifact", (404,), "no job"),
        BadRequest("id with encoded slashes", "GET", "/v1/models/..%2F..%2Fsecateurs.db", (404,), "endpoint"),
        BadRequest(
            "upload cut before the closing boundary",
            "POST",
            "/v1/models",
            (400,),
            "cut off",
            content=truncated_form[0],
            headers={"Content-Type": truncated_form[1]},
        ),
        BadRequest(
            "upload with two files",
            "POST",
            "/v1/datasets",
            (400,),
            "more than one",
            content=two_files[0],
            headers={"Content-Type": two_files[1]},
        ),
    ]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# hostile models (need TensorFlow to build)


def _saved_model_zip(build: Callable[[Path], Path]) -> Callable[[Path], bytes]:
    def make(root: Path) -> bytes:
        saved = build(root / "saved_model")
        return model_factory.zip_saved_model(saved, root / "model.zip").read_bytes()

    return make


def _file_reader(kind: str, secret: Path) -> Callable[[Path], bytes]:
    return _saved_model_zip(lambda out: model_factory.build_file_reading_module(out, secret, kind))


def _garbage_pb(root: Path) -> bytes:
    """A real SavedModel's variables with a saved_model.pb of random bytes."""
    saved = model_factory.build_tf_module(root / "saved_model", steps=1)
    (saved / "saved_model.pb").write_bytes(np.random.default_rng(7).bytes(2048))
    return model_factory.zip_saved_model(saved, root / "model.zip").read_bytes()


def _keras_lambda(root: Path) -> bytes:
    return model_factory.build_keras_lambda_file(root / "lambda.keras").read_bytes()


def _lying_zip(root: Path) -> bytes:
    return zip_lying_sizes()


def hostile_models(secret: Path) -> list[HostileModel]:
    """Uploads the API must accept and a worker must mark invalid. ``secret`` is the file they try to read
    or write; its content must be unchanged afterwards."""
    unsafe = ("unsafe_model",)
    return [
        HostileModel(
            "SavedModel reading a file (ReadFile)",
            "read.zip",
            _file_reader("read_file", secret),
            unsafe,
            "ReadFile",
        ),
        HostileModel(
            "SavedModel reading a file inside tf.cond",
            "cond.zip",
            _file_reader("read_file_in_cond", secret),
            unsafe,
            "ReadFile",
        ),
        HostileModel(
            "SavedModel running Python (py_function)",
            "py.zip",
            _file_reader("py_function", secret),
            unsafe,
            "PyFunc",
        ),
        HostileModel(
            "SavedModel printing to a file",
            "print.zip",
            _file_reader("print_to_file", secret),
            unsafe,
            "PrintV2",
        ),
        HostileModel(
            ".keras with a Lambda layer",
            "lambda.keras",
            _keras_lambda,
            ("unsafe_model", "model_load_failed"),
            "Lambda",
        ),
        HostileModel(
            "SavedModel whose saved_model.pb is garbage",
            "garbage.zip",
            _garbage_pb,
            ("model_load_failed",),
            "load",
        ),
        HostileModel(
            "zip whose headers under-declare 4 MiB as 64 bytes",
            "lying.zip",
            _lying_zip,
            ("invalid_archive",),
            "corrupt",
        ),
    ]
