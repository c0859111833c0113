"""Live vehicle status in Redis: ``vehicle:{id}:status`` hashes (CONTRACT.md, "Redis keys").

One update per vehicle per batch, from its newest reading. Each update is a Lua script,
so it is atomic, and it compares event times first: an older reading that arrives late
never overwrites a newer status, and only a newer reading renews the TTL. Because the
comparison makes updates idempotent, the consumer also feeds duplicates through here:
a status lost to a crash between the PostgreSQL commit and the Redis write is restored
by the redelivery.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from uuid import UUID

import asyncpg
import redis.asyncio as aioredis

from ingest.reading import Reading, status_time

# KEYS[1] status key; ARGV[1] event time (fixed-width RFC 3339, so text order is time
# order); ARGV[2] TTL seconds; ARGV[3..] field/value pairs, an empty value deletes.
_UPDATE_STATUS = """
local current = redis.call('HGET', KEYS[1], 'time')
if current and current >= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'time', ARGV[1])
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

_ACTIVE_DRIVERS = """
SELECT DISTINCT ON (vehicle_id) vehicle_id, driver_id
FROM vehicle_assignments
WHERE status = 'ACTIVE' AND vehicle_id = ANY($1::uuid[])
  AND start_time <= now() AND (end_time IS NULL OR end_time > now())
ORDER BY vehicle_id, start_time DESC
"""


def status_key(vehicle_id: UUID | str) -> str:
    return f"vehicle:{vehicle_id}:status"


def newest_per_vehicle(readings: Iterable[Reading]) -> dict[UUID, Reading]:
    newest: dict[UUID, Reading] = {}
    for reading in readings:
        current = newest.get(reading.vehicle_id)
        if current is None or reading.time > current.time:
            newest[reading.vehicle_id] = reading
    return newest


def _text(value: float | None) -> str:
    return "" if value is None else repr(value)


class StatusWriter:
    """Writes the newest status of each vehicle of a batch to Redis."""

    def __init__(self, redis: aioredis.Redis, pool: asyncpg.Pool, ttl_seconds: int = 300) -> None:
        self._redis = redis
        self._pool = pool
        self._ttl = ttl_seconds
        self._script = redis.register_script(_UPDATE_STATUS)

    async def active_drivers(self, vehicle_ids: list[UUID]) -> dict[UUID, UUID]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_ACTIVE_DRIVERS, vehicle_ids)
        return {row["vehicle_id"]: row["driver_id"] for row in rows}

    async def update(self, newest: dict[UUID, Reading]) -> int:
        """Apply one update per vehicle; returns how many statuses moved forward.

        Raises redis connection errors; the caller counts them and goes on.
        """
        if not newest:
            return 0
        drivers = await self.active_drivers(list(newest))
        updated_at = status_time(datetime.now(timezone.utc))
        async with self._redis.pipeline(transaction=False) as pipe:
            for vehicle_id, r in newest.items():
                driver = drivers.get(vehicle_id)
                await self._script(
                    keys=[status_key(vehicle_id)],
                    args=[
                        status_time(r.time), self._ttl,
                        "lat", repr(r.lat), "lon", repr(r.lon),
                        "speed", _text(r.speed), "fuel_level", _text(r.fuel_level),
                        "heading", _text(r.heading),
                        "driver_id", "" if driver is None else str(driver),
                        "updated_at", updated_at,
                    ],
                    client=pipe,
                )
            results = await pipe.execute()
        return sum(1 for result in results if result == 1)
