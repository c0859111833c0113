"""The vehicles' rule states: a worker's cache of them, and their rows in PostgreSQL
(``vehicle_rule_state``, ``vehicle_geofence_state``) under optimistic concurrency.

- **Idempotent under redelivery and rebalancing.** A state row is updated only if it
  still holds the ``last_time`` this worker read; otherwise :class:`StateConflict` is
  raised, the transaction rolls back and the vehicles concerned are forgotten, to be
  read again.
- **Nothing for a removed geofence.** Every transaction that names geofences holds the
  active ones first and writes nothing for the others (:mod:`.outcome`).
- **Nothing stored goes unevaluated.** Readings stored but never evaluated (a crash
  between the two commits, or states not written yet) are picked up from
  ``vehicle_telemetry`` when the vehicle's state is next loaded.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.model import Evaluation, VehicleState
from fleet_telemetry.consumers.rules.outcome import Written, geofences_named, lock_live_geofences, write_outcome
from fleet_telemetry.consumers.rules.transitions import FenceState, Position
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.reading import Reading, Source

log = structlog.get_logger("fleet.rules")

# How far back readings stored but never evaluated are picked up.
CATCH_UP = timedelta(hours=1)

_LOAD_STATES = """
SELECT vehicle_id, last_time, lat, lon, odometer_km, memory
FROM vehicle_rule_state WHERE vehicle_id = ANY($1::uuid[])
"""
_LOAD_FENCE_STATES = """
SELECT vehicle_id, geofence_id, inside, since, pending_since, pending_lat, pending_lon,
       speeding_since, speeding_max, speeding_open
FROM vehicle_geofence_state WHERE vehicle_id = ANY($1::uuid[])
"""
_CATCH_UP = """
SELECT u.v AS vehicle_id, t.time, ST_Y(t.location) AS lat, ST_X(t.location) AS lon, t.speed, t.fuel_level,
       t.heading, t.odometer_km, t.engine_status
FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS u(v, after, before)
CROSS JOIN LATERAL (
    SELECT * FROM vehicle_telemetry
    WHERE vehicle_id = u.v AND time > u.after AND time < u.before AND time >= $4::timestamptz
    ORDER BY time DESC LIMIT 500
) AS t
"""
_UPDATE_STATES = """
UPDATE vehicle_rule_state AS s
SET last_time = u.t, lat = u.lat, lon = u.lon, odometer_km = u.odo, memory = u.memory, updated_at = now()
FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::float8[], $5::float8[], $6::float8[],
            $7::jsonb[]) AS u(v, expected, t, lat, lon, odo, memory)
WHERE s.vehicle_id = u.v AND s.last_time = u.expected
RETURNING s.vehicle_id
"""
_INSERT_STATES = """
INSERT INTO vehicle_rule_state (vehicle_id, last_time, lat, lon, odometer_km, memory)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::float8[], $4::float8[], $5::float8[], $6::jsonb[])
ON CONFLICT (vehicle_id) DO NOTHING
RETURNING vehicle_id
"""
# The vehicles' geofence rows replaced in one statement: the rows named in the arrays are
# upserted (for active geofences only), the vehicles' other rows deleted (the two never
# touch the same row).
_REPLACE_FENCE_STATES = """
WITH u AS (
    SELECT u.* FROM unnest($2::uuid[], $3::int8[], $4::bool[], $5::timestamptz[], $6::timestamptz[], $7::float8[],
                           $8::float8[], $9::timestamptz[], $10::float8[], $11::bool[])
           AS u(v, f, inside, since, ps, plat, plon, ss, smax, sopen)
    WHERE EXISTS (SELECT 1 FROM geofences g WHERE g.id = u.f AND g.is_active AND g.deleted_at IS NULL)
), gone AS (
    DELETE FROM vehicle_geofence_state AS s
    WHERE s.vehicle_id = ANY($1::uuid[])
      AND NOT EXISTS (SELECT 1 FROM u WHERE u.v = s.vehicle_id AND u.f = s.geofence_id)
)
INSERT INTO vehicle_geofence_state (vehicle_id, geofence_id, inside, since, pending_since, pending_lat,
                                    pending_lon, speeding_since, speeding_max, speeding_open)
SELECT * FROM u
ON CONFLICT (vehicle_id, geofence_id) DO UPDATE
SET inside = excluded.inside, since = excluded.since, pending_since = excluded.pending_since,
    pending_lat = excluded.pending_lat, pending_lon = excluded.pending_lon, speeding_since = excluded.speeding_since,
    speeding_max = excluded.speeding_max, speeding_open = excluded.speeding_open, updated_at = now()
"""


class StateConflict(Exception):
    """Another worker changed these vehicles' state rows since this worker read them."""

    def __init__(self, vehicles: set[UUID]) -> None:
        super().__init__(f"{len(vehicles)} vehicle states changed under us")
        self.vehicles = vehicles


