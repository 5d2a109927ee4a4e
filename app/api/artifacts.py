"""Serving artifact files: ``Repr-Digest`` (RFC 9530) and Range requests that follow RFC 9110 14.

Starlette's FileResponse already does single and multiple ranges, ``If-Range`` (strong comparison with our
ETag) and ``Content-Length``. Two of its answers break our contract, so they are fixed up before it runs:

- a Range it cannot parse, or in a unit other than bytes, gets a plain-text 400 there; RFC 9110 14.2 says a
  server ignores such a header (MUST, for an unknown unit), so it is dropped and the whole file is sent (200);
- an unsatisfiable range gets a plain-text 416 there; here it is problem+json like every other error, still with
  ``Content-Range: bytes */<size>`` (RFC 9110 15.5.17).
"""

from __future__ import annotations

import base64
import os

import anyio.to_thread
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from app.errors import PROBLEM_BASE

PROBLEM = "application/problem+json"


def repr_digest(sha256_hex: str) -> str:
    """The ``Repr-Digest`` field value for a SHA-256 we hold as hex: ``sha-256=:<base64 of the raw digest>:``."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


class ArtifactResponse(FileResponse):
    """A FileResponse whose Range edge cases follow RFC 9110 and our problem+json contract (module docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.stat_result is None:  # the validators (ETag, Last-Modified) are needed to judge If-Range
            self.stat_result = await anyio.to_thread.run_sync(os.stat, self.path)
            self.set_stat_headers(self.stat_result)
        headers = Headers(scope=scope)
        http_range = headers.get("range")
        if_range = headers.get("if-range")
        if http_range is not None and (if_range is None or self._should_use_range(if_range)):
            size = self.stat_result.st_size
            try:
                # Starlette's own parser, so this check and the response it then builds cannot disagree.
                self._parse_range_header(http_range, size)
            except MalformedRangeHeader:
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"range"]}
            except RangeNotSatisfiable:
                await self._unsatisfiable(size)(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _unsatisfiable(self, size: int) -> JSONResponse:
        body = {
            "type": PROBLEM_BASE + "range-not-satisfiable",
            "title": "Range not satisfiable",
            "status": 416,
            "detail": f"no requested range starts inside the artifact, which is {size} bytes; "
            "ask for bytes=<first>-<last> with first below the size",
        }
        headers = {"Content-Range": f"bytes */{size}"}
        for name in ("etag", "repr-digest"):
            if name in self.headers:
                headers[name] = self.headers[name]
        return JSONResponse(body, status_code=416, media_type=PROBLEM, headers=headers)
