"""What the benchmarks share: the `secateurs serve` subprocess, a timed HTTP client, the bare-TensorFlow floor
script, the cache of built models, artifact checks, machine and version facts, and markdown helpers.

The server is started exactly as a user would (``python -m app.cli serve`` is the ``secateurs`` console script's
entry point, which works without installing the package) with a fresh data directory, and is driven over real
HTTP with httpx. Nothing here imports TensorFlow at module level: only the artifact checks need it.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import tomllib
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "out"  # git-ignored: cached models, server logs, per-section results
POLL_S = 0.2
TERMINAL = ("succeeded", "failed", "canceled")


class BenchError(RuntimeError):
    """A benchmark could not produce a valid result (service error, failed verification)."""


def subprocess_env(**extra: str) -> dict[str, str]:
    """The caller's environment without SECATEURS_* settings, quiet TensorFlow logs, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the server ----------------------------------------------------------------------------------------------


class Server:
    """``secateurs serve --port P`` (embedded default: API + one worker child) with a fresh data directory.

    Use as a context manager: started on enter (and waited for ``/readyz``), stopped on exit (SIGTERM to the
    process group, then SIGKILL). The log goes to ``<work_dir>/server.log``.
    """

    def __init__(self, work_dir: Path, ready_timeout: float = 120.0) -> None:
        self.work_dir = work_dir
        self.data_dir = work_dir / "data"
        self.log_path = work_dir / "server.log"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = subprocess_env(SECATEURS_DATA_DIR=str(self.data_dir), SECATEURS_MIN_FREE_BYTES="0")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = time.monotonic()
        deadline = started + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"secateurs serve exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=5).status_code == 200:
                    self.ready_s = time.monotonic() - started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise BenchError(f"secateurs serve not ready after {self.ready_timeout} s:\n{self.tail()}")

    def worker_pids(self) -> list[int]:
        """Pids of the server's child processes (the embedded worker)."""
        if self.process is None:
            return []
        pids: list[int] = []
        for task in Path(f"/proc/{self.process.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return pids

    def worker_peak_rss_mb(self) -> float | None:
        """Peak resident memory (VmHWM) of the embedded worker child so far, in MiB."""
        peaks = [peak_rss_mb(pid) for pid in self.worker_pids()]
        known = [p for p in peaks if p is not None]
        return max(known) if known else None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


# -- the floor: what a user would script with bare TensorFlow -----------------------------------------------

# Run as a fresh ``python -c`` (so it pays interpreter start and the TensorFlow import, as a script does), timed
# per phase. argv: saved_model_dir out_dir out_zip target_sparsity. Every trainable floating variable of rank >= 2
# the signatures use (the service's default selection) gets a magnitude mask at the target within the variable,
# found on one partitioned copy of the scores and applied in place, so the largest variable costs about two
# copies of itself; then ``tf.saved_model.save`` with the original signatures and a deflated zip.
FLOOR_SCRIPT = r"""
import json, os, shutil, sys, time
t0 = time.perf_counter()
import numpy as np
import tensorflow as tf
t_import = time.perf_counter()
src, out, out_zip, target = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
obj = tf.saved_model.load(src)
t_load = time.perf_counter()
variables = {}
for fn in obj.signatures.values():
    for v in fn.variables:
        variables.setdefault(id(v), v)
pruned = 0
for v in variables.values():
    if v.trainable and v.dtype.is_floating and v.shape.rank is not None and v.shape.rank >= 2:
        w = v.numpy()
        k = int(round(target * w.size))
        if k > 0:
            scores = np.abs(w).ravel()
            scores.partition(k - 1)
            threshold = scores[k - 1]
            del scores
            w[np.abs(w) <= threshold] = 0
            v.assign(w)
        del w
        pruned += 1
t_prune = time.perf_counter()
tf.saved_model.save(obj, out, signatures=obj.signatures)
t_save = time.perf_counter()
shutil.make_archive(os.path.splitext(out_zip)[0], "zip", root_dir=out)
t_zip = time.perf_counter()
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({
    "phases_s": {"import": t_import - t0, "load": t_load - t_import, "prune": t_prune - t_load,
                 "save": t_save - t_prune, "zip": t_zip - t_save},
    "pruned_variables": pruned, "peak_rss_kib": hwm,
}))
"""


def run_floor_script(saved_model: Path, work: Path, target: float) -> dict[str, Any]:
    """``FLOOR_SCRIPT`` in a fresh subprocess on a fresh ``work`` directory: its wall time, the phases it
    printed, its peak RSS and where it wrote the pruned SavedModel (``output_dir``) and its zip (``zip``)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out_dir, out_zip = work / "saved_model", work / "pruned.zip"
    args = [sys.executable, "-c", FLOOR_SCRIPT, str(saved_model), str(out_dir), str(out_zip), str(target)]
    tick = time.perf_counter()
    done = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - tick
    if done.returncode != 0:
        raise BenchError(f"floor script failed ({done.returncode}):\n{done.stderr[-3000:]}")
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    phases: dict[str, float] = printed["phases_s"]
    in_process = sum(phases[k] for k in ("load", "prune", "save", "zip"))
    return {
        "wall_s": wall,
        "phases_s": phases,
        "in_process_s": in_process,
        "process_overhead_s": wall - in_process - phases["import"],
        "pruned_variables": printed["pruned_variables"],
        "peak_rss_kib": printed["peak_rss_kib"],
        "output_dir": out_dir,
        "zip": out_zip,
    }


# -- built models (cached by tests.support.model_cache.cached_model) -------------------------------------------


def export_and_zip(root: Path, export: Callable[..., None], *args: object) -> dict[str, Any]:
    """A ``cached_model`` builder: ``export(root/saved_model, *args)``, then the client's upload zip
    ``root/model.zip``; the time of each and their sizes."""
    from tests.support.model_factory import zip_saved_model

    tick = time.perf_counter()
    export(root / "saved_model", *args)
    built = time.perf_counter() - tick
    tick = time.perf_counter()
    zip_saved_model(root / "saved_model", root / "model.zip")
    zipped = time.perf_counter() - tick
    return {
        "build_export_s": built,
        "client_zip_s": zipped,
        "saved_model_bytes": dir_bytes(root / "saved_model"),
        "zip_bytes": (root / "model.zip").stat().st_size,
    }


def export_keras_application(out_dir: Path, name: str) -> None:
    """``model.export`` of a ``keras.applications`` graph with seeded random weights: ``resnet50``,
    ``mobilenetv2`` (224x224x3), or ``small_mobilenet`` (MobileNetV2 at 32x32x3, alpha 0.35: a smoke stand-in)."""
    import keras

    keras.utils.set_random_seed(0)
    if name == "resnet50":
        model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    elif name == "mobilenetv2":
        model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    elif name == "small_mobilenet":
        model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10)
    else:
        raise ValueError(f"unknown application {name!r}")
    model.export(str(out_dir), verbose=False)
    del model
    keras.backend.clear_session()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the HTTP flow -------------------------------------------------------------------------------------------


def server_time(value: str | None) -> float | None:
    """A response timestamp (ISO 8601, UTC) as epoch seconds, comparable with ``time.time()`` here."""
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass
class JobRun:
    """A job polled to the end, with the client's view of when things happened (epoch seconds)."""

    body: dict[str, Any]
    submitted_at: float  # client time the POST /v1/jobs returned
    seen_done_at: float  # client time a poll first returned a terminal status
    stages: list[tuple[str, float]] = field(default_factory=list)  # (stage, client time first seen)


class Api:
    """httpx over one server; every call raises ``BenchError`` with the problem body on an unexpected status."""

    def __init__(self, base_url: str, timeout: float = 600.0) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def _check(response: httpx.Response, expected: int) -> dict[str, Any]:
        if response.status_code != expected:
            raise BenchError(
                f"{response.request.method} {response.request.url.path} -> {response.status_code}: "
                f"{response.text[:2000]}"
            )
        body: dict[str, Any] = response.json()
        return body

    def upload(self, endpoint: str, path: Path, name: str | None = None) -> dict[str, Any]:
        data = {"name": name} if name else None
        with path.open("rb") as fh:
            response = self.http.post(endpoint, files={"file": (path.name, fh)}, data=data)
        return self._check(response, 201)

    def get(self, path: str) -> dict[str, Any]:
        return self._check(self.http.get(path), 200)

    def wait_model(self, model_id: str, timeout: float = 1800.0) -> dict[str, Any]:
        body = _poll(
            lambda: self.get(f"/v1/models/{model_id}"), lambda b: b["status"] != "validating", timeout
        )
        if body["status"] != "ready":
            raise BenchError(f"model {model_id} is {body['status']}: {body.get('error')}")
        return body

    def submit_job(self, payload: dict[str, Any]) -> tuple[dict[str, Any], float]:
        body = self._check(self.http.post("/v1/jobs", json=payload), 202)
        return body, time.time()

    def wait_job(self, job_id: str, submitted_at: float, timeout: float = 3600.0) -> JobRun:
        stages: list[tuple[str, float]] = []

        def fetch() -> dict[str, Any]:
            body = self.get(f"/v1/jobs/{job_id}")
            label = body["stage"] if body["status"] == "running" else body["status"]
            if label and (not stages or stages[-1][0] != label):
                stages.append((label, time.time()))
            return body

        body = _poll(fetch, lambda b: b["status"] in TERMINAL, timeout)
        done = time.time()
        if body["status"] != "succeeded":
            raise BenchError(f"job {job_id} ended {body['status']}: {body.get('error')}")
        return JobRun(body=body, submitted_at=submitted_at, seen_done_at=done, stages=stages)

    def download(self, job_id: str, dest: Path) -> int:
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifact") as response:
            if response.status_code != 200:
                response.read()
                raise BenchError(f"artifact of {job_id} -> {response.status_code}: {response.text[:500]}")
            size = 0
            with dest.open("wb") as fh:
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)
                    size += len(chunk)
        expected = int(response.headers.get("content-length", size))
        if size != expected:
            raise BenchError(f"artifact of {job_id}: got {size} bytes, Content-Length said {expected}")
        return size


