"""``GET /metrics``: the Prometheus text exposition, for operators (not tenants).

Tenant API keys do not apply: a scraper is not a tenant, and the numbers are service-wide (no tenant labels).
With ``SECATEURS_METRICS_TOKEN`` set the scraper sends ``Authorization: Bearer <token>`` (Prometheus's
``authorization`` scrape setting); without it only loopback clients are answered (a sidecar, or the host itself),
so an API exposed on a public address does not publish its load to everyone.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from app.errors import Forbidden, Unauthorized
from app.observability.prometheus import CONTENT_TYPE

router = APIRouter(tags=["operations"])


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_access(request: Request) -> None:
    token = request.app.state.settings.metrics_token
    if token:
        presented = request.headers.get("authorization", "")
        scheme, _, value = presented.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise Unauthorized(
                "GET /metrics needs 'Authorization: Bearer <SECATEURS_METRICS_TOKEN>'",
                invalid_token=bool(presented),
            )
        return
    host = request.client.host if request.client else None
    if not _is_loopback(host):
        raise Forbidden(
            "GET /metrics answers loopback clients only while SECATEURS_METRICS_TOKEN is unset; set it and "
            "scrape with 'Authorization: Bearer <token>'"
        )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format (docs/operations.md)"},
        401: {"description": "SECATEURS_METRICS_TOKEN is set and the request does not carry it"},
        403: {"description": "no token configured and the client is not on loopback"},
    },
)
async def metrics(request: Request) -> Response:
    _check_access(request)
    body = await run_in_threadpool(request.app.state.metrics.render)  # a few database queries
    return Response(body, media_type=CONTENT_TYPE)
