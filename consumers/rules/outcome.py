"""Writing what a batch decided: geofence transitions and alert rows, set-based.

- **No spam by construction.** An alert is raised with ``INSERT ... ON CONFLICT DO
  NOTHING`` against ``alerts_one_open``: at most one open alert per vehicle, type and
  geofence, whoever raises it. Transitions have a unique identity too.
- Rows naming a geofence that no longer exists are not written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from fleet_telemetry.consumers.rules.alert_rows import inserted_details, plan_alert_rows, resolved_details
from fleet_telemetry.consumers.rules.model import SEVERITY, AlertAction, Evaluation
from fleet_telemetry.consumers.rules.transitions import Transition
from fleet_telemetry.core.metrics import PipelineMetrics

_INSERT_TRANSITIONS = """
INSERT INTO geofence_transitions (vehicle_id, geofence_id, kind, time, lat, lon, crossing)
SELECT u.* FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::timestamptz[], $5::float8[], $6::float8[],
                       $7::bool[]) AS u(v, f, kind, t, lat, lon, crossing)
WHERE EXISTS (SELECT 1 FROM geofences g WHERE g.id = u.f)
ON CONFLICT (vehicle_id, geofence_id, time, kind) DO NOTHING
RETURNING kind
"""
_RESOLVE = """
UPDATE alerts AS a
SET is_resolved = true, resolved_at = now(), details = a.details || u.details
FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::jsonb[]) AS u(v, type, f, details)
WHERE a.entity_id = u.v AND a.type = u.type AND coalesce(a.geofence_id, 0) = u.f AND NOT a.is_resolved
RETURNING a.type
"""
_UPDATE_DETAILS = """
UPDATE alerts AS a
SET details = a.details || u.details
FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::jsonb[]) AS u(v, type, f, details)
WHERE a.entity_id = u.v AND a.type = u.type AND coalesce(a.geofence_id, 0) = u.f AND NOT a.is_resolved
"""
_RAISE = """
INSERT INTO alerts (entity_id, type, severity, geofence_id, reading_time, details, is_resolved, resolved_at)
SELECT v, type, severity, f, t, details, closed, CASE WHEN closed THEN now() END
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::timestamptz[], $6::jsonb[], $7::bool[])
     AS u(v, type, severity, f, t, details, closed)
WHERE f IS NULL OR EXISTS (SELECT 1 FROM geofences g WHERE g.id = u.f)
ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved DO NOTHING
RETURNING type, is_resolved
"""
_RESOLVE_BACK_ONLINE = """
UPDATE alerts
SET is_resolved = true, resolved_at = now(),
    details = details || jsonb_build_object('back_at', u.t)
FROM unnest($1::uuid[], $2::timestamptz[]) AS u(v, t)
WHERE entity_id = u.v AND type = 'offline' AND NOT is_resolved AND reading_time < u.t
RETURNING type
"""


@dataclass
class Written:
    """What a batch's statements changed, counted once the transaction has committed."""

    alerts: list[tuple[str, str]] = field(default_factory=list)
    """(alert type, ``raised`` or ``resolved``) per row."""
    transitions: list[str] = field(default_factory=list)
    """The kind of each transition row inserted."""

    def count(self, metrics: PipelineMetrics) -> None:
        for kind, action in self.alerts:
            metrics.alerts.labels(type=kind, action=action).inc()
        for kind in self.transitions:
            metrics.geofence_transitions.labels(kind=kind).inc()


async def write_outcome(conn: asyncpg.Connection, result: Evaluation) -> Written:
    """Writes a batch's transitions and alert rows on ``conn`` (inside the caller's
    transaction, which commits them); raises asyncpg errors."""
    written = Written()
    if result.transitions:
        written.transitions = await _write_transitions(conn, result.transitions)
    await _write_alerts(conn, result.actions, written)
    if result.back_online:
        newest = {vid: result.states[vid].last_time for vid in result.back_online}
        rows = await conn.fetch(_RESOLVE_BACK_ONLINE, list(newest), list(newest.values()))
        written.alerts.extend((r["type"], "resolved") for r in rows)
    return written


async def _write_transitions(conn: asyncpg.Connection, ts: list[Transition]) -> list[str]:
    rows = await conn.fetch(
        _INSERT_TRANSITIONS, [t.vehicle_id for t in ts], [t.geofence_id for t in ts],
        [t.kind for t in ts], [t.time for t in ts], [t.lat for t in ts], [t.lon for t in ts],
        [t.crossing for t in ts],
    )
    return [r["kind"] for r in rows]


async def _write_alerts(conn: asyncpg.Connection, actions: list[AlertAction], written: Written) -> None:
    plan = plan_alert_rows(actions)
    if plan.resolves:
        rows = await conn.fetch(_RESOLVE, *_key_columns(plan.resolves),
                                [resolved_details(a) for a in plan.resolves])
        written.alerts.extend((r["type"], "resolved") for r in rows)
    if plan.updates:
        await conn.execute(_UPDATE_DETAILS, *_key_columns(plan.updates), [a.details for a in plan.updates])
    if plan.inserts:
        raises = [opened for opened, _ in plan.inserts]
        rows = await conn.fetch(
            _RAISE, [a.vehicle_id for a in raises], [a.type for a in raises],
            [SEVERITY[a.type] for a in raises], [a.geofence_id for a in raises],
            [a.reading_time for a in raises], [inserted_details(o, c) for o, c in plan.inserts],
            [c is not None for _, c in plan.inserts],
        )
        for r in rows:
            written.alerts.append((r["type"], "raised"))
            if r["is_resolved"]:
                written.alerts.append((r["type"], "resolved"))


def _key_columns(actions: list[AlertAction]) -> tuple[list[UUID], list[str], list[int]]:
    return ([a.vehicle_id for a in actions], [a.type for a in actions], [a.geofence_id or 0 for a in actions])
