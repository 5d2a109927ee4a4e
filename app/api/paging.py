"""The RFC 8288 ``Link: <...>; rel="next"`` header of list responses.

The body's ``next_cursor`` stays the contract; the header lets generic HTTP clients (and people with curl)
follow pages without knowing our parameter names. The link is the request's own path and query with ``cursor``
replaced and ``limit`` made explicit, so filters (``status``, ``model_id``) carry over. It is a relative
reference (RFC 8288 3.1 resolves it against the request URL), so it stays right behind a proxy that rewrites the
host or scheme.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import Request, Response


def set_next_link(request: Request, response: Response, next_cursor: str | None, limit: int) -> None:
    if next_cursor is None:
        return
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("cursor", "limit")]
    params += [("limit", str(limit)), ("cursor", next_cursor)]
    response.headers["Link"] = f'<{request.url.path}?{urlencode(params)}>; rel="next"'
