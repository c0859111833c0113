"""One vehicle at a glance: its live status in Redis and what PostgreSQL knows of it now.

Redis answers for the live status (``vehicle:{id}:status`` under
``FLEET_REDIS_KEY_PREFIX``; absent once it expired); PostgreSQL for the last stored
position, the assignment and driver on duty, the open alerts, the last reading and the
odometer. A Redis that does not answer leaves ``live`` empty with a note, never fails.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.core.redis_client import RedisClient
from fleet_telemetry.core.redis_keys import RedisKeys
from fleet_telemetry.core.retry import is_transient
from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.views.alerts import list_alerts

_VEHICLE = "SELECT id, vin, license_plate, make, model, type, status, deleted_at FROM vehicles WHERE id = $1"
_POSITION = """
SELECT time, ST_Y(location) AS lat, ST_X(location) AS lon, speed, updated_at
FROM vehicle_positions WHERE vehicle_id = $1
"""
_ON_DUTY = """
SELECT a.id AS assignment_id, a.start_time, a.end_time, d.id AS driver_id, d.name AS driver,
       d.license_number
FROM vehicle_assignments AS a JOIN drivers AS d ON d.id = a.driver_id
WHERE a.vehicle_id = $1 AND a.status = 'ACTIVE' AND a.start_time <= now()
  AND (a.end_time IS NULL OR a.end_time > now())
ORDER BY a.start_time DESC LIMIT 1
"""
# The newest reading: a backward scan of vehicle_telemetry_vehicle_time_key.
_LAST_READING = """
SELECT time, odometer_km FROM vehicle_telemetry WHERE vehicle_id = $1 ORDER BY time DESC LIMIT 1
"""
# The odometer accumulator (trips stage), else the rules' last reported odometer.
_RULE_STATE = """
SELECT coalesce((SELECT m.odometer_km FROM vehicle_motion_state AS m WHERE m.vehicle_id = $1),
                (SELECT r.odometer_km FROM vehicle_rule_state AS r WHERE r.vehicle_id = $1)) AS odometer_km
"""
_NUMBERS = ("lat", "lon", "speed", "fuel_level", "heading")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def live_status(redis: RedisClient, keys: RedisKeys, vehicle_id: UUID) -> dict[str, Any] | None:
    """The Redis status hash as typed fields; None when there is none (expired, never
    written). Raises Redis connection errors."""
    raw = await redis.hgetall(keys.vehicle_status(vehicle_id))  # type: ignore[misc]
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return {name: float(value) if name in _NUMBERS else value for name, value in fields.items()}


async def vehicle_status(conn: asyncpg.Connection, redis: RedisClient, keys: RedisKeys,
                         vehicle_id: UUID) -> dict[str, Any]:
    """Everything ``fleet vehicles status`` shows, JSON-ready. Raises asyncpg errors; a
    Redis that does not answer is reported in ``live_note``."""
    vehicle = snapshot(await conn.fetchrow(_VEHICLE, vehicle_id)) or {"id": str(vehicle_id)}
    note = None
    try:
        live = await live_status(redis, keys, vehicle_id)
        if live is None:
            note = f"no live status in Redis ({keys.vehicle_status(vehicle_id)}: none, or expired)"
    except Exception as exc:
        if not is_transient(exc):
            raise
        live, note = None, f"Redis not answering ({type(exc).__name__})"
    last = await conn.fetchrow(_LAST_READING, vehicle_id)
    rules = await conn.fetchrow(_RULE_STATE, vehicle_id)
    odometer = last["odometer_km"] if last is not None and last["odometer_km"] is not None else (
        rules["odometer_km"] if rules is not None else None)
    if odometer is not None:
        odometer = round(odometer, 3)
    return {
        "vehicle": vehicle,
        "live": live,
        "live_note": note,
        "position": snapshot(await conn.fetchrow(_POSITION, vehicle_id)),
        "on_duty": snapshot(await conn.fetchrow(_ON_DUTY, vehicle_id)),
        "open_alerts": await list_alerts(conn, open_only=True, vehicle_id=vehicle_id),
        "last_reading_time": last["time"].isoformat() if last is not None else None,
        "odometer_km": odometer,
    }
