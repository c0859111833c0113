"""One webhook request and what its outcome means for the event.

- 2xx: delivered.
- 408, 429, 5xx, a connection failure or no answer within the timeout: a failed attempt
  worth retrying.
- Any other status (4xx, and 3xx: redirects are not followed): the receiver refuses the
  event; retrying would not change its mind, so it is a permanent failure.

The URL may carry a token: it shows masked in every detail and log line; the secret never
shows anywhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from pydantic import SecretStr

from fleet_telemetry.core.settings import mask_url
from fleet_telemetry.notify.signing import (
    HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_SIGNATURE, HEADER_TIMESTAMP, signature,
)

_RETRIED_STATUSES = frozenset({408, 429})
_BODY_SNIPPET = 200


@dataclass(frozen=True)
class Attempt:
    """The outcome of one request."""

    delivered: bool
    retry: bool
    """For a failure: True when another attempt may succeed."""
    reason: str
    """``ok``, ``status_5xx``, ``status_4xx``, ``status_429``, ``status_408``, ``status_3xx``,
    ``timeout`` or ``connection``."""
    detail: str = ""


def outcome_of(status: int, body: str = "") -> Attempt:
    """What a response status means (module docstring)."""
    if 200 <= status < 300:
        return Attempt(True, False, "ok")
    detail = f"HTTP {status}" + (f": {body[:_BODY_SNIPPET]}" if body else "")
    if status in _RETRIED_STATUSES:
        return Attempt(False, True, f"status_{status}", detail)
    if status >= 500:
        return Attempt(False, True, "status_5xx", detail)
    return Attempt(False, False, f"status_{status // 100}xx", detail)


class Webhook:
    """POSTs events to ``url``, signed with ``secret`` when there is one. Use as ``async with``."""

    def __init__(self, url: str, secret: SecretStr | None, timeout: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"Webhook({mask_url(self.url)!r}, signed={self._secret is not None})"

    async def __aenter__(self) -> "Webhook":
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def headers(self, event_id: str, event_type: str, body: bytes) -> dict[str, str]:
        """The request's headers: content type, the event's id and type, the signature."""
        headers = {"Content-Type": "application/json", HEADER_EVENT_ID: event_id, HEADER_EVENT_TYPE: event_type}
        if self._secret is not None:
            timestamp = int(self._clock())
            headers[HEADER_TIMESTAMP] = str(timestamp)
            headers[HEADER_SIGNATURE] = signature(self._secret.get_secret_value().encode(), timestamp, body)
        return headers

    async def post(self, event_id: str, event_type: str, body: bytes) -> Attempt:
        """One request, never longer than the timeout; never raises for the receiver's trouble."""
        assert self._session is not None, "use Webhook as async with"
        try:
            async with self._session.post(self.url, data=body, headers=self.headers(event_id, event_type, body),
                                          allow_redirects=False) as response:
                text = "" if 200 <= response.status < 300 else await _snippet(response)
                return outcome_of(response.status, text)
        except asyncio.TimeoutError:
            return Attempt(False, True, "timeout", f"no answer within {self._timeout.total} s")
        except aiohttp.ClientError as exc:
            return Attempt(False, True, "connection", f"{type(exc).__name__} ({mask_url(self.url)})")


async def _snippet(response: aiohttp.ClientResponse) -> str:
    raw = await response.content.read(_BODY_SNIPPET)
    return " ".join(raw.decode("utf-8", "replace").split())
