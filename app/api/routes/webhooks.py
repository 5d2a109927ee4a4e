"""The caller's webhook settings: its default URL for new jobs, and its signing secret (shown, rotated).

Everything here belongs to the caller's tenant, so there are no ids: each tenant sees and changes only its own.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.api.routes.models import ERRORS
from app.errors import Unprocessable
from app.schemas.resources import WebhookSecretOut, WebhookSettings
from app.webhooks import tenants
from app.webhooks.guard import AllowList, UnsafeWebhookUrl

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _no_store(response: Response) -> None:
    """A secret must not linger in a shared cache or the browser's (RFC 9111 5.2.2.5)."""
    response.headers["Cache-Control"] = "no-store"


@router.get("", response_model=WebhookSettings, responses=ERRORS, summary="The tenant's webhook settings")
def get_webhook_settings(session: SessionDep, tenant: TenantDep) -> WebhookSettings:
    return WebhookSettings(default_url=tenants.default_url(session, tenant))


@router.put("", response_model=WebhookSettings, responses=ERRORS, summary="Set the default webhook URL")
def put_webhook_settings(
    body: WebhookSettings, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> WebhookSettings:
    """``default_url`` receives the events of jobs created without ``webhook_url`` from now on (jobs keep the
    URL they were created with); null clears it. Checked like a job's ``webhook_url`` (422 naming why)."""
    try:
        record = tenants.set_default_url(
            session, tenant, body.default_url, AllowList.parse(settings.webhook_allow)
        )
    except UnsafeWebhookUrl as exc:
        raise Unprocessable(
            f"default_url is refused: {exc}", extra={"errors": [{"loc": "default_url", "msg": str(exc)}]}
        ) from exc
    return WebhookSettings(default_url=record.default_url)


@router.get(
    "/secret",
    response_model=WebhookSecretOut,
    responses=ERRORS,
    summary="The secret that signs this tenant's webhooks (made on first request)",
)
def get_secret(session: SessionDep, tenant: TenantDep, response: Response) -> WebhookSecretOut:
    """Verify each delivery with it per Standard Webhooks: base64-decode what follows ``whsec_`` and compare
    ``v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`` with ``webhook-signature``."""
    _no_store(response)
    return tenants.secret_out(tenants.secret_record(session, tenant))


@router.post(
    "/secret/rotate",
    response_model=WebhookSecretOut,
    responses=ERRORS,
    summary="Replace the signing secret (the old one keeps co-signing for 24 h)",
)
def rotate_secret(session: SessionDep, tenant: TenantDep, response: Response) -> WebhookSecretOut:
    """The new secret signs at once; until ``previous_secret_expires_at`` each delivery also carries a
    signature made with the old one, so receivers can switch without missing a message."""
    _no_store(response)
    return tenants.secret_out(tenants.rotate(session, tenant))
