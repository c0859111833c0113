"""Daily driver scores (``driver_daily_scores``), recomputed for the days that changed.

Per driver and UTC day (schema/README.md, "Driver behaviour"):

- **bookings**: the driver's assignments that were driven, ACTIVE or COMPLETED (``fleet
  assignments end`` completes one; a CANCELLED one never happened), cut to the day.
- **distance**: the sum of ``ST_Distance`` on geography between consecutive raw readings
  of the vehicle inside each booking, leaving out the steps the rules take for GPS jumps
  (longer than :data:`JUMP_MIN_DISTANCE_M` at more than ``FLEET_ALERT_MAX_GPS_SPEED_KMH``);
  the step across midnight or across a booking's start or end belongs to neither side.
  Rounded to the metre.
- **events**: the ``harsh_braking``, ``harsh_acceleration`` and ``overspeed`` alerts whose
  reading time falls inside a booking of the driver that day.
- **score**: :func:`score_of` the penalty points (``FLEET_BEHAVIOUR_PENALTY_*`` per event).

The triggers of migration 0043 mark a day in ``driver_score_dirty_days`` whenever its
telemetry hours are queued for the rollups, a behaviour alert is inserted, or an
assignment covering it changes. :func:`refresh_driver_scores` claims the marks (waiting
for the transactions that marked, like the rollups' claim) and recomputes each day in
a transaction of its own; recomputing a day gives the same rows, and rows that did not
change are not rewritten. A day whose raw readings are gone (before the raw horizon)
keeps its rows.
"""

from __future__ import annotations

from datetime import date, datetime, time, timezone
from typing import Any

import asyncpg

from fleet_telemetry.lifecycle.context import PassContext
from fleet_telemetry.lifecycle.locks import in_lock_timeout
from fleet_telemetry.lifecycle.policy import DEFAULT_LOCK_TIMEOUT_SECONDS, LOCK_PATIENCE_SECONDS, ScoreRules
from fleet_telemetry.lifecycle.report import ScoresReport
from fleet_telemetry.lifecycle.rollups import read_horizons

# A step shorter than this is never a GPS jump: the rules' own JUMP_MIN_DISTANCE_M.
JUMP_MIN_DISTANCE_M = 250.0

_CLAIM = """
WITH claimed AS (DELETE FROM driver_score_dirty_days RETURNING day, marked_at)
INSERT INTO driver_score_queue (day, queued_at) SELECT day, marked_at FROM claimed
ON CONFLICT (day) DO NOTHING
"""
_QUEUED = "SELECT day FROM driver_score_queue ORDER BY day"
_TAKE = "DELETE FROM driver_score_queue WHERE day = $1 RETURNING day"
_PENDING = """
SELECT count(*) AS days FROM (SELECT day FROM driver_score_dirty_days UNION SELECT day FROM driver_score_queue) AS d
"""

# One day's rows. $1 the day (UTC midnight), $2 the jump distance, $3 the GPS speed limit,
# $4..$6 the penalties of harsh braking, harsh acceleration and overspeed.
_DAY_ROWS = """
WITH bounds AS (
    SELECT $1::timestamptz AS lo, $1::timestamptz + interval '1 day' AS hi
), windows AS (
    SELECT a.driver_id, a.vehicle_id, greatest(a.start_time, b.lo) AS w_start,
           least(coalesce(a.end_time, 'infinity'), b.hi) AS w_end
      FROM vehicle_assignments AS a, bounds AS b
     WHERE a.status IN ('ACTIVE', 'COMPLETED') AND a.start_time < b.hi AND (a.end_time IS NULL OR a.end_time > b.lo)
), distance AS (
    -- Each booking's steps summed apart (its readings come in small sorted runs), then per
    -- driver; metre precision, so a recompute gives the same value whatever order the sum took.
    SELECT w.driver_id, round((sum(p.m) / 1000.0)::numeric, 3)::float8 AS km
      FROM windows AS w
     CROSS JOIN LATERAL (
        SELECT coalesce(sum(m) FILTER (WHERE m <= $2::float8 OR (s > 0 AND m / s * 3.6 <= $3::float8)), 0) AS m
          FROM (SELECT ST_Distance(lag(g) OVER o, g) AS m, extract(epoch FROM time - lag(time) OVER o)::float8 AS s
                  FROM (SELECT t.time, t.location::geography AS g
                          FROM vehicle_telemetry AS t
                         WHERE t.vehicle_id = w.vehicle_id AND t.time >= w.w_start AND t.time < w.w_end
                           -- the day's bounds again, for partition pruning
                           AND t.time >= $1::timestamptz AND t.time < $1::timestamptz + interval '1 day') AS r
                WINDOW o AS (ORDER BY time)) AS steps) AS p
     GROUP BY w.driver_id
), events AS (
    SELECT driver_id,
           count(*) FILTER (WHERE type = 'harsh_braking')::int AS harsh_braking,
           count(*) FILTER (WHERE type = 'harsh_acceleration')::int AS harsh_acceleration,
           count(*) FILTER (WHERE type = 'overspeed')::int AS overspeed
      FROM (SELECT w.driver_id, a.type
              FROM alerts AS a, bounds AS b, windows AS w
             WHERE a.type IN ('harsh_braking', 'harsh_acceleration', 'overspeed') AND a.entity_type = 'vehicle'
               AND a.reading_time >= b.lo AND a.reading_time < b.hi
               AND a.entity_id = w.vehicle_id AND a.reading_time >= w.w_start AND a.reading_time < w.w_end) AS e
     GROUP BY driver_id
), counted AS (
    SELECT coalesce(d.driver_id, e.driver_id) AS driver_id, coalesce(d.km, 0) AS km,
           coalesce(e.harsh_braking, 0) AS hb, coalesce(e.harsh_acceleration, 0) AS ha,
           coalesce(e.overspeed, 0) AS os
      FROM distance AS d FULL JOIN events AS e ON e.driver_id = d.driver_id
), penalised AS (
    SELECT *, hb * $4::float8 + ha * $5::float8 + os * $6::float8 AS penalty FROM counted
)
SELECT driver_id, km AS distance_km, hb AS harsh_braking, ha AS harsh_acceleration, os AS overspeed,
       penalty AS penalty_points,
       CASE WHEN km > 0 THEN greatest(0.0, 100.0 - penalty * 100.0 / km) END AS score
  FROM penalised
"""
_COLUMNS = ("distance_km", "harsh_braking", "harsh_acceleration", "overspeed", "penalty_points", "score")
# Rows that did not change are not rewritten (computed_at says when a row last changed).
_UPSERT = f"""
INSERT INTO driver_daily_scores AS s (driver_id, day, {", ".join(_COLUMNS)})
SELECT u.driver_id, $1::date, {", ".join(f"u.{c}" for c in _COLUMNS)}
  FROM unnest($2::uuid[], $3::float8[], $4::int[], $5::int[], $6::int[], $7::float8[], $8::float8[])
       AS u(driver_id, {", ".join(_COLUMNS)})
ON CONFLICT (driver_id, day) DO UPDATE
SET {", ".join(f"{c} = excluded.{c}" for c in _COLUMNS)}, computed_at = now()
WHERE ({", ".join(f"s.{c}" for c in _COLUMNS)}) IS DISTINCT FROM ({", ".join(f"excluded.{c}" for c in _COLUMNS)})
RETURNING driver_id
"""
_DELETE_OTHERS = """
DELETE FROM driver_daily_scores WHERE day = $1 AND NOT (driver_id = ANY($2::uuid[])) RETURNING driver_id
"""