class StateStore:
    """The rule states of the vehicles one worker evaluates, and their rows.

    ``states`` holds every vehicle this worker evaluated, as it stands after its last
    batch; ``dirty`` the vehicles whose state was advanced but not written yet.
    """

    def __init__(self, pool: asyncpg.Pool, metrics: PipelineMetrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self.states: dict[UUID, VehicleState] = {}
        self._persisted: dict[UUID, datetime | None] = {}
        """``vehicle_rule_state.last_time`` as this worker last read or wrote it (None: no row)."""
        self._unwritten: set[UUID] = set()
        """The vehicles of ``_persisted`` without a row."""
        self.dirty: set[UUID] = set()
        self._fences_dirty: set[UUID] = set()

    def unwritten(self, vehicles: Collection[UUID]) -> set[UUID]:
        """Those of ``vehicles`` that have no state row yet."""
        if not self._unwritten:
            return set()
        return {vid for vid in self._unwritten if vid in vehicles}

    def forget(self, vehicles: Iterable[UUID]) -> None:
        """Drops the cached states of ``vehicles``: they are read again when next needed."""
        for vid in vehicles:
            self.states.pop(vid, None)
            self._persisted.pop(vid, None)
            self._unwritten.discard(vid)
            self.dirty.discard(vid)
            self._fences_dirty.discard(vid)

    async def load(
        self, vehicles: list[UUID], groups: dict[UUID, list[Reading]], index: GeofenceIndex
    ) -> list[Reading]:
        """Reads the states of ``vehicles`` into the cache (a fresh state for a vehicle
        without a row); returns the readings stored but not evaluated before those of
        ``groups``, to evaluate with them. Raises asyncpg errors."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_LOAD_STATES, vehicles)
            fences = _fence_states(await conn.fetch(_LOAD_FENCE_STATES, vehicles))
            for vid in vehicles:
                self.states[vid] = VehicleState()
                self._persisted[vid] = None
                self._unwritten.add(vid)
            for row in rows:
                vid = row["vehicle_id"]
                self.states[vid] = _state_from_row(row, fences.get(vid, {}), index)
                self._persisted[vid] = row["last_time"]
                self._unwritten.discard(vid)
            first = {row["vehicle_id"]: min(r.time for r in groups[row["vehicle_id"]]) for row in rows}
            gaps = [(row["vehicle_id"], row["last_time"], first[row["vehicle_id"]]) for row in rows
                    if row["last_time"] < first[row["vehicle_id"]]]
            if not gaps:
                return []
            caught = await conn.fetch(
                _CATCH_UP, [g[0] for g in gaps], [g[1] for g in gaps], [g[2] for g in gaps],
                min(g[2] for g in gaps) - CATCH_UP,
            )
        if caught:
            log.info("evaluating readings stored but not evaluated before", readings=len(caught))
        source = Source("vehicle_telemetry", -1, -1)
        return [Reading(r["vehicle_id"], r["time"], r["lat"], r["lon"], r["speed"], r["fuel_level"], r["heading"],
                        r["odometer_km"], r["engine_status"], source, None, b"") for r in caught]

    async def commit(self, vehicles: set[UUID], result: Evaluation | None) -> set[int]:
        """Writes the states of ``vehicles`` and, with ``result``, the batch's transitions
        and alerts, in one transaction; the batch's other states stay ``dirty``. Returns
        the geofences they named that turned out removed: nothing was written for those.

        Raises :class:`StateConflict` (after forgetting the vehicles concerned) when
        another worker changed a state row meanwhile, and asyncpg errors; either way
        nothing was committed.
        """
        fences_changed = self._fences_dirty if result is None else result.fences_changed | self._fences_dirty
        try:
            gone = await self._write({vid: self.states[vid] for vid in vehicles}, fences_changed, result)
        except StateConflict as conflict:
            self.forget(conflict.vehicles)
            raise
        if result is not None:
            self.dirty.update(result.states)
            self._fences_dirty.update(result.fences_changed)
        for vid in vehicles:
            last = self._persisted[vid] = self.states[vid].last_time
            if last is not None:
                self._unwritten.discard(vid)
        self.dirty -= vehicles
        self._fences_dirty -= vehicles
        return gone

    async def _write(
        self, states: dict[UUID, VehicleState], fences_changed: set[UUID], result: Evaluation | None
    ) -> set[int]:
        if not states and result is None:
            return set()
        written = Written()
        changed = [vid for vid in states if vid in fences_changed]
        named = {fid for vid in changed for fid in states[vid].fences}
        if result is not None:
            named |= geofences_named(result)
        async with self._pool.acquire() as conn, conn.transaction():
            gone = named - await lock_live_geofences(conn, named)
            await self._write_states(conn, states)
            await _write_fence_states(conn, states, changed, gone)
            if result is not None:
                written = await write_outcome(conn, result, gone)
        written.count(self._metrics)
        return gone

    async def _write_states(self, conn: asyncpg.Connection, states: dict[UUID, VehicleState]) -> None:
        """Updates the rows still at the version this worker knows, inserts the new ones;
        raises :class:`StateConflict` for the others."""
        new = [vid for vid in states if self._persisted.get(vid) is None]
        old = [vid for vid in states if self._persisted.get(vid) is not None]
        written: set[UUID] = set()
        if old:
            rows_old = [states[v] for v in old]
            rows = await conn.fetch(
                _UPDATE_STATES, old, [self._persisted[v] for v in old], [s.last_time for s in rows_old],
                *_position_columns(rows_old), [_memory(s) for s in rows_old],
            )
            written.update(r["vehicle_id"] for r in rows)
        if new:
            rows_new = [states[v] for v in new]
            rows = await conn.fetch(
                _INSERT_STATES, new, [s.last_time for s in rows_new], *_position_columns(rows_new),
                [_memory(s) for s in rows_new],
            )
            written.update(r["vehicle_id"] for r in rows)
        conflicts = set(states) - written
        if conflicts:
            raise StateConflict(conflicts)


async def _write_fence_states(
    conn: asyncpg.Connection, states: dict[UUID, VehicleState], changed: list[UUID], gone: set[int]
) -> None:
    """Replaces the geofence rows of the ``changed`` vehicles (default sides, and the
    geofences ``gone``, are not stored)."""
    if not changed:
        return
    cols: list[list[Any]] = [[] for _ in range(10)]
    for vid in changed:
        vs = states[vid]
        for fid, f in vs.fences.items():
            if f.is_default() or fid in gone:
                continue
            for col, value in zip(cols, (vid, fid, f.inside, f.since or vs.last_time,
                                         f.pending_since, f.pending_lat, f.pending_lon,
                                         f.speeding_since, f.speeding_max, f.speeding_open)):
                col.append(value)
    await conn.execute(_REPLACE_FENCE_STATES, changed, *cols)


def _fence_states(rows: list[Any]) -> dict[UUID, dict[int, FenceState]]:
    fences: dict[UUID, dict[int, FenceState]] = {}
    for f in rows:
        fences.setdefault(f["vehicle_id"], {})[f["geofence_id"]] = FenceState(
            f["inside"], f["since"], f["pending_since"], f["pending_lat"], f["pending_lon"],
            f["speeding_since"], f["speeding_max"], f["speeding_open"])
    return fences


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _memory(vs: VehicleState) -> dict[str, Any]:
    """The ``memory`` column: everything but the columns of their own."""
    return {
        "pos_time": _iso(vs.position.time) if vs.position else None,
        "speeding_since": _iso(vs.speeding_since), "speeding_max": vs.speeding_max,
        "rest_fuel": vs.rest_fuel, "rest_time": _iso(vs.rest_time), "last_fuel": vs.last_fuel,
        "dtc": None if vs.dtc is None else list(vs.dtc),
        "suspect": None if vs.suspect is None else [_iso(vs.suspect[0]), vs.suspect[1], vs.suspect[2]],
        "open": sorted(vs.open),
        "last_speed": vs.last_speed,
        "harsh": None if vs.harsh_since is None else [_iso(vs.harsh_since), vs.harsh_from_kmh, vs.harsh_peak_mps2],
    }


def _state_from_row(row: Any, fences: dict[int, FenceState], index: GeofenceIndex) -> VehicleState:
    """A ``vehicle_rule_state`` row and its geofence rows as a :class:`VehicleState`."""
    m = row["memory"] or {}
    position = None
    if row["lat"] is not None and row["lon"] is not None:
        lat, lon = row["lat"], row["lon"]
        position = Position(_time(m.get("pos_time")) or row["last_time"], lat, lon, index.containing(lon, lat))
    suspect = m.get("suspect")
    harsh = m.get("harsh")
    return VehicleState(
        last_time=row["last_time"], position=position, odometer_km=row["odometer_km"],
        speeding_since=_time(m.get("speeding_since")), speeding_max=m.get("speeding_max"),
        rest_fuel=m.get("rest_fuel"), rest_time=_time(m.get("rest_time")), last_fuel=m.get("last_fuel"),
        dtc=None if m.get("dtc") is None else tuple(m["dtc"]),
        suspect=None if suspect is None else (datetime.fromisoformat(suspect[0]), suspect[1], suspect[2]),
        open=set(m.get("open") or ()), fences=fences, last_speed=m.get("last_speed"),
        harsh_since=None if harsh is None else datetime.fromisoformat(harsh[0]),
        harsh_from_kmh=None if harsh is None else harsh[1], harsh_peak_mps2=0.0 if harsh is None else harsh[2],
    )


def _position_columns(states: list[VehicleState]) -> tuple[list[float | None], list[float | None], list[float | None]]:
    return ([s.position.lat if s.position else None for s in states],
            [s.position.lon if s.position else None for s in states],
            [s.odometer_km for s in states])
