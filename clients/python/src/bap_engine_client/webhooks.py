"""Verifying bap-engine's webhook requests (standard library only).

Each request bap-engine POSTs to a product's webhook carries

    X-Bap-Event-Id:  the event's id (the same event may come more than once: dedupe by it)
    X-Bap-Timestamp: unix seconds when the request was signed
    X-Bap-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

where `secret` is the whole `whsec_...` string the webhook's PUT answered (UTF-8) and `body` the exact
bytes received. A receiver checks the signature over the raw body (before parsing the JSON) and
refuses a timestamp too far from its clock (a replayed request):

    from bap_engine_client import verify_signature

    ok = verify_signature(secret, request.headers["X-Bap-Timestamp"], request.headers["X-Bap-Signature"],
                          raw_body)
    if not ok:
        return 400
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["verify_signature", "SIGNATURE_HEADER", "TIMESTAMP_HEADER", "EVENT_ID_HEADER"]

SIGNATURE_HEADER = "X-Bap-Signature"
TIMESTAMP_HEADER = "X-Bap-Timestamp"
EVENT_ID_HEADER = "X-Bap-Event-Id"
_SCHEME = "v1="


def verify_signature(secret: str, timestamp: str, signature: str, body: bytes, *, tolerance_s: int = 300,
                     now: float | None = None) -> bool:
    """True when `signature` (the X-Bap-Signature header) is the HMAC-SHA256 of `timestamp + "." + body`
    under `secret`, and `timestamp` (X-Bap-Timestamp) is within `tolerance_s` seconds of `now` (default:
    this machine's clock) either way. False otherwise: a wrong secret, a changed body, an old or
    malformed timestamp, a malformed signature. Never raises for what a request carries; a `body` that
    is not bytes (a decoded str, a parsed dict) is a programming error and raises TypeError.

    The comparison is constant-time. The header may list several signatures separated by commas or
    spaces (`v1=...,v1=...`); one match is enough."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError("verify_signature needs the raw body as bytes, exactly as received")
    stamp = timestamp.strip()
    if not stamp.isascii() or not stamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + bytes(body), hashlib.sha256).hexdigest()
    candidates = [part.strip() for part in signature.replace(" ", ",").split(",") if part.strip()]
    matched = False
    for candidate in candidates:
        if candidate.startswith(_SCHEME):
            # every candidate is compared (no early exit), each in constant time
            matched |= hmac.compare_digest(candidate[len(_SCHEME):].lower().encode(), expected.encode())
    return matched
