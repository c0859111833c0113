"""Trips, stops and accumulators recomputed from the raw rows, for the windows late
readings touched (``fleet maintain``) or on demand (``fleet trips rebuild``).

A vehicle is recomputed from an anchor: the start of its latest trip that began at or
before the window (its accumulators there are in the trip row, and the stop that ended
there is opened again), or, with no such trip (or one older than the raw rows kept), from
its first stored reading; trips before that, past the raw retention, stay as they are. The same
machine (:func:`~fleet_telemetry.trips.machine.advance`) runs over every raw reading
from the anchor to the vehicle's newest processed one; then, in one transaction with the
vehicle's state row locked:

- the vehicle's trips and stops from the anchor on that the run did not find are
  deleted, the ones it found are upserted (a row that came out the same is left
  untouched), and their events recorded: ids come from the facts, so an unchanged trip
  publishes no new id;
- the state row takes the machine's state, with its ``revision`` bumped: a worker that
  holds an older copy finds its next write refused, reads the row back and catches up.

No alert is raised or resolved by a recomputation (late data fires nothing live).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

import asyncpg

from fleet_telemetry.trips.machine import advance, expire, ignition_of, open_rows
from fleet_telemetry.trips.model import Changes, MotionState, MotionThresholds, StopDraft
from fleet_telemetry.trips.store import memory_of, readings_of, state_from_row, use_json, write_changes

_LOCK_STATE = """
SELECT vehicle_id, last_time, revision, odometer_km, engine_s, memory
FROM vehicle_motion_state WHERE vehicle_id = $1 FOR UPDATE
"""
_ANCHOR = """
SELECT start_time, start_odometer_km, start_engine_s FROM trips
WHERE vehicle_id = $1 AND start_time <= $2 ORDER BY start_time DESC LIMIT 1
"""
_STOP_ENDED_AT = """
SELECT start_time, ST_Y(location) AS lat, ST_X(location) AS lon, idle_s FROM stops
WHERE vehicle_id = $1 AND end_time = $2
"""
_FIRST = "SELECT min(time) FROM vehicle_telemetry WHERE vehicle_id = $1"
_BEFORE = """
SELECT time, ST_Y(location) AS lat, ST_X(location) AS lon, engine_status FROM vehicle_telemetry
WHERE vehicle_id = $1 AND time < $2 ORDER BY time DESC LIMIT 1
"""
_READINGS = """
SELECT vehicle_id, time, ST_Y(location) AS lat, ST_X(location) AS lon, speed, fuel_level, heading, odometer_km,
       engine_status
