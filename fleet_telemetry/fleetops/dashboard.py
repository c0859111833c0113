"""Dashboard aggregates (seed 7.1 B) cached in Redis as ``dashboard:stats:daily``.

:func:`compute_stats` runs the aggregation queries (revenue, active vehicles,
maintenance costs, open jobs) in one read-only transaction. :class:`DashboardCache`
serves them from Redis for ``FLEET_DASHBOARD_CACHE_SECONDS`` and recomputes them once
when many callers miss at the same moment: the first caller takes a short Redis lock
(``SET ... NX PX``) and computes, the others wait for the value to appear. A lock
holder that dies frees the lock when it expires; a waiter that waits longer than
``wait_seconds`` computes on its own. When Redis is unreachable every call computes
from PostgreSQL (the cache is an optimisation, never a dependency).

Writes that change the figures (the small writers, the command consumer, resolving an
alert) call :func:`invalidate`: it drops the cached value and bumps
``dashboard:stats:daily:version``, and a computation that was running meanwhile does not
store what it computed, so the next caller sees the write. Keys carry
``FLEET_REDIS_KEY_PREFIX`` (:class:`~fleet_telemetry.core.redis_keys.RedisKeys`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import redis.exceptions
import structlog

from fleet_telemetry.core.redis_client import RedisClient, connect_redis
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops.audit import jsonable
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.validation import OPEN_JOB_STATUSES

log = structlog.get_logger("fleet.fleetops")

DASHBOARD_KEY = "dashboard:stats:daily"
"""The key's name without a prefix; a deployment's own is ``settings.redis_keys.dashboard``."""
VERSION_SECONDS = 86_400
"""How long the invalidation counter is kept: far longer than any computation."""

# Deletes the lock only if it is still ours (it may have expired and been taken since).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Stores the aggregates only if no write invalidated the cache since the computation began.
_STORE = """
if (redis.call('GET', KEYS[2]) or '') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""

_COUNTS = """
SELECT (now() AT TIME ZONE 'UTC')::date AS day, now() AS computed_at,
       (SELECT count(*) FROM vehicles WHERE deleted_at IS NULL AND status = 'active') AS active_vehicles,
       (SELECT count(DISTINCT vehicle_id) FROM vehicle_assignments
         WHERE status = 'ACTIVE' AND tstzrange(start_time, end_time, '[)') @> now()) AS vehicles_on_duty,
       (SELECT count(*) FROM transport_jobs
         WHERE deleted_at IS NULL AND status = ANY($1::text[])) AS open_jobs
"""

# Revenue of delivered jobs per currency: all time, this UTC month, today (UTC).
_REVENUE = """
SELECT currency,
       sum(agreed_price) AS total,
       sum(agreed_price) FILTER (WHERE delivered_at >= date_trunc('month', now(), 'UTC')) AS month,
       sum(agreed_price) FILTER (WHERE delivered_at >= date_trunc('day', now(), 'UTC')) AS today,
       count(*) FILTER (WHERE delivered_at >= date_trunc('day', now(), 'UTC')) AS delivered_today
  FROM transport_jobs
 WHERE status = 'delivered' AND deleted_at IS NULL
 GROUP BY currency ORDER BY currency
"""

_MAINTENANCE = """
SELECT coalesce(sum(cost), 0.00) AS total,
       coalesce(sum(cost) FILTER (WHERE date >= date_trunc('month', now() AT TIME ZONE 'UTC')::date), 0.00) AS month,
       coalesce(sum(cost) FILTER (WHERE date = (now() AT TIME ZONE 'UTC')::date), 0.00) AS today
  FROM maintenance_records
"""


async def compute_stats(conn: asyncpg.Connection) -> dict[str, Any]:
    """The dashboard aggregates as JSON-ready data; amounts are exact decimal strings,
    revenue per currency. Run inside one transaction for a consistent picture."""
    counts = await conn.fetchrow(_COUNTS, list(OPEN_JOB_STATUSES))
    revenue = await conn.fetch(_REVENUE)
    maintenance = await conn.fetchrow(_MAINTENANCE)
    return jsonable({
        "day": counts["day"],
        "computed_at": counts["computed_at"],
        "active_vehicles": counts["active_vehicles"],
        "vehicles_on_duty": counts["vehicles_on_duty"],
        "open_jobs": counts["open_jobs"],
        "total_revenue": {r["currency"]: r["total"] for r in revenue},
        "revenue_month": {r["currency"]: r["month"] for r in revenue if r["month"] is not None},
        "revenue_today": {r["currency"]: r["today"] for r in revenue if r["today"] is not None},
        "delivered_jobs_today": sum(r["delivered_today"] for r in revenue),
        "maintenance_costs": {"total": maintenance["total"], "month": maintenance["month"],
                              "today": maintenance["today"]},
    })


