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
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from fleet_telemetry.core.reading import Reading, status_time
from fleet_telemetry.core.redis_client import RedisClient
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
    script call touches several keys, which a standalone Redis (or Sentinel) allows. On
    a Redis Cluster a script's keys must share a slot: a vehicle's two keys do (their
    hash tag is the vehicle id, :class:`~fleet_telemetry.core.redis_keys.RedisKeys`), and
    the vehicles of a batch are grouped by slot, one script call per slot, sent to every
    node at once in one pipeline.
    """

    def __init__(self, redis: RedisClient, pool: asyncpg.Pool, ttl_seconds: int = 300,
                 newest_seconds: int = 30 * 86_400, keys: RedisKeys = NO_PREFIX) -> None:
        self._redis = redis
        self._keys = keys
        self._pool = pool
        self._ttl = ttl_seconds
        self._newest_ttl = max(newest_seconds, ttl_seconds)
        self._script = redis.register_script(_UPDATE_STATUSES)
        self._cluster = redis if isinstance(redis, RedisCluster) else None

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
        if self._cluster is not None:
            return await self._update_cluster(self._cluster, keys, values)
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(values), _CHUNK):
                await self._script(keys=keys[2 * i:2 * (i + _CHUNK)],
                                   args=[self._ttl, self._newest_ttl, *values[i:i + _CHUNK]],
                                   client=pipe)  # type: ignore[arg-type]
            results = await pipe.execute()
        return int(sum(results))

    async def _update_cluster(self, cluster: RedisCluster, keys: list[str], values: list[bytes]) -> int:
        """The update on a Redis Cluster: one script call per slot (and chunk). A node
        that does not know the script yet (new, failed over) gets it and the calls are
        sent again; the script only moves statuses forward, so a repeat changes nothing."""
        by_slot: dict[int, tuple[list[str], list[bytes]]] = {}
        for i, value in enumerate(values):
            slot_keys, slot_values = by_slot.setdefault(key_slot(keys[2 * i].encode()), ([], []))
            slot_keys += keys[2 * i:2 * i + 2]
            slot_values.append(value)
        for attempt in (1, 2):
            try:
                async with cluster.pipeline(transaction=False) as pipe:
                    for slot_keys, slot_values in by_slot.values():
                        for i in range(0, len(slot_values), _CHUNK):
                            chunk = slot_keys[2 * i:2 * (i + _CHUNK)]
                            pipe.evalsha(self._script.sha, len(chunk), *chunk, self._ttl, self._newest_ttl,
                                         *slot_values[i:i + _CHUNK])
                    results = await pipe.execute()
                return int(sum(results))
            except NoScriptError:
                if attempt == 2:
                    raise
                await cluster.script_load(_UPDATE_STATUSES)
        raise AssertionError("unreachable")
