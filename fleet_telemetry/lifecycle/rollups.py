"""Hourly and daily rollups of ``vehicle_telemetry``, computed incrementally.

Per vehicle and bucket (a UTC hour in ``vehicle_telemetry_hourly``, a UTC day in
``vehicle_telemetry_daily``): the number of readings, average/minimum/maximum speed,
average fuel, first and last fuel level (of the readings that carry one), the distance
travelled (the sum of ``ST_Distance`` on geography between consecutive points of the
vehicle inside the bucket, in km), and the first and last point and time.

How the rollups stay equal to the raw rows they cover (schema/README.md, "Lifecycle"):

- The sink marks every hour it writes in ``telemetry_dirty_hours``, in the transaction
  of the readings. :func:`refresh_dirty_rollups` moves those marks into
  ``telemetry_rollup_queue`` in a short transaction that first waits for every sink
  transaction that has already marked (``LOCK ... IN EXCLUSIVE MODE``): a sink whose
  ``ON CONFLICT DO NOTHING`` found the hour already marked is committed before the
  recompute reads, and a sink marking later inserts a fresh mark. It then recomputes,
  one UTC day per transaction, each queued hour from its raw rows and the day from its
  hours (never from raw rows, so a day whose raw partition is gone is not wiped).
- ``telemetry_lifecycle.raw_horizon`` says where raw data begins: hours before it are
  final in the rollups. Readings that still land there (a backfill, a consumer whose
  clock lags) are folded into the rollups like :func:`fold_into_rollups` does and their
  stray raw rows deleted, instead of recomputing the hour from what little raw is left.
- Every writer of one day's rollups holds a transaction-level advisory lock on that day
  (:func:`fleet_telemetry.lifecycle.locks.lock_day`), so recomputes, folds and retention
  never interleave on the same day.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from fleet_telemetry.core.reading import Reading
from fleet_telemetry.lifecycle.locks import in_lock_timeout, lock_day
from fleet_telemetry.lifecycle.policy import DEFAULT_LOCK_TIMEOUT_SECONDS, LOCK_PATIENCE_SECONDS, utc_day

HOURLY = "vehicle_telemetry_hourly"
DAILY = "vehicle_telemetry_daily"

# Column order of both rollup tables as written here.
COLUMNS = (
    "vehicle_id", "bucket", "samples", "speed_samples", "avg_speed", "min_speed", "max_speed",
    "fuel_samples", "avg_fuel", "first_fuel", "first_fuel_time", "last_fuel", "last_fuel_time",
    "distance_km", "first_location", "first_time", "last_location", "last_time",
)
_VALUES = COLUMNS[2:]


def _aggregate(source: str, bucket: str) -> str:
    """SELECT of :data:`COLUMNS` per vehicle and bucket over the points of ``source``.

    ``source`` is a FROM item with ``vehicle_id, time, speed, fuel_level, location``;
    ``bucket`` an expression over ``p.time``.
    """
    return f"""
