"""How batch callbacks are signed: a secret per tenant, and a signed timestamp against replay.

Each tenant's signing secret is derived from the operator's `RAGQ_CALLBACK_SECRET` (HMAC-SHA256 of
`ragq-callback:<tenant>`), so a tenant can verify its own callbacks but cannot forge another tenant's. The
`Ragq-Signature` header is `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` (Stripe's scheme); a
receiver rejects a timestamp more than `TOLERANCE_S` away from its clock.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "Ragq-Signature"
TOLERANCE_S = 300


def tenant_secret(operator_secret: str, tenant: str) -> str:
    """The secret that signs `tenant`'s callbacks (hex), derived from the operator's callback secret."""
    return hmac.new(operator_secret.encode(), f"ragq-callback:{tenant}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `Ragq-Signature` value for `body` sent at `timestamp`: `t=<timestamp>,v1=<hex HMAC>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, now: float, tolerance_s: float = TOLERANCE_S) -> bool:
    """Whether `header` signs `body` with `secret` at a time within `tolerance_s` of `now` (what a receiver does)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split(",v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))