def _poll(
    fetch: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body = fetch()
    while not done(body):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout} s; last body: {body}")
        time.sleep(POLL_S)
        body = fetch()
    return body


class Stopwatch:
    """``with watch("name"): ...`` records wall seconds per name (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}

    def __call__(self, name: str) -> _Lap:
        return _Lap(self, name)


class _Lap:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.watch.laps[self.name] = time.perf_counter() - self.start


# -- artifacts -----------------------------------------------------------------------------------------------


def unzip(archive: Path, dest: Path) -> Path:
    """Extract a SavedModel zip; returns the directory holding ``saved_model.pb``."""
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    found = sorted(dest.rglob("saved_model.pb"), key=lambda p: len(p.parts))
    if not found:
        raise BenchError(f"{archive} holds no saved_model.pb")
    return found[0].parent


def prunable_variables(obj: Any) -> list[Any]:
    """Trainable floating variables of rank >= 2 used by the signatures (the service's default selection)."""
    seen: dict[int, Any] = {}
    for name in sorted(obj.signatures):
        for var in obj.signatures[name].variables:
            seen.setdefault(id(var), var)
    return [
        v
        for v in seen.values()
        if v.trainable and v.dtype.is_floating and v.shape.rank is not None and v.shape.rank >= 2
    ]


def verify_pruned(
    saved_model_dir: Path,
    signature_names: Iterable[str],
    target: float,
    tol: float = 0.01,
    per_variable: bool = True,
) -> dict[str, Any]:
    """Load with TensorFlow; same signature names; overall (and, with ``per_variable``, every variable's)
    sparsity within ``tol``. Global scope allocates different sparsities per variable: pass False."""
    import numpy as np
    import tensorflow as tf

    obj = tf.saved_model.load(str(saved_model_dir))
    names = sorted(obj.signatures)
    variables = prunable_variables(obj)
    per_var = [float(np.mean(v.numpy() == 0)) for v in variables]
    zeros = sum(int(np.sum(v.numpy() == 0)) for v in variables)
    total = sum(int(np.prod(v.shape)) for v in variables)
    sparsity = zeros / total if total else 0.0
    expected = sorted(signature_names)
    result = {
        "signatures": names,
        "signatures_match": names == expected,
        "prunable_variables": len(variables),
        "prunable_params": total,
        "sparsity": sparsity,
        "min_variable_sparsity": min(per_var) if per_var else 0.0,
        "max_variable_sparsity": max(per_var) if per_var else 0.0,
    }
    result["ok"] = bool(
        result["signatures_match"]
        and variables
        and abs(sparsity - target) <= tol
        and (not per_variable or all(abs(s - target) <= tol for s in per_var))
    )
    result["checkpoint"] = checkpoint_sparsity(saved_model_dir)
    return result


def checkpoint_sparsity(saved_model_dir: Path) -> dict[str, Any]:
    """What the artifact's variables checkpoint really holds: every float tensor of rank >= 2 in it, whether the
    signatures use it or not. ``dense_tensors`` counts those with fewer than 10% zeros (unpruned copies)."""
    import numpy as np
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(saved_model_dir / "variables" / "variables"))
    dtypes = reader.get_variable_to_dtype_map()
    tensors = zeros = dense = dense_params = total = 0
    for key, shape in reader.get_variable_to_shape_map().items():
        if len(shape) < 2 or not dtypes[key].is_floating:
            continue
        value = reader.get_tensor(key)
        n, z = int(value.size), int(np.sum(value == 0))
        tensors, total, zeros = tensors + 1, total + n, zeros + z
        if z < 0.1 * n:
            dense, dense_params = dense + 1, dense_params + n
    return {
        "tensors": tensors,
        "params": total,
        "zero_fraction": zeros / total if total else 0.0,
        "dense_tensors": dense,
        "dense_params": dense_params,
    }