SELECT vehicle_id, bucket,
       count(*)::int, count(speed)::int, avg(speed), min(speed), max(speed),
       count(fuel_level)::int, avg(fuel_level),
       (array_agg(fuel_level ORDER BY time) FILTER (WHERE fuel_level IS NOT NULL))[1],
       min(time) FILTER (WHERE fuel_level IS NOT NULL),
       (array_agg(fuel_level ORDER BY time DESC) FILTER (WHERE fuel_level IS NOT NULL))[1],
       max(time) FILTER (WHERE fuel_level IS NOT NULL),
       coalesce(sum(step_m), 0) / 1000.0,
       (array_agg(location) FILTER (WHERE position = 1))[1],
       min(time),
       (array_agg(location) FILTER (WHERE position = points))[1],
       max(time)
  FROM (SELECT p.vehicle_id, p.time, p.speed, p.fuel_level, p.location, {bucket} AS bucket,
               ST_Distance((lag(p.location) OVER w)::geography, p.location::geography) AS step_m,
               row_number() OVER w AS position,
               count(*) OVER (PARTITION BY p.vehicle_id, {bucket}) AS points
          FROM {source} AS p
        WINDOW w AS (PARTITION BY p.vehicle_id, {bucket} ORDER BY p.time)) AS ordered
 GROUP BY vehicle_id, bucket"""


def _replace(table: str, select: str) -> str:
    """Upsert of recomputed buckets; rows that did not change are not rewritten."""
    columns = ", ".join(COLUMNS)
    assign = ", ".join(f"{c} = excluded.{c}" for c in _VALUES)
    old = ", ".join(f"t.{c}" for c in _VALUES)
    new = ", ".join(f"excluded.{c}" for c in _VALUES)
    return (
        f"INSERT INTO {table} AS t ({columns}){select}\n"
        f"ON CONFLICT (vehicle_id, bucket) DO UPDATE SET {assign}\n"
        f"WHERE ({old}) IS DISTINCT FROM ({new})"
    )


def _weighted(column: str, weight: str) -> str:
    total = f"(t.{weight} + excluded.{weight})"
    return (
        f"CASE WHEN {total} = 0 THEN NULL ELSE (coalesce(t.{column} * t.{weight}, 0)"
        f" + coalesce(excluded.{column} * excluded.{weight}, 0)) / {total} END"
    )


def _merge(table: str, select: str) -> str:
    """Upsert that combines new points' aggregate with a bucket's existing one.

    Exact for counts, averages, extremes, first/last values. The distance is exact when
    the new points all lie before or all after the points already in the bucket; when
    they fall between them it adds only the distance among the new points (the
    neighbours they split are gone with the raw rows), a documented approximation.
    """
    columns = ", ".join(COLUMNS)
    geo = "::geography"
    sets = {
        "samples": "t.samples + excluded.samples",
        "speed_samples": "t.speed_samples + excluded.speed_samples",
        "avg_speed": _weighted("avg_speed", "speed_samples"),
        "min_speed": "least(t.min_speed, excluded.min_speed)",
        "max_speed": "greatest(t.max_speed, excluded.max_speed)",
        "fuel_samples": "t.fuel_samples + excluded.fuel_samples",
        "avg_fuel": _weighted("avg_fuel", "fuel_samples"),
        "first_fuel": "CASE WHEN t.first_fuel_time IS NULL OR excluded.first_fuel_time < t.first_fuel_time"
        " THEN excluded.first_fuel ELSE t.first_fuel END",
        "first_fuel_time": "least(t.first_fuel_time, excluded.first_fuel_time)",
        "last_fuel": "CASE WHEN t.last_fuel_time IS NULL OR excluded.last_fuel_time > t.last_fuel_time"
        " THEN excluded.last_fuel ELSE t.last_fuel END",
        "last_fuel_time": "greatest(t.last_fuel_time, excluded.last_fuel_time)",
        "distance_km": "t.distance_km + excluded.distance_km + CASE"
        f" WHEN excluded.first_time > t.last_time"
        f" THEN ST_Distance(t.last_location{geo}, excluded.first_location{geo}) / 1000.0"
        f" WHEN excluded.last_time < t.first_time"
        f" THEN ST_Distance(excluded.last_location{geo}, t.first_location{geo}) / 1000.0"
        " ELSE 0 END",
        "first_location": "CASE WHEN excluded.first_time < t.first_time"
        " THEN excluded.first_location ELSE t.first_location END",
        "first_time": "least(t.first_time, excluded.first_time)",
        "last_location": "CASE WHEN excluded.last_time > t.last_time"
        " THEN excluded.last_location ELSE t.last_location END",
        "last_time": "greatest(t.last_time, excluded.last_time)",
    }
    assign = ",\n    ".join(f"{c} = {sets[c]}" for c in _VALUES)
    return (
        f"INSERT INTO {table} AS t ({columns}){select}\n"
        f"ON CONFLICT (vehicle_id, bucket) DO UPDATE SET\n    {assign}"
    )


# --- the statements ------------------------------------------------------------------

# One hour ($1) of every vehicle, from the raw rows (partition pruning and the BRIN
# index on time keep it to that hour's rows).
HOUR_FROM_RAW = _replace(
    HOURLY,
    _aggregate(
        "(SELECT vehicle_id, time, speed, fuel_level, location FROM vehicle_telemetry"
        " WHERE time >= $1::timestamptz AND time < $1::timestamptz + interval '1 hour')",
        "$1::timestamptz",
    ),
)

# One UTC day ($1) of every vehicle, from its hourly rollups: sums weighted by the
# counts, plus the distance between the last point of an hour and the first of the next.
DAY_FROM_HOURS = _replace(
    DAILY,
    """
