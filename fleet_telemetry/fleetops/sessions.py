"""Revoking a user's command tokens, and checking a token against its revocation.

``fleet users revoke USER`` writes the revocation time, in whole epoch seconds, under the
user's session key ``user:{id}:session`` and, when the user is linked to a driver profile,
under the driver's ``driver:{id}:session`` too
(:class:`~fleet_telemetry.core.redis_keys.RedisKeys`); both are kept for
``FLEET_JWT_MAX_TTL_SECONDS``, the longest any token issued before can still live.

The check reads the user's key and, when the user is linked to a driver profile at that
moment, the driver's key, and takes the latest time: a token issued (``iat``) at or
before it is revoked. The user's key does not depend on the driver link, so linking or
unlinking a driver profile (``driver.update``, ``driver.delete``) after a revocation
cannot make a revoked token valid again; a revocation written under the driver's key
alone is honoured while the user is linked to that driver.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from uuid import UUID

import asyncpg

from fleet_telemetry.core.redis_client import RedisClient, is_cluster_client
from fleet_telemetry.core.redis_keys import RedisKeys
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops.tokens import Claims, TokenKeys, Unauthenticated, verify


async def session_keys(conn: asyncpg.Connection, keys: RedisKeys, user_id: UUID) -> list[str]:
    """The Redis keys holding the user's revocation times: ``user:{id}:session``, then
    ``driver:{id}:session`` when the user is linked to a live driver profile."""
    driver_id = await conn.fetchval("SELECT id FROM drivers WHERE user_id = $1 AND deleted_at IS NULL", user_id)
    found = [keys.user_session(user_id)]
    if driver_id is not None:
        found.append(keys.driver_session(driver_id))
    return found


async def revoke(conn: asyncpg.Connection, redis: RedisClient, keys: RedisKeys, user_id: UUID, *,
                 now: float, keep_seconds: int) -> tuple[list[str], int]:
    """Revokes every token of ``user_id`` issued up to ``now``; returns the keys written
    (the user's first) and the time kept."""
    written = await session_keys(conn, keys, user_id)
    revoked_at = int(now)
    for key in written:  # the user's key first: it alone is read whatever the driver link
        await redis.set(key, str(revoked_at), ex=keep_seconds)
    return written, revoked_at


async def _values(redis: RedisClient, names: Sequence[str]) -> list[bytes | str | None]:
    """The values of ``names`` in one round trip (MGET); on a Redis Cluster, where the
    keys live in different slots, one GET each, sent together."""
    if len(names) == 1:
        return [await redis.get(names[0])]
    if is_cluster_client(redis):
        return list(await asyncio.gather(*(redis.get(name) for name in names)))
    return list(await redis.mget(names))


async def revoked_at(redis: RedisClient, names: Sequence[str]) -> int | None:
    """The latest revocation time held under ``names``, or None when none holds one."""
    times = [int(v) for v in await _values(redis, names) if v is not None]
    return max(times) if times else None


async def authenticate(conn: asyncpg.Connection, redis: RedisClient, keys: RedisKeys, token_keys: TokenKeys,
                       token: object, *, now: float) -> Claims:
    """The claims of a valid, unexpired, unrevoked token; raises Unauthenticated.

    Reads the driver link on ``conn`` and the session keys in Redis; a Redis or PostgreSQL
    failure is raised as is (transient: the caller retries)."""
    claims = verify(token_keys, token, now=now)
    revoked = await revoked_at(redis, await session_keys(conn, keys, claims.user_id))
    if revoked is not None and claims.issued_at <= revoked:
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
