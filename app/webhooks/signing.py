"""Standard Webhooks signatures: ``whsec_`` secrets and the three ``webhook-*`` headers.

The spec (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md):

- ``webhook-id``: the message id, the same on every retry of one message, so receivers can drop duplicates;
- ``webhook-timestamp``: unix seconds of THIS attempt, so receivers can refuse replays of old requests;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the secret's raw
  bytes (the base64 after ``whsec_``). Several space-separated signatures are allowed: during a rotation we
  sign with the new and the previous secret, so a receiver holding either keeps verifying.

Any Standard Webhooks library (``standardwebhooks``, Svix's) verifies what this module produces; the README
shows a verification in a few lines of plain Python.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the spec asks for 24-64 random bytes


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def secret_key(secret: str) -> bytes:
    """The HMAC key: the base64-decoded part after ``whsec_``; ValueError if it is not base64."""
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from exc


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature of ``body`` for this message id and timestamp."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(message_id: str, timestamp: int, body: bytes, secrets_: Sequence[str]) -> dict[str, str]:
    """The three Standard Webhooks headers, signed with every secret given (current first)."""
    if not secrets_:
        raise ValueError("at least one secret is needed to sign a webhook")
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, message_id, timestamp, body) for s in secrets_),
    }