SELECT vehicle_id, $1::timestamptz,
       sum(samples)::int, sum(speed_samples)::int,
       sum(avg_speed * speed_samples) / nullif(sum(speed_samples), 0), min(min_speed), max(max_speed),
       sum(fuel_samples)::int, sum(avg_fuel * fuel_samples) / nullif(sum(fuel_samples), 0),
       (array_agg(first_fuel ORDER BY first_fuel_time) FILTER (WHERE first_fuel_time IS NOT NULL))[1],
       min(first_fuel_time),
       (array_agg(last_fuel ORDER BY last_fuel_time DESC) FILTER (WHERE last_fuel_time IS NOT NULL))[1],
       max(last_fuel_time),
       sum(distance_km) + coalesce(sum(gap_m), 0) / 1000.0,
       (array_agg(first_location) FILTER (WHERE position = 1))[1],
       min(first_time),
       (array_agg(last_location) FILTER (WHERE position = hours))[1],
       max(last_time)
  FROM (SELECT h.*,
               ST_Distance((lag(h.last_location) OVER w)::geography, h.first_location::geography) AS gap_m,
               row_number() OVER w AS position,
               count(*) OVER (PARTITION BY h.vehicle_id) AS hours
          FROM vehicle_telemetry_hourly AS h
         WHERE h.bucket >= $1::timestamptz AND h.bucket < $1::timestamptz + interval '24 hours'
        WINDOW w AS (PARTITION BY h.vehicle_id ORDER BY h.bucket)) AS ordered
 GROUP BY vehicle_id""",
)

# Rollup rows of vehicles that have no reading left in the bucket (raw rows deleted by
# hand): without this, a recompute would keep them.
VANISHED_FROM_HOUR = """
DELETE FROM vehicle_telemetry_hourly AS h
 WHERE h.bucket = $1::timestamptz
   AND NOT EXISTS (SELECT 1 FROM vehicle_telemetry AS r WHERE r.vehicle_id = h.vehicle_id
                      AND r.time >= $1::timestamptz AND r.time < $1::timestamptz + interval '1 hour')
"""
VANISHED_FROM_DAY = """
DELETE FROM vehicle_telemetry_daily AS d
 WHERE d.bucket = $1::timestamptz
   AND NOT EXISTS (SELECT 1 FROM vehicle_telemetry_hourly AS h WHERE h.vehicle_id = d.vehicle_id
                      AND h.bucket >= $1::timestamptz AND h.bucket < $1::timestamptz + interval '24 hours')
"""

_POINTS = (
    "(SELECT v AS vehicle_id, t AS time, s AS speed, f AS fuel_level,"
    " ST_SetSRID(ST_MakePoint(x, y), 4326) AS location"
    " FROM unnest($1::uuid[], $2::timestamptz[], $3::float8[], $4::float8[], $5::float8[], $6::float8[])"
    " AS u(v, t, x, y, s, f))"
)
# Points ($1..$6: vehicle, time, lon, lat, speed, fuel) merged into their hours / days.
MERGE_INTO_HOURLY = _merge(HOURLY, _aggregate(_POINTS, "date_trunc('hour', p.time, 'UTC')"))
MERGE_INTO_DAILY = _merge(DAILY, _aggregate(_POINTS, "date_trunc('day', p.time, 'UTC')"))

# Moves the dirty marks into the queue; run after LOCK TABLE telemetry_dirty_hours.
_CLAIM = """
WITH claimed AS (DELETE FROM telemetry_dirty_hours RETURNING hour, marked_at)
INSERT INTO telemetry_rollup_queue (hour, queued_at) SELECT hour, marked_at FROM claimed
"""
_QUEUED_DAYS = (
    "SELECT DISTINCT date_trunc('day', hour, 'UTC') AS day FROM telemetry_rollup_queue ORDER BY 1"
)
_TAKE_DAY = (
    "DELETE FROM telemetry_rollup_queue"
    " WHERE hour >= $1::timestamptz AND hour < $1::timestamptz + interval '24 hours' RETURNING hour"
)
_HORIZONS = (
    "SELECT nullif(raw_horizon, '-infinity') AS raw_horizon,"
    " nullif(hourly_horizon, '-infinity') AS hourly_horizon FROM telemetry_lifecycle"
)
_PENDING = """
SELECT count(DISTINCT hour) AS hours, min(since) AS oldest
  FROM (SELECT hour, marked_at AS since FROM telemetry_dirty_hours
        UNION ALL SELECT hour, queued_at FROM telemetry_rollup_queue) AS pending
