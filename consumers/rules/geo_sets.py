"""The Redis GEO sets ``geofence:{id}``: the vehicles inside each active geofence.

Best effort: PostgreSQL holds the truth (``vehicle_geofence_state``). A Redis that does
not answer leaves the sets behind, never fails a batch; any other Redis error is raised.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

import structlog

from fleet_telemetry.consumers.rules.transitions import Transition
from fleet_telemetry.core.redis_client import RedisClient
from fleet_telemetry.core.redis_keys import NO_PREFIX, RedisKeys
from fleet_telemetry.core.retry import is_transient

log = structlog.get_logger("fleet.rules")


def geofence_key(geofence_id: int, keys: RedisKeys = NO_PREFIX) -> str:
    """The Redis GEO set of the vehicles inside a geofence (schema/README.md)."""
    return keys.geofence(geofence_id)


async def update_members(redis: RedisClient, transitions: Iterable[Transition],
                         keys: RedisKeys = NO_PREFIX) -> None:
    """GEOADD on a confirmed enter, ZREM on a confirmed exit (interpolated crossings are
    not memberships); the last transition per vehicle and fence wins. A Redis that does
    not answer is logged and skipped."""
    final: dict[tuple[int, UUID], Transition] = {}
    for t in transitions:
        if not t.crossing:
            final[(t.geofence_id, t.vehicle_id)] = t
    if not final:
        return
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for (fid, vid), t in final.items():
                if t.kind == "enter":
                    pipe.geoadd(keys.geofence(fid), (t.lon, t.lat, str(vid)))
                else:
                    pipe.zrem(keys.geofence(fid), str(vid))
            await pipe.execute()
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("redis unreachable, geofence members not updated", error=type(exc).__name__)


async def drop_sets(redis: RedisClient, geofence_ids: Iterable[int], keys: RedisKeys = NO_PREFIX) -> bool:
    """Deletes the sets of geofences no longer active; False if Redis did not answer."""
    names = [keys.geofence(fid) for fid in geofence_ids]
    if not names:
        return True
    try:
        await redis.delete(*names)
    except Exception as exc:
        if not is_transient(exc):
            raise
        return False
    return True