def signature_names(saved_model_dir: Path) -> list[str]:
    import tensorflow as tf

    return sorted(tf.saved_model.load(str(saved_model_dir)).signatures)


# -- facts ---------------------------------------------------------------------------------------------------


def secateurs_version() -> str:
    try:
        return importlib.metadata.version("secateurs")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without `pip install -e`
        with (ROOT / "pyproject.toml").open("rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "tensorflow": _dist_version("tensorflow"),
        "keras": _dist_version("keras"),
        "numpy": _dist_version("numpy"),
        "secateurs": secateurs_version(),
    }


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count() or "unknown"),
        "cpu": cpu,
        "ram": ram,
        "os": f"{platform.system()} {platform.release()}",
    }


# -- numbers and markdown ------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def positive_finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(headers) + " |\n")
    out.write("|" + "|".join("---" for _ in headers) + "|\n")
    for row in rows:
        out.write("| " + " | ".join(str(cell) for cell in row) + " |\n")
    return out.getvalue()


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def streamed_multipart(
    path: Path, filename: str, content_type: str = "application/octet-stream"
) -> tuple[Iterator[bytes], dict[str, str]]:
    """A streamed ``multipart/form-data`` body with one ``file`` field (1 MiB chunks, never the whole file)."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk
        yield tail

    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + path.stat().st_size + len(tail)),
    }
    return body(), headers


def run_json_child(module: str, flag: str, args: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
    """Run ``python -m module flag <args as JSON>`` in a fresh process (its own peak RSS and CPU clock) and
    return the JSON object it prints last; BenchError with its stderr tail when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", module, flag, json.dumps(args)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise BenchError(f"the {what} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result

