"""Daily driver scores (``driver_daily_scores``), recomputed for the hours that changed.

Per driver and UTC day (schema/README.md, "Driver behaviour"):

- **bookings**: the driver's assignments that were driven, ACTIVE or COMPLETED (``fleet
  assignments end`` completes one; a CANCELLED one never happened).
- **distance**: the sum of ``ST_Distance`` on geography between consecutive raw readings
  of the vehicle inside a booking, leaving out the steps the rules take for GPS jumps
  (longer than :data:`JUMP_MIN_DISTANCE_M` at more than ``FLEET_ALERT_MAX_GPS_SPEED_KMH``).
  A step belongs to the hour (and day) of the reading it ends at; a step from a reading
  before the booking started, or from one more than an hour before the hour, is not
  counted. Kept per hour in ``driver_hourly_distance``; a day's distance is rounded to
  the metre.
- **events**: the ``harsh_braking``, ``harsh_acceleration`` and ``overspeed`` alerts whose
  reading time falls inside a booking of the driver that day.
- **score**: :func:`score_of` the penalty points (``FLEET_BEHAVIOUR_PENALTY_*`` per event).

The triggers of migration 0043 mark an hour in ``driver_score_dirty_hours`` when it (or
the hour before it) is queued for the rollups, when a behaviour alert is inserted for it,
and when a booking covering it changes. :func:`refresh_driver_scores` claims the marks
(waiting for the transactions that marked, like the rollups' claim) and, one UTC day per
transaction, recomputes the distances of the day's marked hours and then the day's
rows. Recomputing gives the same rows; rows that did not change are not rewritten.
Hours whose raw readings are gone (before the raw horizon) keep their distances, and
their days their rows.
"""

from __future__ import annotations

from datetime import date, datetime, time, timezone

import asyncpg

from fleet_telemetry.lifecycle.context import PassContext
from fleet_telemetry.lifecycle.locks import in_lock_timeout
from fleet_telemetry.lifecycle.policy import DEFAULT_LOCK_TIMEOUT_SECONDS, LOCK_PATIENCE_SECONDS, ScoreRules
from fleet_telemetry.lifecycle.report import ScoresReport
from fleet_telemetry.lifecycle.rollups import read_horizons

# A step shorter than this is never a GPS jump: the rules' own JUMP_MIN_DISTANCE_M.
JUMP_MIN_DISTANCE_M = 250.0

_CLAIM = """
WITH claimed AS (DELETE FROM driver_score_dirty_hours RETURNING hour, marked_at)
INSERT INTO driver_score_queue (hour, queued_at) SELECT hour, marked_at FROM claimed
ON CONFLICT (hour) DO NOTHING
"""
_QUEUED_DAYS = "SELECT DISTINCT date_trunc('day', hour, 'UTC') AS day FROM driver_score_queue ORDER BY 1"
_TAKE_DAY = (
    "DELETE FROM driver_score_queue"
    " WHERE hour >= $1::timestamptz AND hour < $1::timestamptz + interval '1 day' RETURNING hour"
)
_PENDING = """
SELECT count(*) FROM (SELECT hour FROM driver_score_dirty_hours UNION SELECT hour FROM driver_score_queue) AS h
"""
_FORGET_OLD = "DELETE FROM driver_hourly_distance WHERE hour < $1"

# The bookings driven during [$1, $1 + $2): driver, vehicle, booking start, and the part of
# [$1, $1 + $2) it covers.
_BOOKINGS = """
SELECT a.driver_id, a.vehicle_id, a.start_time AS b_start,
       greatest(a.start_time, $1::timestamptz) AS w_start,
       least(coalesce(a.end_time, 'infinity'), $1::timestamptz + $2::interval) AS w_end
  FROM vehicle_assignments AS a
 WHERE a.status IN ('ACTIVE', 'COMPLETED')
   AND a.start_time < $1::timestamptz + $2::interval AND (a.end_time IS NULL OR a.end_time > $1::timestamptz)
"""