"""
# Raw rows of one hour before the raw horizon: they sit in the default partition.
_TAKE_STRAYS = (
    "DELETE FROM vehicle_telemetry"
    " WHERE time >= $1::timestamptz AND time < $1::timestamptz + interval '1 hour'"
    " RETURNING vehicle_id, time, ST_X(location) AS lon, ST_Y(location) AS lat, speed, fuel_level"
)
_RECORD_FOLDED = (
    "INSERT INTO telemetry_folded_readings (vehicle_id, time)"
    " SELECT * FROM unnest($1::uuid[], $2::timestamptz[]) ON CONFLICT DO NOTHING"
    " RETURNING vehicle_id, time"
)
_STORE_RAW = """
INSERT INTO vehicle_telemetry (time, vehicle_id, location, speed, fuel_level, heading, odometer_km, engine_status)
SELECT t, v, ST_SetSRID(ST_MakePoint(x, y), 4326), s, f, h, o, e::jsonb
  FROM unnest($1::timestamptz[], $2::uuid[], $3::float8[], $4::float8[], $5::float8[],
              $6::float8[], $7::float8[], $8::float8[], $9::text[]) AS u(t, v, x, y, s, f, h, o, e)
ON CONFLICT (vehicle_id, time) DO NOTHING
RETURNING time
"""
_MARK_HOURS = (
    "INSERT INTO telemetry_dirty_hours (hour)"
    " SELECT DISTINCT date_trunc('hour', t, 'UTC') FROM unnest($1::timestamptz[]) AS t"
    " ON CONFLICT (hour) DO NOTHING"
)


# --- results ---------------------------------------------------------------------------


@dataclass
class RollupReport:
    """What one :func:`refresh_dirty_rollups` did."""

    hours: int = 0
    """Hours recomputed from their raw rows."""
    days: int = 0
    """Days recomputed from their hourly rollups."""
    late_hours: int = 0
    """Hours before the raw horizon whose stray raw rows were folded in and deleted."""
    folded_readings: int = 0
    """Readings merged into the rollups by those folds (not counting repeats)."""
    claim_deferred: bool = False
    """The dirty marks could not be claimed within the lock timeout (retried next time)."""
    pending_hours: int = 0
    """Hours still marked or queued when it finished (marked meanwhile, or deferred)."""
    lag_seconds: float = 0.0
    """Age of the oldest of those marks; 0 when none is pending."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Horizons:
    """Where kept data begins (``telemetry_lifecycle``); ``-infinity`` reads as ``None``."""

    raw: datetime | None
    hourly: datetime | None

    def raw_kept(self, moment: datetime) -> bool:
        return self.raw is None or moment >= self.raw

    def hourly_kept(self, moment: datetime) -> bool:
        return self.hourly is None or moment >= self.hourly


@dataclass(frozen=True, slots=True)
class _Point:
    vehicle_id: UUID
    time: datetime
    lon: float
    lat: float
    speed: float | None
    fuel_level: float | None


# --- helpers ---------------------------------------------------------------------------


async def read_horizons(conn: asyncpg.Connection) -> Horizons:
    row = await conn.fetchrow(_HORIZONS)
    assert row is not None, "telemetry_lifecycle has no row: run fleet migrate"
    return Horizons(raw=row["raw_horizon"], hourly=row["hourly_horizon"])


def _require_autocommit(conn: asyncpg.Connection) -> None:
    if conn.is_in_transaction():
        raise RuntimeError("rollup functions commit their own transactions: call them outside one")