def database_compute(database: Database) -> Callable[[], Awaitable[dict[str, Any]]]:
    """:func:`compute_stats` on a read connection (a replica when one is up)."""

    async def compute() -> dict[str, Any]:
        async with database.read() as conn:
            return await compute_stats(conn)

    return compute


class DashboardCache:
    """Cached dashboard aggregates with single-flight recomputation (module docstring).

    ``computations`` counts how often this instance ran ``compute``.
    """

    def __init__(
        self,
        redis: RedisClient,
        compute: Callable[[], Awaitable[dict[str, Any]]],
        ttl_seconds: int,
        *,
        key: str = DASHBOARD_KEY,
        lock_seconds: float = 30.0,
        wait_seconds: float = 10.0,
        poll_seconds: float = 0.05,
    ) -> None:
        self._redis = redis
        self._compute = compute
        self.ttl_seconds = ttl_seconds
        self.key = key
        self.lock_key = f"{key}:lock"
        self.version_key = f"{key}:version"
        self._lock_ms = int(lock_seconds * 1000)
        self._wait = wait_seconds
        self._poll = poll_seconds
        self._release = redis.register_script(_RELEASE)
        self._store = redis.register_script(_STORE)
        self.computations = 0

    async def get(self) -> tuple[dict[str, Any], bool]:
        """The aggregates and whether they came from the cache.

        Blocks at most ``wait_seconds`` (plus one computation) while another caller
        computes. Raises only what ``compute`` raises (PostgreSQL unreachable).
        """
        try:
            cached = await self._redis.get(self.key)
            if cached is not None:
                return orjson.loads(cached), True
            deadline = time.monotonic() + self._wait
            token = uuid.uuid4().hex
            while time.monotonic() < deadline:
                if await self._redis.set(self.lock_key, token, nx=True, px=self._lock_ms):
                    try:
                        cached = await self._redis.get(self.key)  # filled while we took the lock
                        if cached is not None:
                            return orjson.loads(cached), True
                        return await self._compute_and_store(), False
                    finally:
                        await self._release(keys=[self.lock_key], args=[token])
                await asyncio.sleep(self._poll)
                cached = await self._redis.get(self.key)
                if cached is not None:
                    return orjson.loads(cached), True
            log.warning("dashboard cache: waited too long for another caller, computing", key=self.key)
            return await self._compute_and_store(), False
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("dashboard cache: Redis unreachable, computing without it", error=type(exc).__name__)
            self.computations += 1
            return await self._compute(), False

    async def refresh(self) -> dict[str, Any]:
        """Recomputes now and replaces the cached value (TTL starts again)."""
        return await self._compute_and_store()

    async def _compute_and_store(self) -> dict[str, Any]:
        version = await self._redis.get(self.version_key) or b""
        self.computations += 1
        stats = await self._compute()
        await self._store(keys=[self.key, self.version_key], args=[version, orjson.dumps(stats), self.ttl_seconds])
        return stats


async def invalidate(client: RedisClient, key: str = DASHBOARD_KEY) -> bool:
    """Drops the cached aggregates after a write that changes them, so the next caller
    computes them afresh; False (logged) when Redis did not answer, in which case the
    cached value lives out its TTL."""
    try:
        async with client.pipeline(transaction=True) as pipe:
            pipe.incr(f"{key}:version")
            pipe.expire(f"{key}:version", VERSION_SECONDS)
            pipe.delete(key)
            await pipe.execute()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        log.warning("dashboard cache not invalidated: Redis unreachable", error=type(exc).__name__)
        return False
    return True


async def invalidate_for(settings: Settings) -> bool:
    """:func:`invalidate` through a client of its own on ``FLEET_REDIS_URL``, with this
    deployment's key; for a command that wrote once."""
    client = connect_redis(settings.redis_url)
    try:
        return await invalidate(client, settings.redis_keys.dashboard)
    finally:
        await client.aclose()
