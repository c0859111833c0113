"""Revoking a user's command tokens, and checking a token against its revocation.

``fleet users revoke USER`` writes the user's session key in Redis
(``driver:{id}:session`` for a user linked to a driver profile, ``user:{id}:session``
otherwise; :class:`~fleet_telemetry.core.redis_keys.RedisKeys`) with the revocation time
in whole epoch seconds, kept for ``FLEET_JWT_MAX_TTL_SECONDS``: the longest any token
issued before it can still live. A token issued (``iat``) at or before that second is
revoked.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from uuid import UUID

import asyncpg

from fleet_telemetry.core.redis_client import RedisClient
from fleet_telemetry.core.redis_keys import RedisKeys
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops.tokens import Claims, TokenKeys, Unauthenticated, verify


async def session_key(conn: asyncpg.Connection, keys: RedisKeys, user_id: UUID) -> str:
    """The Redis key holding the user's last revocation time."""
    driver_id = await conn.fetchval("SELECT id FROM drivers WHERE user_id = $1 AND deleted_at IS NULL", user_id)
    return keys.driver_session(driver_id) if driver_id is not None else keys.user_session(user_id)


async def revoke(conn: asyncpg.Connection, redis: RedisClient, keys: RedisKeys, user_id: UUID, *,
                 now: float, keep_seconds: int) -> tuple[str, int]:
    """Revokes every token of ``user_id`` issued up to ``now``; returns the key and the time kept."""
    key = await session_key(conn, keys, user_id)
    revoked_at = int(now)
    await redis.set(key, str(revoked_at), ex=keep_seconds)
    return key, revoked_at


async def authenticate(conn: asyncpg.Connection, redis: RedisClient, keys: RedisKeys, token_keys: TokenKeys,
                       token: object, *, now: float) -> Claims:
    """The claims of a valid, unexpired, unrevoked token; raises Unauthenticated.

    Reads the driver link on ``conn`` and the session key in Redis; a Redis or PostgreSQL
    failure is raised as is (transient: the caller retries)."""
    claims = verify(token_keys, token, now=now)
    revoked = await redis.get(await session_key(conn, keys, claims.user_id))
    if revoked is not None and claims.issued_at <= int(revoked):
        raise Unauthenticated("the token was revoked")
    return claims


Authenticate = Callable[[asyncpg.Connection, "str | None", "str | None"], Awaitable[str]]
"""``(conn, token, actor)``: names the user a command acts as (a user id or e-mail), or
raises Unauthenticated."""


def authenticator(settings: Settings, redis: RedisClient) -> Authenticate:
    """The command consumer's check. A version 2 command (``token``): the token's user,
    once :func:`authenticate` accepts it. A version 1 command (no token): refused, unless
    ``FLEET_COMMANDS_ALLOW_UNSIGNED`` accepts the user its ``actor`` names."""
    token_keys = TokenKeys.from_settings(settings)

    async def check(conn: asyncpg.Connection, token: str | None, actor: str | None) -> str:
        if token is None:
            if settings.commands_allow_unsigned and actor:
                return actor
            raise Unauthenticated("the command carries no token (version 1 commands are accepted only with"
                                  " FLEET_COMMANDS_ALLOW_UNSIGNED=true and an actor)")
        if token_keys is None:
            raise Unauthenticated("no key to verify tokens is configured (FLEET_JWT_SECRET or FLEET_JWT_PUBLIC_KEY)")
        claims = await authenticate(conn, redis, settings.redis_keys, token_keys, token, now=time.time())
        return str(claims.user_id)

    return check