def _point_arrays(points: Sequence[_Point]) -> list[list[Any]]:
    return [
        [p.vehicle_id for p in points], [p.time for p in points], [p.lon for p in points],
        [p.lat for p in points], [p.speed for p in points], [p.fuel_level for p in points],
    ]


async def _fold_points(
    conn: asyncpg.Connection, points: Sequence[_Point], horizons: Horizons, day: datetime
) -> int:
    """Merges the points not folded before into the rollups of ``day`` (its lock held).

    Into the hours when the day's hours are kept (the caller then recomputes the day
    from them), else straight into the day. Returns how many points were new.
    """
    if not points:
        return 0
    fresh = await conn.fetch(_RECORD_FOLDED, [p.vehicle_id for p in points], [p.time for p in points])
    new_ids = {(row["vehicle_id"], row["time"]) for row in fresh}
    new = [p for p in points if (p.vehicle_id, p.time) in new_ids]
    if new:
        statement = MERGE_INTO_HOURLY if horizons.hourly_kept(day) else MERGE_INTO_DAILY
        await conn.execute(statement, *_point_arrays(new))
    return len(new)


# --- the interface ---------------------------------------------------------------------


async def claim_dirty_hours(
    conn: asyncpg.Connection,
    *,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    lock_patience: float = LOCK_PATIENCE_SECONDS,
) -> bool:
    """Moves every mark of ``telemetry_dirty_hours`` into ``telemetry_rollup_queue``.

    Commits. Blocks new sink marks for as long as it waits for the sink transactions
    that already marked (see :func:`in_lock_timeout`); returns False when it could not
    get the lock, leaving the marks for the next call.
    """
    _require_autocommit(conn)

    async def claim(c: asyncpg.Connection) -> None:
        await c.execute("LOCK TABLE telemetry_dirty_hours IN EXCLUSIVE MODE")
        await c.execute(_CLAIM)

    done, _ = await in_lock_timeout(conn, claim, timeout=lock_timeout, patience=lock_patience)
    return done


async def refresh_queued_day(conn: asyncpg.Connection, day: datetime) -> RollupReport:
    """Recomputes the queued hours of one UTC day and then the day, in one transaction.

    Holds the day's advisory lock (a concurrent refresh of the same day waits, then
    finds nothing queued). Commits; the queue rows go in the same commit.
    """
    _require_autocommit(conn)
    report = RollupReport()
    async with conn.transaction():
        await lock_day(conn, day)
        # The day sorts all its hourly rows (about 24 per vehicle, each some 200 bytes).
        await conn.execute("SET LOCAL work_mem = '64MB'")
        hours = sorted({row["hour"] for row in await conn.fetch(_TAKE_DAY, day)})
        if not hours:
            return report
        horizons = await read_horizons(conn)
        strays: list[_Point] = []
        for hour in hours:
            if horizons.raw_kept(hour):
                await conn.execute(VANISHED_FROM_HOUR, hour)
                await conn.execute(HOUR_FROM_RAW, hour)
                report.hours += 1
            else:
                rows = await conn.fetch(_TAKE_STRAYS, hour)
                strays.extend(
                    _Point(r["vehicle_id"], r["time"], r["lon"], r["lat"], r["speed"], r["fuel_level"])
                    for r in rows
                )
                report.late_hours += 1
        report.folded_readings = await _fold_points(conn, strays, horizons, day)
        if horizons.hourly_kept(day):
            await conn.execute(VANISHED_FROM_DAY, day)
            await conn.execute(DAY_FROM_HOURS, day)
            report.days += 1
    return report


async def rollup_backlog(conn: asyncpg.Connection, *, now: datetime | None = None) -> tuple[int, float]:
    """Hours marked or queued and not yet recomputed, and the age in seconds of the oldest mark."""
    row = await conn.fetchrow(_PENDING)
    assert row is not None
    if not row["hours"] or row["oldest"] is None:
        return 0, 0.0
    reference = now if now is not None else await conn.fetchval("SELECT now()")
    return int(row["hours"]), max(0.0, (reference - row["oldest"]).total_seconds())


