"""Webhook signatures: HMAC-SHA256 of the request's timestamp and raw body.

The sender puts the Unix time in ``X-Fleet-Timestamp`` and
``sha256=<hex of HMAC-SHA256(secret, "<timestamp>." + body)>`` in ``X-Fleet-Signature``.
A receiver recomputes the HMAC over the bytes it received, compares in constant time and
refuses a timestamp too far from its clock, so a captured request cannot be replayed
later (:func:`verify` does all three). Pure code: no I/O, no clock (``now`` is passed).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

HEADER_EVENT_ID: Final = "X-Fleet-Event-Id"
HEADER_EVENT_TYPE: Final = "X-Fleet-Event-Type"
HEADER_TIMESTAMP: Final = "X-Fleet-Timestamp"
HEADER_SIGNATURE: Final = "X-Fleet-Signature"
TOLERANCE_SECONDS: Final = 300
"""How far a receiver should let a request's timestamp be from its own clock."""


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 with ``secret`` of ``b"<timestamp>." + body``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, headers: Mapping[str, str], body: bytes, now: float,
           tolerance: float = TOLERANCE_SECONDS) -> bool:
    """What a receiver does: True when ``headers`` carry a timestamp within ``tolerance``
    seconds of ``now`` and the signature of ``body`` with ``secret`` (constant-time compare)."""
    try:
        timestamp = int(headers[HEADER_TIMESTAMP])
        given = headers[HEADER_SIGNATURE]
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    return hmac.compare_digest(given, signature(secret, timestamp, body))
