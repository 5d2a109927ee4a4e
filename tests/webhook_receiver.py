"""A webhook receiver for tests, and a Standard Webhooks verifier written from the spec alone.

The verifier deliberately shares no code with app.webhooks: it is what a customer would write from
https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md, so a test that
passes it proves our deliveries verify anywhere, not that our code agrees with itself. It is itself checked
against the spec's published example (tests/app/test_webhooks.py).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def verify_standard_webhook(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None, tolerance_s: int = 300
) -> dict[str, Any]:
    """The spec's verification: HMAC-SHA256 keyed with the base64-decoded secret (after ``whsec_``) over
    ``{webhook-id}.{webhook-timestamp}.{body}``, compared with each ``v1,<base64>`` of ``webhook-signature``
    (space-separated), and a timestamp within ``tolerance_s`` of now. Returns the parsed body; raises
    AssertionError otherwise."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, timestamp = lower["webhook-id"], lower["webhook-timestamp"]
    key = base64.b64decode(secret.split("_", 1)[1] if secret.startswith("whsec_") else secret)
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [part.split(",", 1) for part in lower["webhook-signature"].split(" ") if "," in part]
    assert any(version == "v1" and hmac.compare_digest(sig, expected) for version, sig in offered), (
        f"no valid v1 signature among {lower['webhook-signature']!r}"
    )
    assert abs((time.time() if now is None else now) - int(timestamp)) <= tolerance_s, "stale timestamp"
    return json.loads(body)


@dataclass(frozen=True)
class Answer:
    """What the receiver says to one request: a status, extra headers, after an optional delay."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the status line
    body_delay_s: float = 0.0  # between the headers and the body


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """An HTTP(S) server on 127.0.0.1 (a free port) in a daemon thread. Answers each POST with the next
    scripted :class:`Answer`, then 200; records every request. Use as a context manager."""

    def __init__(self, script: list[Answer] | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[Received] = []
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    answer = receiver.script.pop(0) if receiver.script else Answer()
                time.sleep(answer.delay_s)
                record = Received(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()
                )
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                time.sleep(answer.body_delay_s)
                with contextlib.suppress(OSError):  # the client may have given up (timeout test)
                    self.wfile.write(b"ok")
                with receiver._lock:
                    receiver.requests.append(record)
                    receiver._lock.notify_all()

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """The first ``count`` requests, waiting up to ``timeout`` seconds for them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} webhook request(s), got {len(self.requests)}")
                self._lock.wait(left)
            return list(self.requests[:count])

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