def score_of(penalty_points: float, distance_km: float) -> float | None:
    """``max(0, 100 - penalty points per 100 km)``; None without distance."""
    if distance_km <= 0:
        return None
    return max(0.0, 100.0 - penalty_points * 100.0 / distance_km)


async def claim_dirty_days(
    conn: asyncpg.Connection, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    lock_patience: float = LOCK_PATIENCE_SECONDS,
) -> bool:
    """Moves every mark of ``driver_score_dirty_days`` into ``driver_score_queue``, once
    the transactions that marked have ended (a writer whose ``ON CONFLICT DO NOTHING``
    found its day marked already is then committed, and one marking later adds a fresh
    mark). Commits; returns False when the lock stayed busy (marks left for next time)."""

    async def claim(c: asyncpg.Connection) -> None:
        await c.execute("LOCK TABLE driver_score_dirty_days IN EXCLUSIVE MODE")
        await c.execute(_CLAIM)

    done, _ = await in_lock_timeout(conn, claim, timeout=lock_timeout, patience=lock_patience)
    return done


async def score_day(conn: asyncpg.Connection, day: date, rules: ScoreRules) -> int:
    """Recomputes the rows of one UTC day on ``conn`` (in the caller's transaction);
    returns how many rows were inserted, changed or removed."""
    midnight = datetime.combine(day, time(), timezone.utc)
    rows = await conn.fetch(_DAY_ROWS, midnight, JUMP_MIN_DISTANCE_M, rules.max_gps_speed_kmh,
                            rules.penalty_harsh_braking, rules.penalty_harsh_acceleration, rules.penalty_overspeed)
    drivers = [r["driver_id"] for r in rows]
    changed = await conn.fetch(_UPSERT, day, drivers, *([r[c] for r in rows] for c in _COLUMNS))
    removed = await conn.fetch(_DELETE_OTHERS, day, drivers)
    return len(changed) + len(removed)


async def refresh_driver_scores(
    conn: asyncpg.Connection, rules: ScoreRules, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    lock_patience: float = LOCK_PATIENCE_SECONDS,
) -> ScoresReport:
    """Claims the marked days and recomputes each, one transaction per day (the day
    leaves the queue in that transaction). Call outside a transaction. Idempotent and
    safe to run concurrently with ingestion. Raises asyncpg errors."""
    if conn.is_in_transaction():
        raise RuntimeError("refresh_driver_scores commits its own transactions: call it outside one")
    report = ScoresReport()
    report.claim_deferred = not await claim_dirty_days(conn, lock_timeout=lock_timeout, lock_patience=lock_patience)
    for row in await conn.fetch(_QUEUED):
        day = row["day"]
        async with conn.transaction():
            if await conn.fetchval(_TAKE, day) is None:
                continue  # another pass took it
            if not (await read_horizons(conn)).raw_kept(datetime.combine(day, time(), timezone.utc)):
                report.days_past_retention += 1  # its raw readings are gone: its rows stay as they are
                continue
            report.rows_changed += await score_day(conn, day, rules)
            report.days += 1
    report.pending_days = int(await conn.fetchval(_PENDING))
    return report


async def pending_days(conn: asyncpg.Connection) -> int:
    """Days marked or queued and not recomputed yet."""
    return int(await conn.fetchval(_PENDING))


async def score_drivers(ctx: PassContext) -> None:
    """The pass step: recomputes the scores of the marked days (with ``dry_run``: counts them)."""
    if ctx.dry_run:
        ctx.report.driver_scores = ScoresReport(pending_days=await pending_days(ctx.conn))
        return
    ctx.report.driver_scores = await refresh_driver_scores(
        ctx.conn, ctx.policy.scores, lock_timeout=ctx.policy.lock_timeout_seconds,
        lock_patience=ctx.policy.lock_patience_seconds)
    if ctx.report.driver_scores.claim_deferred:
        ctx.report.deferred.append("claiming driver score days")
