"""Check that a webhook delivery came from your qdpo service (Standard Webhooks signatures).

    from qdpo_client import verify_webhook, WebhookVerificationError

    def receive(request):                      # in your web framework
        try:
            event = verify_webhook(request.body, request.headers, secret="whsec_…")  # the raw bytes, as received
        except WebhookVerificationError:
            return 400
        if seen(request.headers["webhook-id"]):  # retries carry the same id: handle each once
            return 204
        handle(event["type"], event["data"])     # e.g. "job.succeeded", the job
        return 204

The signature is `v1,` + base64(HMAC-SHA256(secret, f"{webhook-id}.{webhook-timestamp}.{body}")),
keyed by the base64-decoded part of the secret after `whsec_`; the timestamp must be within
`tolerance` seconds of now, so a captured delivery cannot be replayed later. Any library that
implements Standard Webhooks (e.g. the `standardwebhooks` package) verifies them the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from qdpo_client.errors import QdpoClientError

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_SECONDS = 300


class WebhookVerificationError(QdpoClientError):
    """The delivery's headers or signature do not check out: do not trust its body."""


def _secret_bytes(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        return secret
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError("the secret is not a webhook secret (whsec_ followed by base64); use the one webhooks.create returned") from None
    if not key:
        raise WebhookVerificationError("the secret is empty")
    return key


def sign_webhook(body: bytes | str, *, msg_id: str, timestamp: int, secret: str | bytes) -> str:
    """The `webhook-signature` value for this body, id and timestamp (for tests of your receiver)."""
    data = body.encode("utf-8") if isinstance(body, str) else body
    digest = hmac.new(_secret_bytes(secret), f"{msg_id}.{timestamp}.".encode() + data, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify_webhook(
    body: bytes | str, headers: Mapping[str, str], secret: str | bytes, *, tolerance: float = DEFAULT_TOLERANCE_SECONDS, now: float | None = None
) -> Any:
    """Verify a delivery and return its parsed JSON body; raises WebhookVerificationError otherwise.

    `body` must be the request body exactly as received (not re-serialised JSON); `headers` any
    mapping (names are matched case-insensitively).
    """
    lowered = {str(k).lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = lowered.get("webhook-id", ""), lowered.get("webhook-timestamp", ""), lowered.get("webhook-signature", "")
    missing = [name for name, value in (("webhook-id", msg_id), ("webhook-timestamp", stamp), ("webhook-signature", signatures)) if not value]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp: {stamp[:40]!r} is not a Unix time") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp is {current - timestamp:+.0f} s from now, outside the tolerance of {tolerance:g} s (a replay, or a clock off)"
        )
    expected = sign_webhook(body, msg_id=msg_id, timestamp=timestamp, secret=secret).split(",", 1)[1].encode()
    for candidate in signatures.split():  # several during a secret rotation: any one may match
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            try:
                return json.loads(body)
            except ValueError:
                raise WebhookVerificationError("the signature matches but the body is not JSON") from None
    raise WebhookVerificationError("no signature matches this body and secret (was the body changed, or is it another endpoint's secret?)")
