"""The rule engine's timers: the geofence refresh, the offline check and the
maintenance check, with their SQL, and the loop that runs them.

The checks are set-based statements that work for every worker at once; two workers
running them together raise each alert once (``alerts_one_open``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg
import structlog

from fleet_telemetry.consumers.rules.geometry import InvalidGeofence, make_geofence
from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.model import MAINTENANCE_DUE, OFFLINE, SEVERITY
from fleet_telemetry.consumers.rules.wkb import polygons_from_wkb
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.retry import Backoff, retry

log = structlog.get_logger("fleet.rules")

_RAISE_OFFLINE = """
INSERT INTO alerts (entity_id, type, severity, reading_time, details)
SELECT s.vehicle_id, 'offline', $2, s.last_time,
       jsonb_build_object('last_seen', s.last_time, 'silent_seconds_threshold', $1::float8)
FROM vehicle_rule_state AS s
JOIN vehicles AS v ON v.id = s.vehicle_id AND v.deleted_at IS NULL
WHERE s.last_time < now() - make_interval(secs => $1::float8)
  AND NOT EXISTS (SELECT 1 FROM alerts a
                  WHERE a.entity_id = s.vehicle_id AND a.type = 'offline' AND NOT a.is_resolved)
ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved AND type <> 'document_expiring' DO NOTHING
RETURNING type
"""
# A reading newer than the alert that was committed while the timer raised it.
_RESOLVE_OFFLINE_RACE = """
UPDATE alerts AS a
SET is_resolved = true, resolved_at = now(), details = a.details || jsonb_build_object('back_at', s.last_time)
FROM vehicle_rule_state AS s
WHERE a.type = 'offline' AND NOT a.is_resolved AND s.vehicle_id = a.entity_id
  AND s.last_time > a.reading_time AND s.last_time >= now() - make_interval(secs => $1::float8)
RETURNING a.type
"""
_DUE = """
SELECT t.vehicle_id, max(s.last_time) AS last_time, max(coalesce(ms.odometer_km, s.odometer_km)) AS odometer_km,
       jsonb_agg(jsonb_build_object('schedule_id', t.schedule_id, 'schedule', m.name,
                                    'next_due_km', t.next_due_km, 'next_due_date', t.next_due_date)
                 ORDER BY m.name) AS due
FROM maintenance_triggers AS t
JOIN maintenance_schedules AS m ON m.id = t.schedule_id
JOIN vehicles AS v ON v.id = t.vehicle_id AND v.deleted_at IS NULL
LEFT JOIN vehicle_rule_state AS s ON s.vehicle_id = t.vehicle_id
-- The odometer accumulator (the device's, else summed from the positions); the rules' last
-- reported odometer where the trips stage does not run.
LEFT JOIN vehicle_motion_state AS ms ON ms.vehicle_id = t.vehicle_id
WHERE t.is_active
  AND (t.next_due_date <= current_date
       OR (t.next_due_km IS NOT NULL AND coalesce(ms.odometer_km, s.odometer_km) >= t.next_due_km))
GROUP BY t.vehicle_id
"""
_RAISE_DUE = f"""
WITH due AS ({_DUE})
INSERT INTO alerts (entity_id, type, severity, reading_time, details)
SELECT vehicle_id, 'maintenance_due', $1, last_time, jsonb_build_object('odometer_km', odometer_km, 'due', due)
FROM due
WHERE NOT EXISTS (SELECT 1 FROM alerts a
                  WHERE a.entity_id = due.vehicle_id AND a.type = 'maintenance_due' AND NOT a.is_resolved)
ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved AND type <> 'document_expiring' DO NOTHING
RETURNING type
"""
_RESOLVE_DUE = f"""
WITH due AS ({_DUE})
UPDATE alerts AS a
SET is_resolved = true, resolved_at = now()
WHERE a.type = 'maintenance_due' AND NOT a.is_resolved
  AND NOT EXISTS (SELECT 1 FROM due WHERE due.vehicle_id = a.entity_id)
RETURNING a.type
"""
_FENCES_VERSION = "SELECT count(*) AS n, max(updated_at) AS changed FROM geofences"
_LOAD_FENCES = """
SELECT id, name, kind, ST_AsBinary(area) AS area, ST_X(center) AS lon, ST_Y(center) AS lat, radius_m,
       speed_limit_kmh, dwell_seconds
FROM geofences WHERE is_active AND deleted_at IS NULL
"""


async def geofences_version(conn: asyncpg.Connection) -> tuple[int, datetime | None]:
    """Changes whenever a geofence is added, changed or removed."""
    row = await conn.fetchrow(_FENCES_VERSION)
    return (row["n"], row["changed"])


async def load_index(conn: asyncpg.Connection) -> GeofenceIndex:
    """The active geofences, indexed. A row that cannot be used is logged and skipped."""
    fences = []
    for row in await conn.fetch(_LOAD_FENCES):
        try:
            fences.append(make_geofence(
                row["id"], row["name"], row["kind"],
                polygons=None if row["area"] is None else polygons_from_wkb(bytes(row["area"])),
                center=None if row["lon"] is None else (row["lon"], row["lat"]), radius_m=row["radius_m"],
                speed_limit_kmh=row["speed_limit_kmh"], dwell_seconds=row["dwell_seconds"],
            ))
        except InvalidGeofence as exc:
            log.warning("geofence skipped", geofence_id=row["id"], reason=str(exc))
    return GeofenceIndex(fences)


async def check_offline(pool: asyncpg.Pool, offline_seconds: float, metrics: PipelineMetrics) -> None:
    """Raises ``offline`` for vehicles silent for longer than ``offline_seconds`` (wall
    clock), and resolves those raised while a newer reading was being committed."""
    async with pool.acquire() as conn:
        raised = await conn.fetch(_RAISE_OFFLINE, offline_seconds, SEVERITY[OFFLINE])
        resolved = await conn.fetch(_RESOLVE_OFFLINE_RACE, offline_seconds)
    _count(metrics, OFFLINE, raised, resolved)


async def check_maintenance(pool: asyncpg.Pool, metrics: PipelineMetrics) -> None:
    """Raises ``maintenance_due`` by date or odometer (the vehicle's odometer accumulator,
    ``vehicle_motion_state``); resolves it once nothing is due."""
    async with pool.acquire() as conn:
        raised = await conn.fetch(_RAISE_DUE, SEVERITY[MAINTENANCE_DUE])
        resolved = await conn.fetch(_RESOLVE_DUE)
    _count(metrics, MAINTENANCE_DUE, raised, resolved)


def _count(metrics: PipelineMetrics, kind: str, raised: list[asyncpg.Record], resolved: list[asyncpg.Record]) -> None:
    metrics.alerts.labels(type=kind, action="raised").inc(len(raised))
    metrics.alerts.labels(type=kind, action="resolved").inc(len(resolved))


async def run_every(seconds: float, tick: Callable[[], Awaitable[None]]) -> None:
    """Runs ``tick``, then waits ``seconds``, until cancelled.

    A tick that fails transiently (a dependency not answering) is logged and run again
    after a backoff of at most ``seconds``; any other failure is logged and raised,
    which ends the loop.
    """
    def warn(exc: BaseException, delay: float, attempt: int) -> None:
        log.warning("rule timers: dependency unavailable, will retry", error=type(exc).__name__)

    while True:
        try:
            await retry(tick, what="rule timers", backoff=Backoff(initial=seconds, maximum=seconds), on_retry=warn)
        except Exception as exc:
            log.error("rule timers failed", error=type(exc).__name__, detail=str(exc)[:300])
            raise
        await asyncio.sleep(seconds)