# One hour's distances. $1 the hour, $2 the jump distance, $3 the GPS speed limit. Per
# booking, its readings of the hour in index order, after the booking's last reading of
# the hour before (the start of the hour's first step).
_HOUR_DISTANCES = f"""
WITH w AS ({_BOOKINGS.replace("$2::interval", "interval '1 hour'")})
SELECT w.driver_id, w.vehicle_id, round(sum(p.m)::numeric, 3)::float8 AS distance_m
  FROM w
 CROSS JOIN LATERAL (
    SELECT coalesce(sum(m) FILTER (WHERE counted AND (m <= $2::float8 OR (s > 0 AND m / s * 3.6 <= $3::float8))), 0)
           AS m
      FROM (SELECT ST_Distance(lag(g) OVER o, g) AS m, extract(epoch FROM time - lag(time) OVER o)::float8 AS s,
                   counted
              FROM ((SELECT t.time, t.location::geography AS g, false AS counted
                       FROM vehicle_telemetry AS t
                      WHERE t.vehicle_id = w.vehicle_id AND t.time >= w.b_start AND t.time < w.w_start
                        AND t.time >= $1::timestamptz - interval '1 hour'
                      ORDER BY t.time DESC LIMIT 1)
                    UNION ALL
                    (SELECT t.time, t.location::geography, true
                       FROM vehicle_telemetry AS t
                      WHERE t.vehicle_id = w.vehicle_id AND t.time >= w.w_start AND t.time < w.w_end
                        -- the hour's bounds again, for partition pruning
                        AND t.time >= $1::timestamptz AND t.time < $1::timestamptz + interval '1 hour')) AS r
            WINDOW o AS (ORDER BY time)) AS steps) AS p
 GROUP BY w.driver_id, w.vehicle_id
 HAVING sum(p.m) > 0
"""
_CLEAR_HOUR = "DELETE FROM driver_hourly_distance WHERE hour = $1"
_STORE_HOUR = """
INSERT INTO driver_hourly_distance (hour, driver_id, vehicle_id, distance_m)
SELECT $1, u.d, u.v, u.m FROM unnest($2::uuid[], $3::uuid[], $4::float8[]) AS u(d, v, m)
"""