async def refresh_dirty_rollups(
    conn: asyncpg.Connection,
    *,
    now: datetime | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    lock_patience: float = LOCK_PATIENCE_SECONDS,
) -> RollupReport:
    """Recomputes every hour listed in ``telemetry_dirty_hours``, and the days holding them.

    Hours are recomputed from their raw rows, days from their hours. Idempotent and safe
    to run concurrently with the sink, with itself and with ``fleet maintain``. Must be
    called outside a transaction: it commits once to claim the marks (a lock that
    briefly holds up sink commits; ``lock_timeout`` and ``lock_patience`` as in
    :func:`in_lock_timeout`) and once per UTC day recomputed, so a failure leaves the remaining days queued for the next call.
    ``now`` (default: the database's clock) only serves the reported lag. Raises
    asyncpg errors (connection lost, ...) to the caller.
    """
    _require_autocommit(conn)
    report = RollupReport()
    report.claim_deferred = not await claim_dirty_hours(
        conn, lock_timeout=lock_timeout, lock_patience=lock_patience
    )
    for row in await conn.fetch(_QUEUED_DAYS):
        done = await refresh_queued_day(conn, row["day"])
        report.hours += done.hours
        report.days += done.days
        report.late_hours += done.late_hours
        report.folded_readings += done.folded_readings
    report.pending_hours, report.lag_seconds = await rollup_backlog(conn, now=now)
    return report


async def fold_into_rollups(conn: asyncpg.Connection, readings: Sequence[Reading]) -> int:
    """Merges readings whose raw partition is gone into the hourly and daily rollups.

    For each UTC day (in order, one transaction and the day's lock each):

    - before the raw horizon (the day's raw partition was dropped): the readings whose
      identity ``(vehicle_id, time)`` was never folded are recorded in
      ``telemetry_folded_readings`` and merged into their hours (then the day is
      recomputed from its hours), or straight into the day when its hours are past the
      hourly retention. No raw row is stored. Folding the same reading again is a no-op.
    - otherwise (raw data of that day is still kept, or it never had a partition): the
      readings are stored as raw rows (``ON CONFLICT DO NOTHING``) and their hours
      marked dirty, so the next :func:`refresh_dirty_rollups` covers them exactly and
      retention waits for it.

    Returns how many readings were new (merged or stored). Outside a transaction it
    commits once per day; inside one, each day is a savepoint and the day locks are held
    until the caller commits (keep such transactions short). Limitations: a reading that was stored raw and rolled up
    before its partition was dropped is not known to the folded identities, so folding
    it again counts it twice (fold only readings that were never stored, such as
    ``outside_retention`` dead letters); and a folded reading that falls between
    readings already in an hour adds no distance to that hour (its neighbours are gone).
    """
    unique: dict[tuple[UUID, datetime], Reading] = {}
    for reading in readings:
        unique.setdefault((reading.vehicle_id, reading.time), reading)
    by_day: dict[datetime, list[Reading]] = {}
    for reading in unique.values():
        by_day.setdefault(utc_day(reading.time), []).append(reading)
    total = 0
    for day in sorted(by_day):
        batch = by_day[day]
        async with conn.transaction():
            await lock_day(conn, day)
            horizons = await read_horizons(conn)
            if horizons.raw_kept(day):
                stored = await conn.fetch(
                    _STORE_RAW,
                    [r.time for r in batch], [r.vehicle_id for r in batch], [r.lon for r in batch],
                    [r.lat for r in batch], [r.speed for r in batch], [r.fuel_level for r in batch],
                    [r.heading for r in batch], [r.odometer_km for r in batch],
                    [None if r.engine_status is None else orjson.dumps(r.engine_status).decode() for r in batch],
                )
                if stored:
                    await conn.execute(_MARK_HOURS, [row["time"] for row in stored])
                total += len(stored)
            else:
                points = [_Point(r.vehicle_id, r.time, r.lon, r.lat, r.speed, r.fuel_level) for r in batch]
                folded = await _fold_points(conn, points, horizons, day)
                if folded and horizons.hourly_kept(day):
                    await conn.execute(DAY_FROM_HOURS, day)
                total += folded
    return total
