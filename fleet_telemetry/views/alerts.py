"""Alerts as the rules raised them: listed, shown, and resolved by an operator.

Each vehicle alert names the driver on duty when it happened (``driver_id``, filled by
the database when the alert is inserted; None without an ACTIVE assignment then).

Resolving by hand sets ``is_resolved`` and ``resolved_at``, merges ``resolved_by``,
``resolved_because`` (``"resolved by an operator"``) and the note into ``details``, and
writes an ``audit_logs`` row (``alert.resolve``, before and after) in the same
transaction. The rules keep their own memory of what they raised: an alert resolved by
hand while its condition still holds is raised again only once the condition has
cleared and come back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops import audit
from fleet_telemetry.fleetops.access import requires
from fleet_telemetry.fleetops.errors import Conflict, NotFound

_SELECT = """
SELECT a.id, a.entity_id AS vehicle_id, v.license_plate, v.vin, a.driver_id, d.name AS driver, a.type, a.severity,
       a.geofence_id, g.name AS geofence, a.reading_time, a.raised_at, a.resolved_at, a.is_resolved, a.details
FROM alerts AS a
LEFT JOIN vehicles AS v ON v.id = a.entity_id
LEFT JOIN drivers AS d ON d.id = a.driver_id
LEFT JOIN geofences AS g ON g.id = a.geofence_id
"""
# A vehicle's alerts use alerts_entity_idx, a driver's alerts_driver_idx, open ones the
# partial alerts_open_by_severity.
_LIST = _SELECT + """
WHERE ($1::bool IS NOT TRUE OR NOT a.is_resolved)
  AND ($2::uuid IS NULL OR a.entity_id = $2)
  AND ($3::text IS NULL OR a.type = $3)
  AND ($4::timestamptz IS NULL OR a.raised_at >= $4)
  AND ($6::uuid IS NULL OR a.driver_id = $6)
ORDER BY a.raised_at DESC, a.id DESC
LIMIT $5
"""
_HISTORY = """
SELECT created_at, actor, action, after -> 'details' AS details FROM audit_logs
WHERE entity_type = 'alert' AND entity_id = $1 ORDER BY created_at
"""
_RESOLVE = """
UPDATE alerts SET is_resolved = true, resolved_at = now(), details = details || $2::jsonb
WHERE id = $1
"""

RESOLVED_BY_OPERATOR = "resolved by an operator"


def _alert(row: asyncpg.Record) -> dict[str, Any]:
    return audit.snapshot(row) or {}


async def list_alerts(conn: asyncpg.Connection, *, open_only: bool = False, vehicle_id: UUID | None = None,
                      alert_type: str | None = None, since: datetime | None = None,
                      driver_id: UUID | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Alerts, newest first: only the open ones, one vehicle's, one type, raised since,
    with one driver on duty."""
    rows = await conn.fetch(_LIST, open_only, vehicle_id, alert_type, since, limit, driver_id)
    return [_alert(r) for r in rows]


async def get_alert(conn: asyncpg.Connection, alert_id: int) -> dict[str, Any]:
    """One alert with its vehicle, geofence and what operators did to it; raises NotFound."""
    row = await conn.fetchrow(_SELECT + " WHERE a.id = $1", alert_id)
    if row is None:
        raise NotFound(f"no alert with id {alert_id} (see 'fleet alerts list')")
    shown = _alert(row)
    shown["history"] = [audit.snapshot(r) for r in await conn.fetch(_HISTORY, str(alert_id))]
    return shown


@requires("alerts:resolve")
async def resolve_alert(conn: asyncpg.Connection, *, actor: str, alert_id: int,
                        note: str | None = None) -> dict[str, Any]:
    """Resolves an open alert with its audit row (one transaction); returns the alert.

    Raises NotFound, and Conflict when it is resolved already.
    """
    async with conn.transaction():
        before = await conn.fetchrow("SELECT * FROM alerts WHERE id = $1 FOR UPDATE", alert_id)
        if before is None:
            raise NotFound(f"no alert with id {alert_id} (see 'fleet alerts list')")
        if before["is_resolved"]:
            when = before["resolved_at"].isoformat() if before["resolved_at"] else "before"
            raise Conflict(f"alert {alert_id} was resolved already ({when})")
        merged: dict[str, Any] = {"resolved_by": actor, "resolved_because": RESOLVED_BY_OPERATOR}
        if note:
            merged["note"] = note
        await conn.execute(_RESOLVE, alert_id, merged)
        after = await conn.fetchrow("SELECT * FROM alerts WHERE id = $1", alert_id)
        await audit.record(conn, actor=actor, action="alert.resolve", entity_type="alert", entity_id=str(alert_id),
                           before=audit.snapshot(before), after=audit.snapshot(after))
    return await get_alert(conn, alert_id)
