"""Signed command tokens (JWT): issued for a user by ``fleet users token``, carried by
v2 commands (docs/interface.md, "Commands"), verified by the command consumer.

A token names the user (``sub`` = user id) and carries ``iss``, ``aud``, ``iat``, ``exp``
and a ``jti``. HS256 with ``FLEET_JWT_SECRET``, or RS256 with ``FLEET_JWT_PRIVATE_KEY``
(issuing) and ``FLEET_JWT_PUBLIC_KEY`` (verifying). :func:`verify` is pure (the clock is
passed in); whether a token was revoked is :mod:`fleet_telemetry.fleetops.sessions`'
business. Keys never appear in a repr, a log line or an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import jwt

from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops.errors import FleetOpsError

CLAIMS = ("sub", "iss", "aud", "iat", "exp", "jti")


class Unauthenticated(FleetOpsError):
    """A missing, malformed, forged, expired or revoked token."""

    reason = "unauthenticated"


@dataclass(frozen=True)
class Claims:
    user_id: UUID
    issued_at: int
    expires_at: int
    token_id: str


def _pem(value: str, setting: str) -> str:
    """PEM text given inline, or the path of a file holding it."""
    if not value or value.lstrip().startswith("-----BEGIN"):
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise UsageError(f"invalid configuration {setting}: cannot read the key file"
                         f" ({exc.strerror or type(exc).__name__})") from None


@dataclass(frozen=True)
class TokenKeys:
    """How tokens are signed and checked. ``repr`` shows the algorithm only."""

    algorithm: str
    issuer: str
    audience: str
    max_ttl_seconds: int
    signing_key: str = field(default="", repr=False)
    verifying_key: str = field(default="", repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenKeys | None:
        """The configured keys, or None when no FLEET_JWT_* key is set."""
        common = {"issuer": settings.jwt_issuer, "audience": settings.jwt_audience,
                  "max_ttl_seconds": settings.jwt_max_ttl_seconds}
        secret = settings.jwt_secret.get_secret_value()
        public = _pem(settings.jwt_public_key, "FLEET_JWT_PUBLIC_KEY")
        private = _pem(settings.jwt_private_key.get_secret_value(), "FLEET_JWT_PRIVATE_KEY")
        if secret and (public or private):
            raise UsageError("invalid configuration: set FLEET_JWT_SECRET (HS256) or FLEET_JWT_PUBLIC_KEY"
                             " and FLEET_JWT_PRIVATE_KEY (RS256), not both")
        if secret:
            if len(secret.encode()) < 32:
                raise UsageError("invalid configuration FLEET_JWT_SECRET: use at least 32 bytes")
            return cls("HS256", signing_key=secret, verifying_key=secret, **common)  # type: ignore[arg-type]
        if public or private:
            return cls("RS256", signing_key=private, verifying_key=public, **common)  # type: ignore[arg-type]
        return None

    @classmethod
    def required(cls, settings: Settings) -> TokenKeys:
        keys = cls.from_settings(settings)
        if keys is None:
            raise UsageError("no token key configured: set FLEET_JWT_SECRET (or FLEET_JWT_PRIVATE_KEY"
                             " and FLEET_JWT_PUBLIC_KEY)")
        return keys


def issue(keys: TokenKeys, user_id: UUID, *, ttl_seconds: int, now: float) -> tuple[str, Claims]:
    """A signed token for ``user_id`` valid ``ttl_seconds`` from ``now`` (epoch seconds)."""
    if not 0 < ttl_seconds <= keys.max_ttl_seconds:
        raise UsageError(f"--ttl must be between 1 and {keys.max_ttl_seconds} seconds (FLEET_JWT_MAX_TTL_SECONDS)")
    if not keys.signing_key:
        raise UsageError("cannot issue tokens: FLEET_JWT_PRIVATE_KEY is not set")
    claims = Claims(user_id, int(now), int(now) + ttl_seconds, uuid4().hex)
    payload = {"sub": str(user_id), "iss": keys.issuer, "aud": keys.audience,
               "iat": claims.issued_at, "exp": claims.expires_at, "jti": claims.token_id}
    try:
        token = jwt.encode(payload, keys.signing_key, algorithm=keys.algorithm)
    except (ValueError, TypeError, jwt.exceptions.PyJWTError):
        raise UsageError("cannot issue tokens: FLEET_JWT_PRIVATE_KEY is not a valid RSA private key") from None
    return token, claims


def verify(keys: TokenKeys, token: Any, *, now: float) -> Claims:
    """The claims of a token signed by ``keys``, for their issuer and audience, not expired
    at ``now``; raises :class:`Unauthenticated` with a sentence that never quotes the token."""
    if not isinstance(token, str) or not token:
        raise Unauthenticated("the command carries no token")
    if not keys.verifying_key:
        raise Unauthenticated("no key to verify tokens: FLEET_JWT_PUBLIC_KEY is not set")
    try:
        payload = jwt.decode(
            token, keys.verifying_key, algorithms=[keys.algorithm], audience=keys.audience,
            issuer=keys.issuer, options={"require": list(CLAIMS), "verify_exp": False, "verify_iat": False},
        )
    except jwt.exceptions.InvalidSignatureError:
        raise Unauthenticated("the token's signature does not verify") from None
    except jwt.exceptions.InvalidAudienceError:
        raise Unauthenticated(f"the token is not for audience {keys.audience}") from None
    except jwt.exceptions.InvalidIssuerError:
        raise Unauthenticated(f"the token was not issued by {keys.issuer}") from None
    except jwt.exceptions.MissingRequiredClaimError as exc:
        raise Unauthenticated(f"the token lacks claim {exc.claim!r}") from None
    except (jwt.exceptions.PyJWTError, ValueError, TypeError):
        raise Unauthenticated("the token is malformed or signed with another algorithm") from None
    try:
        user_id = UUID(str(payload["sub"]))
        issued, expires = int(payload["iat"]), int(payload["exp"])
    except (ValueError, TypeError):
        raise Unauthenticated("the token's sub, iat or exp is malformed") from None
    if expires <= now:
        raise Unauthenticated("the token has expired")
    if issued > now + 60:
        raise Unauthenticated("the token is issued in the future")
    if expires - issued > keys.max_ttl_seconds:
        raise Unauthenticated("the token lives longer than FLEET_JWT_MAX_TTL_SECONDS")
    return Claims(user_id, issued, expires, str(payload["jti"]))