# One day's rows. $1 the day (UTC midnight), $2..$4 the penalties of harsh braking,
# harsh acceleration and overspeed.
_DAY_ROWS = f"""
WITH w AS ({_BOOKINGS.replace("$2::interval", "interval '1 day'")}),
distance AS (
    -- metre precision: a recompute gives the same value whatever order the sum took
    SELECT driver_id, round((sum(distance_m) / 1000.0)::numeric, 3)::float8 AS km
      FROM driver_hourly_distance
     WHERE hour >= $1::timestamptz AND hour < $1::timestamptz + interval '1 day'
     GROUP BY driver_id
), events AS (
    SELECT w.driver_id,
           count(*) FILTER (WHERE a.type = 'harsh_braking')::int AS harsh_braking,
           count(*) FILTER (WHERE a.type = 'harsh_acceleration')::int AS harsh_acceleration,
           count(*) FILTER (WHERE a.type = 'overspeed')::int AS overspeed
      FROM alerts AS a
      JOIN w ON a.entity_id = w.vehicle_id AND a.reading_time >= w.w_start AND a.reading_time < w.w_end
     WHERE a.type IN ('harsh_braking', 'harsh_acceleration', 'overspeed') AND a.entity_type = 'vehicle'
       AND a.reading_time >= $1::timestamptz AND a.reading_time < $1::timestamptz + interval '1 day'
     GROUP BY w.driver_id
), counted AS (
    SELECT coalesce(d.driver_id, e.driver_id) AS driver_id, coalesce(d.km, 0) AS km,
           coalesce(e.harsh_braking, 0) AS hb, coalesce(e.harsh_acceleration, 0) AS ha,
           coalesce(e.overspeed, 0) AS os
      FROM distance AS d FULL JOIN events AS e ON e.driver_id = d.driver_id
), penalised AS (
    SELECT *, hb * $2::float8 + ha * $3::float8 + os * $4::float8 AS penalty FROM counted
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


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), timezone.utc)


async def claim_dirty_hours(
    conn: asyncpg.Connection, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    lock_patience: float = LOCK_PATIENCE_SECONDS,
) -> bool:
    """Moves every mark of ``driver_score_dirty_hours`` into ``driver_score_queue``, once
    the transactions that marked have ended (a writer whose ``ON CONFLICT DO NOTHING``
    found its hour marked already is then committed, and one marking later adds a fresh
    mark). Commits; returns False when the lock stayed busy (marks left for next time)."""

    async def claim(c: asyncpg.Connection) -> None:
        await c.execute("LOCK TABLE driver_score_dirty_hours IN EXCLUSIVE MODE")
        await c.execute(_CLAIM)

    done, _ = await in_lock_timeout(conn, claim, timeout=lock_timeout, patience=lock_patience)
    return done


async def measure_hour(conn: asyncpg.Connection, hour: datetime, rules: ScoreRules) -> None:
    """Replaces the ``driver_hourly_distance`` rows of one UTC hour (in the caller's transaction)."""
    rows = await conn.fetch(_HOUR_DISTANCES, hour, JUMP_MIN_DISTANCE_M, rules.max_gps_speed_kmh)
    await conn.execute(_CLEAR_HOUR, hour)
    if rows:
        await conn.execute(_STORE_HOUR, hour, [r["driver_id"] for r in rows], [r["vehicle_id"] for r in rows],
                           [r["distance_m"] for r in rows])


async def score_day(conn: asyncpg.Connection, day: date, rules: ScoreRules) -> int:
    """Recomputes the rows of one UTC day from its hourly distances and its alerts (in
    the caller's transaction); returns how many rows were inserted, changed or removed."""
    rows = await conn.fetch(_DAY_ROWS, _midnight(day), rules.penalty_harsh_braking,
                            rules.penalty_harsh_acceleration, rules.penalty_overspeed)
    drivers = [r["driver_id"] for r in rows]
    changed = await conn.fetch(_UPSERT, day, drivers, *([r[c] for r in rows] for c in _COLUMNS))
    removed = await conn.fetch(_DELETE_OTHERS, day, drivers)
    return len(changed) + len(removed)


async def refresh_driver_scores(
    conn: asyncpg.Connection, rules: ScoreRules, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    lock_patience: float = LOCK_PATIENCE_SECONDS,
) -> ScoresReport:
    """Claims the marked hours and, one UTC day per transaction (which also takes the
    day's hours off the queue), recomputes their distances and the day's rows; then
    removes the hourly distances before the raw horizon. Call outside a transaction.
    Idempotent and safe to run concurrently with ingestion. Raises asyncpg errors."""
    if conn.is_in_transaction():
        raise RuntimeError("refresh_driver_scores commits its own transactions: call it outside one")
    report = ScoresReport()
    report.claim_deferred = not await claim_dirty_hours(conn, lock_timeout=lock_timeout, lock_patience=lock_patience)
    for row in await conn.fetch(_QUEUED_DAYS):
        midnight = row["day"]
        async with conn.transaction():
            hours = sorted(r["hour"] for r in await conn.fetch(_TAKE_DAY, midnight))
            horizons = await read_horizons(conn)
            kept = [h for h in hours if horizons.raw_kept(h)]
            if not kept:
                report.days_past_retention += bool(hours)  # raw readings gone: the rows stay as they are
                continue
            for hour in kept:
                await measure_hour(conn, hour, rules)
            report.hours += len(kept)
            report.rows_changed += await score_day(conn, midnight.astimezone(timezone.utc).date(), rules)
            report.days += 1
    horizon = (await read_horizons(conn)).raw
    if horizon is not None:
        await conn.execute(_FORGET_OLD, horizon)
    report.pending_hours = int(await conn.fetchval(_PENDING))
    return report


async def pending_hours(conn: asyncpg.Connection) -> int:
    """Hours marked or queued and not recomputed yet."""
    return int(await conn.fetchval(_PENDING))


async def score_drivers(ctx: PassContext) -> None:
    """The pass step: recomputes the scores of the marked hours' days (with ``dry_run``: counts the hours)."""
    if ctx.dry_run:
        ctx.report.driver_scores = ScoresReport(pending_hours=await pending_hours(ctx.conn))
        return
    ctx.report.driver_scores = await refresh_driver_scores(
        ctx.conn, ctx.policy.scores, lock_timeout=ctx.policy.lock_timeout_seconds,
        lock_patience=ctx.policy.lock_patience_seconds)
    if ctx.report.driver_scores.claim_deferred:
        ctx.report.deferred.append("claiming driver score hours")
