"""Writing what a batch decided: geofence transitions and alert rows, set-based.

- **No spam by construction.** An alert is raised with ``INSERT ... ON CONFLICT DO
  NOTHING`` against ``alerts_one_open``: at most one open alert per vehicle, type and
  geofence, whoever raises it. Transitions have a unique identity too.
- **Nothing for a removed geofence.** A transaction that names geofences first holds
  the active ones (:func:`lock_live_geofences`); no state, transition, raise or update
  is written for the others, whatever a worker's index still holds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from fleet_telemetry.consumers.rules.alert_rows import inserted_details, plan_alert_rows, resolved_details
from fleet_telemetry.consumers.rules.model import SEVERITY, AlertAction, Evaluation
from fleet_telemetry.consumers.rules.transitions import Transition
from fleet_telemetry.core.metrics import PipelineMetrics

# FOR KEY SHARE: a removal (rules/geofences.py, FOR UPDATE) waits for the transaction that
# holds these rows; one that committed first leaves them out (READ COMMITTED re-checks the
# row it waited for). The fence states, transitions and raises after it are written only
# for the rows returned. Locking in id order keeps two such transactions from deadlocking.
_LOCK_LIVE = """
SELECT id FROM geofences WHERE id = ANY($1::int8[]) AND is_active AND deleted_at IS NULL
ORDER BY id FOR KEY SHARE
"""
_INSERT_TRANSITIONS = """
INSERT INTO geofence_transitions (vehicle_id, geofence_id, kind, time, lat, lon, crossing)
SELECT u.* FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::timestamptz[], $5::float8[], $6::float8[],
                       $7::bool[]) AS u(v, f, kind, t, lat, lon, crossing)
WHERE EXISTS (SELECT 1 FROM geofences g WHERE g.id = u.f AND g.is_active AND g.deleted_at IS NULL)
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
WHERE f IS NULL OR EXISTS (SELECT 1 FROM geofences g WHERE g.id = u.f AND g.is_active AND g.deleted_at IS NULL)
ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved AND type <> 'document_expiring' DO NOTHING
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
        for (kind, action), n in Counter(self.alerts).items():
            metrics.alerts.labels(type=kind, action=action).inc(n)
        for kind, n in Counter(self.transitions).items():
            metrics.geofence_transitions.labels(kind=kind).inc(n)


async def lock_live_geofences(conn: asyncpg.Connection, ids: set[int]) -> set[int]:
    """Those of ``ids`` still active, held until the caller's transaction ends (see
    :data:`_LOCK_LIVE`): call it before any other statement of the transaction. Blocks
    while a removal of one of them is in progress; raises asyncpg errors."""
    if not ids:
        return set()
    return {r["id"] for r in await conn.fetch(_LOCK_LIVE, sorted(ids))}


def geofences_named(result: Evaluation) -> set[int]:
    """The geofences a batch's transitions and alert actions name."""
    ids = {t.geofence_id for t in result.transitions}
    ids.update(a.geofence_id for a in result.actions if a.geofence_id is not None)
    return ids


async def write_outcome(conn: asyncpg.Connection, result: Evaluation, gone: set[int]) -> Written:
    """Writes a batch's transitions and alert rows on ``conn`` (inside the caller's
    transaction, which commits them), leaving out the transitions, raises and updates of
    the geofences ``gone`` (removed: their alerts are resolved already). Raises asyncpg errors."""
    written = Written()
    transitions = [t for t in result.transitions if t.geofence_id not in gone]
    if transitions:
        written.transitions = await _write_transitions(conn, transitions)
    actions = [a for a in result.actions if a.action == "resolve" or a.geofence_id not in gone]
    await _write_alerts(conn, actions, written)
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