FROM vehicle_telemetry WHERE vehicle_id = $1 AND time >= $2 AND time <= $3 ORDER BY time
"""
_DELETE_TRIPS = "DELETE FROM trips WHERE vehicle_id = $1 AND start_time >= $2 AND id <> ALL($3::uuid[])"
_DELETE_STOPS = "DELETE FROM stops WHERE vehicle_id = $1 AND start_time >= $2 AND id <> ALL($3::uuid[])"
_SAVE_STATE = """
UPDATE vehicle_motion_state
SET last_time = $2, revision = revision + 1, odometer_km = $3, engine_s = $4, memory = $5, updated_at = now()
WHERE vehicle_id = $1
"""
_CLAIM = "DELETE FROM trip_dirty_hours WHERE vehicle_id = $1 RETURNING hour"
_DIRTY_VEHICLES = "SELECT vehicle_id, min(hour) AS since FROM trip_dirty_hours GROUP BY vehicle_id ORDER BY 2 LIMIT $1"
_PENDING = "SELECT count(DISTINCT vehicle_id) FROM trip_dirty_hours"
_CHUNK = 5000


@dataclass
class Recomputed:
    """What recomputing one vehicle did."""

    vehicle_id: UUID
    since: datetime | None
    """The anchor the run started from (None: nothing to recompute)."""
    readings: int = 0
    trips: int = 0
    stops: int = 0
    deleted: int = 0
    events: int = 0


async def recompute_vehicle(conn: asyncpg.Connection, vid: UUID, since: datetime, th: MotionThresholds,
                            now: datetime) -> Recomputed:
    """Recomputes one vehicle's trips, stops and accumulators from its latest trip that
    started at or before ``since`` (see the module); a vehicle silent for the gap at
    wall-clock ``now`` has its trip ended as :func:`expire_silent` does. Runs in its own
    transaction (a savepoint inside the caller's); raises asyncpg errors, having changed
    nothing."""
    async with conn.transaction():
        live_row = await conn.fetchrow(_LOCK_STATE, vid)
        if live_row is None:
            return Recomputed(vid, None)  # never processed: the workers will
        live = state_from_row(live_row)
        # The raw rows kept begin here: trips before it (past the raw retention) cannot be
        # recomputed and stay as they are, never deleted for want of their readings.
        first = await conn.fetchval(_FIRST, vid)
        if first is None:
            return Recomputed(vid, None)
        anchor = await conn.fetchrow(_ANCHOR, vid, since)
        if anchor is not None and anchor["start_time"] < first:
            anchor = None
        st = MotionState()
        start = first
        if anchor is not None:
            start = anchor["start_time"]
            st.odometer_km = anchor["start_odometer_km"] or 0.0
            st.engine_s = anchor["start_engine_s"] or 0.0
            before = await conn.fetchrow(_BEFORE, vid, start)
            if before is not None:
                st.last_time, st.lat, st.lon = before["time"], before["lat"], before["lon"]
                st.ignition = ignition_of(before["engine_status"], None)
                st.halt_since, st.halt_lat, st.halt_lon = before["time"], before["lat"], before["lon"]
            stop = await conn.fetchrow(_STOP_ENDED_AT, vid, start)
            if stop is not None:
                st.stop = StopDraft(stop["start_time"], stop["lat"], stop["lon"], stop["idle_s"])
        out = Changes()
        count = 0
        chunk: list[asyncpg.Record] = []
        async for row in conn.cursor(_READINGS, vid, start, live_row["last_time"], prefetch=_CHUNK):
            chunk.append(row)
            if len(chunk) == _CHUNK:  # the machine streams: a month of readings never sits in memory
                advance(vid, st, readings_of(chunk), th, out, live=False)
                count += len(chunk)
                chunk = []
        advance(vid, st, readings_of(chunk), th, out, live=False)
        count += len(chunk)
        st.idle_alert = live.idle_alert  # alerts are the live runs' own
        expire(vid, st, now, th, out)
        trip, stop_row = open_rows(vid, st)
        if trip is not None:
            out.trips.append(trip)
        if stop_row is not None:
            out.stops.append(stop_row)
        if anchor is None:  # accumulators summed from the first stored reading: keep the live totals
            _shift(out, st, live.odometer_km - st.odometer_km, live.engine_s - st.engine_s)
        trip_ids = list({r.id for r in out.trips})
        stop_ids = list({r.id for r in out.stops})
        deleted = _count(await conn.execute(_DELETE_TRIPS, vid, start, trip_ids))
        deleted += _count(await conn.execute(_DELETE_STOPS, vid, start, stop_ids))
        events, _ = await write_changes(conn, out, mark_late=False)
        await conn.execute(_SAVE_STATE, vid, st.last_time or live.last_time, st.odometer_km, st.engine_s,
                           memory_of(st))
    return Recomputed(vid, None if anchor is None else start, count, len(trip_ids), len(stop_ids), deleted,
                      len(events))


def _shift(out: Changes, st: MotionState, odometer_km: float, engine_s: float) -> None:
    if not odometer_km and not engine_s:
        return
    out.trips[:] = [replace(r, start_odometer_km=r.start_odometer_km + odometer_km,
                            end_odometer_km=None if r.end_odometer_km is None else r.end_odometer_km + odometer_km,
                            start_engine_s=r.start_engine_s + engine_s) for r in out.trips]
    st.odometer_km += odometer_km
    st.engine_s += engine_s
    if st.trip is not None:
        st.trip.odometer_km += odometer_km
        st.trip.engine_s += engine_s


def _count(status: str) -> int:
    """The row count of a command status such as ``DELETE 3``."""
    return int(status.rsplit(" ", 1)[-1])


async def recompute_dirty(conn: asyncpg.Connection, th: MotionThresholds, now: datetime, *, vehicles: int = 100
                          ) -> list[Recomputed]:
    """Recomputes up to ``vehicles`` vehicles whose hours late readings touched
    (``trip_dirty_hours``), oldest mark first: each vehicle's marks are claimed in the
    transaction that recomputes it, so a failure leaves them for the next pass."""
    await use_json(conn)
    now = await activity_clock(conn, now)
    done = []
    for row in await conn.fetch(_DIRTY_VEHICLES, vehicles):
        vid = row["vehicle_id"]
        async with conn.transaction():
            await conn.fetchrow(_LOCK_STATE, vid)  # the state row first, in the workers' lock order
            hours: Sequence[asyncpg.Record] = await conn.fetch(_CLAIM, vid)
            if not hours:
                continue
            done.append(await recompute_vehicle(conn, vid, min(h["hour"] for h in hours), th, now))
    return done


async def pending_vehicles(conn: asyncpg.Connection) -> int:
    """Vehicles with hours late readings touched, waiting for a recomputation."""
    return int(await conn.fetchval(_PENDING))


_VEHICLES_SINCE = """
SELECT vehicle_id FROM vehicle_motion_state WHERE ($1::uuid IS NULL OR vehicle_id = $1) AND last_time >= $2
ORDER BY vehicle_id
"""


async def vehicles_to_rebuild(conn: asyncpg.Connection, since: datetime, vehicle_id: UUID | None) -> list[UUID]:
    """The vehicles (all, or ``vehicle_id``) with readings processed since ``since``."""
    return [r["vehicle_id"] for r in await conn.fetch(_VEHICLES_SINCE, vehicle_id, since)]


async def rebuild(conn: asyncpg.Connection, vid: UUID, since: datetime, th: MotionThresholds,
                  now: datetime) -> Recomputed:
    """``fleet trips rebuild`` for one vehicle: :func:`recompute_vehicle` from ``since``."""
    await use_json(conn)
    return await recompute_vehicle(conn, vid, since, th, await activity_clock(conn, now))


# Silent for the gap, with a trip, idling or no stop open: what the next reading would end.
_SILENT = """
SELECT vehicle_id, last_time, revision, odometer_km, engine_s, memory FROM vehicle_motion_state
WHERE last_time < $1::timestamptz - make_interval(secs => $2::float8)
  AND (memory->'trip' <> 'null'::jsonb OR memory->'stop' = 'null'::jsonb OR memory->>'idle_since' IS NOT NULL)
ORDER BY vehicle_id
LIMIT $3
FOR UPDATE SKIP LOCKED
"""
_SAVE_EXPIRED = """
UPDATE vehicle_motion_state SET revision = revision + 1, memory = $2, updated_at = now() WHERE vehicle_id = $1
"""


_NEWEST = "SELECT max(last_time) FROM vehicle_motion_state"


async def activity_clock(conn: asyncpg.Connection, now: datetime) -> datetime:
    """The moment silence is measured against: ``now``, or the newest reading the workers
    have processed when that is older. While the consumers lag (an outage, a backlog),
    vehicles are not silent, their readings are waiting: measuring against the wall clock
    would end trips that are still going."""
    newest = await conn.fetchval(_NEWEST)
    return now if newest is None else min(now, newest)


async def expire_silent(conn: asyncpg.Connection, th: MotionThresholds, now: datetime, *, vehicles: int = 500) -> int:
    """Ends the trips (and idling) of vehicles silent for ``gap_s`` (measured against
    :func:`activity_clock`), at their last reading, and opens their stops there
    (:func:`~fleet_telemetry.trips.machine.expire`), up to ``vehicles`` in one transaction;
    returns how many changed. The state rows get ``revision + 1``, so a worker holding an
    older copy reads them back."""
    await use_json(conn)
    now = await activity_clock(conn, now)
    changed = 0
    async with conn.transaction():
        for row in await conn.fetch(_SILENT, now, th.gap_s, vehicles):
            vid = row["vehicle_id"]
            st = state_from_row(row)
            out = Changes()
            if not expire(vid, st, now, th, out):
                continue
            await write_changes(conn, out, mark_late=False)
            await conn.execute(_SAVE_EXPIRED, vid, memory_of(st))
            changed += 1
    return changed
