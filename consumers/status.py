"""Live vehicle status in Redis: ``vehicle:{id}:status`` hashes (docs/interface.md, "Redis keys").

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
import orjson
import redis.asyncio as aioredis

from fleet_telemetry.core.reading import Reading, status_time
from fleet_telemetry.core.redis_keys import NO_PREFIX, RedisKeys

# One call updates a chunk of vehicles. KEYS: per vehicle, its status key and its
# newest-time key; ARGV[1]: the status TTL; ARGV[2]: how long the newest time is kept;
# ARGV[i + 2]: a JSON array of the fields of FIELDS for vehicle i, "" for a field to
# remove. `time` is fixed-width RFC 3339, so text order is time order. A status only
# moves forward, and only a newer reading renews its TTL. The newest time outlives the
# status (FLEET_RAW_RETENTION_DAYS), so a late or replayed reading cannot bring back an
# older status once the status itself has expired.
FIELDS = ("time", "lat", "lon", "speed", "fuel_level", "heading", "driver_id", "updated_at")
_UPDATE_STATUSES = """
local names = {'time', 'lat', 'lon', 'speed', 'fuel_level', 'heading', 'driver_id', 'updated_at'}
local moved = 0
for i = 1, #KEYS, 2 do
  local key, newest_key = KEYS[i], KEYS[i + 1]
  local v = cjson.decode(ARGV[(i + 1) / 2 + 2])
  local current = redis.call('HGET', key, 'time')
  local newest = redis.call('GET', newest_key)
  if newest and ((not current) or current < newest) then current = newest end
  if (not current) or current < v[1] then
    local set, del = {}, {}
    for j = 1, #names do
      if v[j] == '' then
        del[#del + 1] = names[j]
      else
        set[#set + 1] = names[j]
        set[#set + 1] = v[j]
      end
    end
    redis.call('HSET', key, unpack(set))
    if #del > 0 then redis.call('HDEL', key, unpack(del)) end
    redis.call('EXPIRE', key, ARGV[1])
    redis.call('SET', newest_key, v[1], 'EX', ARGV[2])
    moved = moved + 1
  end
end
return moved
"""
_CHUNK = 500  # vehicles per script call: bounded script run time, few round trips

_ACTIVE_DRIVERS = """
SELECT DISTINCT ON (vehicle_id) vehicle_id, driver_id
FROM vehicle_assignments
WHERE status = 'ACTIVE' AND vehicle_id = ANY($1::uuid[])
  AND start_time <= now() AND (end_time IS NULL OR end_time > now())
ORDER BY vehicle_id, start_time DESC
"""


def status_key(vehicle_id: UUID | str, keys: RedisKeys = NO_PREFIX) -> str:
    return keys.vehicle_status(vehicle_id)


def newest_key(vehicle_id: UUID | str, keys: RedisKeys = NO_PREFIX) -> str:
    """The time of the newest status ever written for the vehicle (kept longer than the status)."""
    return keys.vehicle_newest(vehicle_id)


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
    """Writes the newest status of each vehicle of a batch to Redis.

    Updates go in script calls of up to 500 vehicles, all sent in one round trip. A
    script call touches several keys, which a standalone Redis (or Sentinel) allows; a
    Redis Cluster would need the keys in one hash slot.
    """

    def __init__(self, redis: aioredis.Redis, pool: asyncpg.Pool, ttl_seconds: int = 300,
                 newest_seconds: int = 30 * 86_400, keys: RedisKeys = NO_PREFIX) -> None:
        self._redis = redis
        self._keys = keys
        self._pool = pool
        self._ttl = ttl_seconds
        self._newest_ttl = max(newest_seconds, ttl_seconds)
        self._script = redis.register_script(_UPDATE_STATUSES)

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
        keys: list[str] = []
        values: list[bytes] = []
        for vehicle_id, r in newest.items():
            driver = drivers.get(vehicle_id)
            keys += (self._keys.vehicle_status(vehicle_id), self._keys.vehicle_newest(vehicle_id))
            values.append(orjson.dumps([
                status_time(r.time), repr(r.lat), repr(r.lon), _text(r.speed), _text(r.fuel_level),
                _text(r.heading), "" if driver is None else str(driver), updated_at,
            ]))
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(values), _CHUNK):
                await self._script(keys=keys[2 * i:2 * (i + _CHUNK)],
                                   args=[self._ttl, self._newest_ttl, *values[i:i + _CHUNK]], client=pipe)
            results = await pipe.execute()
        return int(sum(results))
