"""Given telemetry in PostgreSQL and a clock, when ``fleet maintain`` passes run, then
partitions exist ahead, the rollups equal a from-scratch aggregate of the raw rows, and
raw data past retention goes only once it is rolled up.

Every test works in a database of its own (copied from a migrated template), because a
pass acts on the whole database: with a clock weeks ahead it would drop the partitions
the other tests of the session rely on.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio

from fleet_telemetry.consumers.sink import TelemetrySink, create_pool
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.core.metrics import MaintainMetrics
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.lifecycle.policy import LifecyclePolicy, day_start
from fleet_telemetry.lifecycle.report import PassReport
from fleet_telemetry.lifecycle.rollups import fold_into_rollups, refresh_dirty_rollups
from fleet_telemetry.lifecycle.run import Maintainer, run_pass
from tests.databases import create_database, drop_database

pytestmark = pytest.mark.integration

POLICY = LifecyclePolicy(lock_timeout_seconds=0.3, lock_patience_seconds=0.2)
FIELDS = ("samples", "avg_speed", "min_speed", "max_speed", "avg_fuel", "first_fuel", "last_fuel",
          "distance_km", "first_location", "first_time", "last_location", "last_time")


@pytest_asyncio.fixture(scope="module")
async def template(base_settings: Settings) -> AsyncIterator[str]:
    """A migrated database that each test copies."""
    name = f"fleet_test_maint_tmpl_{uuid.uuid4().hex[:8]}"
    try:
        await create_database(base_settings.database_url, name, migrate=True)
        yield name
    finally:
        await drop_database(base_settings.database_url, name)


@pytest_asyncio.fixture
async def own_url(base_settings: Settings, template: str) -> AsyncIterator[str]:
    """A database of this test's own, migrated (the migration's partitions are -31..+7 days
    around the day the template was made)."""
    name = f"fleet_test_maint_{uuid.uuid4().hex[:10]}"
    try:
        yield await create_database(base_settings.database_url, name, template=template)
    finally:
        await drop_database(base_settings.database_url, name)


@pytest_asyncio.fixture
async def conn(own_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(own_url)
    try:
        yield c
    finally:
        await c.close()


@pytest_asyncio.fixture
async def sink(own_url: str) -> AsyncIterator[TelemetrySink]:
    pool = await create_pool(own_url, min_size=1, max_size=2)
    try:
        yield TelemetrySink(pool)
    finally:
        await pool.close()


Vehicles = Callable[[int], Awaitable[list[uuid.UUID]]]


@pytest_asyncio.fixture
async def vehicles(conn: asyncpg.Connection) -> Vehicles:
    async def make(n: int) -> list[uuid.UUID]:
        ids = [uuid.uuid4() for _ in range(n)]
        await conn.executemany(
            "INSERT INTO vehicles (id, vin, license_plate, make, model, year) VALUES ($1, $2, $3, 'MAN', 'TGX', 2021)",
            [(v, v.hex[:17].upper(), "M-" + v.hex[:8].upper()) for v in ids],
        )
        return ids

    return make


def today() -> date:
    return datetime.now(timezone.utc).date()


def at(day: date, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=timezone.utc)


def reading(vid: uuid.UUID, when: datetime, lon: float, lat: float, speed: float | None = None,
            fuel: float | None = None) -> Reading:
    return Reading(vehicle_id=vid, time=when, lat=lat, lon=lon, speed=speed, fuel_level=fuel, heading=None,
                   odometer_km=None, engine_status=None, source=Source("test", 0, 0), key=None, raw=b"{}")


def drive(vid: uuid.UUID, start: datetime, count: int, step: timedelta, rng: random.Random) -> list[Reading]:
    """A vehicle's track: a point every ``step``, some readings without speed or fuel."""
    lon, lat = 13.0 + rng.random(), 52.0 + rng.random()
    out = []
    for i in range(count):
        lon += rng.uniform(-0.01, 0.01)
        lat += rng.uniform(-0.01, 0.01)
        speed = None if rng.random() < 0.2 else round(rng.uniform(0, 120), 1)
        fuel = None if rng.random() < 0.3 else round(rng.uniform(10, 100), 1)
        out.append(reading(vid, start + step * i, lon, lat, speed, fuel))
    return out


async def insert_raw(conn: asyncpg.Connection, readings: list[Reading], *, mark: bool = True) -> None:
    """Writes readings as a writer other than the sink would: rows plus their dirty hours."""
    await conn.executemany(
        "INSERT INTO vehicle_telemetry (time, vehicle_id, location, speed, fuel_level)"
        " VALUES ($1, $2, ST_SetSRID(ST_MakePoint($3, $4), 4326), $5, $6)",
        [(r.time, r.vehicle_id, r.lon, r.lat, r.speed, r.fuel_level) for r in readings],
    )
    if mark:
        await conn.execute(
            "INSERT INTO telemetry_dirty_hours (hour) SELECT DISTINCT date_trunc('hour', t, 'UTC')"
            " FROM unnest($1::timestamptz[]) AS t ON CONFLICT DO NOTHING",
            [r.time for r in readings],
        )


# An aggregate from scratch over the raw rows, written independently of schema.rollups.
FROM_SCRATCH = """
WITH points AS (
    SELECT vehicle_id, time, speed, fuel_level, location, date_trunc($2, time, 'UTC') AS bucket
      FROM {source} WHERE vehicle_id = ANY($1::uuid[])
), steps AS (
    SELECT *, lag(location) OVER (PARTITION BY vehicle_id, bucket ORDER BY time) AS previous FROM points
), firsts AS (
    SELECT DISTINCT ON (vehicle_id, bucket) vehicle_id, bucket, ST_AsText(location) AS first_location
      FROM points ORDER BY vehicle_id, bucket, time
), lasts AS (
    SELECT DISTINCT ON (vehicle_id, bucket) vehicle_id, bucket, ST_AsText(location) AS last_location
      FROM points ORDER BY vehicle_id, bucket, time DESC
), first_fuel AS (
    SELECT DISTINCT ON (vehicle_id, bucket) vehicle_id, bucket, fuel_level AS first_fuel
      FROM points WHERE fuel_level IS NOT NULL ORDER BY vehicle_id, bucket, time
), last_fuel AS (
    SELECT DISTINCT ON (vehicle_id, bucket) vehicle_id, bucket, fuel_level AS last_fuel
      FROM points WHERE fuel_level IS NOT NULL ORDER BY vehicle_id, bucket, time DESC
)
SELECT s.vehicle_id, s.bucket, count(*) AS samples, avg(speed) AS avg_speed, min(speed) AS min_speed,
       max(speed) AS max_speed, avg(fuel_level) AS avg_fuel, min(ff.first_fuel) AS first_fuel,
       min(lf.last_fuel) AS last_fuel,
       coalesce(sum(ST_Distance(previous::geography, location::geography)), 0) / 1000 AS distance_km,
       min(f.first_location) AS first_location, min(time) AS first_time,
       min(l.last_location) AS last_location, max(time) AS last_time
  FROM steps s
  JOIN firsts f USING (vehicle_id, bucket) JOIN lasts l USING (vehicle_id, bucket)
  LEFT JOIN first_fuel ff USING (vehicle_id, bucket) LEFT JOIN last_fuel lf USING (vehicle_id, bucket)
 GROUP BY s.vehicle_id, s.bucket
"""


async def from_scratch(
    conn: asyncpg.Connection, ids: list[uuid.UUID], unit: str, source: str = "vehicle_telemetry"
) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows = await conn.fetch(FROM_SCRATCH.format(source=source), ids, unit)
    return {(r["vehicle_id"], r["bucket"]): {f: r[f] for f in FIELDS} for r in rows}


async def rollups(conn: asyncpg.Connection, ids: list[uuid.UUID], table: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT *, ST_AsText(first_location) AS first_location, ST_AsText(last_location) AS last_location"
        f" FROM {table} WHERE vehicle_id = ANY($1::uuid[])",
        ids,
    )
    return {(r["vehicle_id"], r["bucket"]): {f: r[f] for f in FIELDS} for r in rows}


def assert_same(got: dict[tuple[Any, ...], dict[str, Any]], want: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    assert set(got) == set(want)
    for key, expected in want.items():
        for name, value in expected.items():
            actual = got[key][name]
            if isinstance(value, float):
                assert actual == pytest.approx(value, rel=1e-9, abs=1e-9), (key, name)
            else:
                assert actual == value, (key, name)


async def partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'vehicle_telemetry'::regclass"
    )
    return {r["relname"] for r in rows}


async def pass_at(conn: asyncpg.Connection, now: datetime, **kwargs: Any) -> PassReport:
    return await run_pass(conn, POLICY, now=now, **kwargs)


# --- partitions ---------------------------------------------------------------------------


async def test_partitions_appear_ahead_of_time(conn: asyncpg.Connection) -> None:
    clock = datetime.now(timezone.utc) + timedelta(days=20)
    wanted = {f"vehicle_telemetry_p{clock.date() + timedelta(days=i):%Y%m%d}" for i in range(8)}
    assert not wanted <= await partitions(conn)

    report = await pass_at(conn, clock)

    assert wanted <= await partitions(conn)
    assert set(report.telemetry_partitions_created) == wanted - {
        f"vehicle_telemetry_p{today() + timedelta(days=i):%Y%m%d}" for i in range(8)
    }
    months = {clock.date().replace(day=1)}
    month = clock.date().replace(day=1)
    for _ in range(2):
        month = (month + timedelta(days=32)).replace(day=1)
        months.add(month)
    audit = {r["relname"] for r in await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'audit_logs'::regclass")}
    assert {f"audit_logs_p{m:%Y%m}" for m in months} <= audit
    again = await pass_at(conn, clock)
    assert again.telemetry_partitions_created == [] and again.audit_partitions_created == []
    assert again.telemetry_partitions_until == day_start(clock.date() + timedelta(days=8))


async def test_no_row_is_lost_between_the_default_partition_and_a_new_one(
    conn: asyncpg.Connection, own_url: str
) -> None:
    day = today() + timedelta(days=12)  # beyond the migration's partitions: rows go to the default one
    vehicle = uuid.uuid4()
    written = 0
    stop = asyncio.Event()

    async def write() -> None:
        nonlocal written
        writer = await asyncpg.connect(own_url)
        try:
            while not stop.is_set() or written < 40:
                await insert_raw(writer, [reading(vehicle, at(day, 0) + timedelta(seconds=written), 13.4, 52.5, 50.0)])
                written += 1
                await asyncio.sleep(0.002)
        finally:
            await writer.close()

    writing = asyncio.create_task(write())
    while written < 20:
        await asyncio.sleep(0.01)
    report = await pass_at(conn, datetime.now(timezone.utc) + timedelta(days=6))
    stop.set()
    await writing

    name = f"vehicle_telemetry_p{day:%Y%m%d}"
    assert report.rows_moved.get(name, 0) >= 20
    where = await conn.fetch(
        "SELECT tableoid::regclass::text AS part, count(*) AS n FROM vehicle_telemetry"
        " WHERE vehicle_id = $1 GROUP BY 1",
        vehicle,
    )
    assert {r["part"]: r["n"] for r in where} == {name: written}


# --- rollups ----------------------------------------------------------------------------


async def test_rollups_equal_a_from_scratch_aggregate_after_late_and_duplicate_readings(
    conn: asyncpg.Connection, sink: TelemetrySink, vehicles: Vehicles
) -> None:
    rng = random.Random(6)
    ids = await vehicles(3)
    now = datetime.now(timezone.utc)
    start = at(today() - timedelta(days=1), 21)  # across midnight: two days, five hours
    tracks = {v: drive(v, start, 60, timedelta(minutes=5), rng) for v in ids}
    on_time = [r for v in ids for r in tracks[v] if r.time.minute % 10 == 0]
    late = [r for v in ids for r in tracks[v] if r.time.minute % 10 != 0]

    await sink.write(on_time[: len(on_time) // 2])
    first = await pass_at(conn, now)
    assert first.rollups.hours > 0 and first.rollups.days > 0
    await sink.write(on_time[len(on_time) // 2:])
    await sink.write(late[::2])  # late readings into hours already rolled up
    await pass_at(conn, now)
    duplicates = [reading(r.vehicle_id, r.time, r.lon + 1, r.lat, 999.0, 1.0) for r in on_time[::3]]
    outcome = await sink.write(duplicates + late[1::2] + late[::4])  # other payloads, same identities
    assert len(outcome.duplicates) == len(duplicates) + len(late[::4])
    await pass_at(conn, now)

    assert_same(await rollups(conn, ids, "vehicle_telemetry_hourly"), await from_scratch(conn, ids, "hour"))
    assert_same(await rollups(conn, ids, "vehicle_telemetry_daily"), await from_scratch(conn, ids, "day"))
    assert await conn.fetchval("SELECT count(*) FROM telemetry_dirty_hours") == 0
    assert await conn.fetchval("SELECT count(*) FROM telemetry_rollup_queue") == 0


async def test_a_late_reading_for_last_week_updates_exactly_that_hour_and_day(
    conn: asyncpg.Connection, sink: TelemetrySink, vehicles: Vehicles
) -> None:
    rng = random.Random(7)
    ids = await vehicles(2)
    last_week = today() - timedelta(days=7)
    for day in (last_week, today() - timedelta(days=1)):
        await sink.write([r for v in ids for r in drive(v, at(day, 8), 36, timedelta(minutes=10), rng)])
    await pass_at(conn, datetime.now(timezone.utc))
    hourly_before = await rollups(conn, ids, "vehicle_telemetry_hourly")
    daily_before = await rollups(conn, ids, "vehicle_telemetry_daily")

    late = reading(ids[0], at(last_week, 9, 17, 30), 13.5, 52.5, speed=150.0, fuel=5.0)
    await sink.write([late])
    report = await pass_at(conn, datetime.now(timezone.utc))

    assert (report.rollups.hours, report.rollups.days) == (1, 1)
    hourly_after = await rollups(conn, ids, "vehicle_telemetry_hourly")
    daily_after = await rollups(conn, ids, "vehicle_telemetry_daily")
    changed_hours = {k for k in hourly_after if hourly_after[k] != hourly_before.get(k)}
    changed_days = {k for k in daily_after if daily_after[k] != daily_before.get(k)}
    assert changed_hours == {(ids[0], at(last_week, 9))}
    assert changed_days == {(ids[0], at(last_week, 0))}
    assert hourly_after[(ids[0], at(last_week, 9))]["max_speed"] == 150.0
    assert_same(hourly_after, await from_scratch(conn, ids, "hour"))
    assert_same(daily_after, await from_scratch(conn, ids, "day"))


async def test_a_mark_that_arrives_while_hours_are_claimed_is_not_lost(
    conn: asyncpg.Connection, own_url: str, vehicles: Vehicles
) -> None:
    """A sink transaction that found its hour already marked (ON CONFLICT DO NOTHING)
    and commits after the maintainer read the hour's raw rows must still be rolled up."""
    [vehicle] = await vehicles(1)
    hour = at(today(), 0)
    await insert_raw(conn, [reading(vehicle, hour + timedelta(minutes=1), 13.4, 52.5, 10.0)])
    other = await asyncpg.connect(own_url)
    try:
        sink_tx = other.transaction()
        await sink_tx.start()
        await insert_raw(other, [reading(vehicle, hour + timedelta(minutes=2), 13.5, 52.5, 90.0)])  # mark exists
        refreshing = asyncio.create_task(refresh_dirty_rollups(conn, lock_timeout=5.0, lock_patience=0.0))
        await asyncio.sleep(0.3)  # the claim waits for the in-flight sink transaction
        assert not refreshing.done()
        await sink_tx.commit()
        await refreshing
    finally:
        await other.close()
    row = await conn.fetchrow("SELECT samples, max_speed FROM vehicle_telemetry_hourly WHERE vehicle_id = $1", vehicle)
    assert (row["samples"], row["max_speed"]) == (2, 90.0)


# --- retention --------------------------------------------------------------------------


async def test_raw_partitions_past_retention_go_only_after_their_rollups_exist(
    conn: asyncpg.Connection, own_url: str, vehicles: Vehicles
) -> None:
    rng = random.Random(8)
    ids = await vehicles(2)
    old = today() - timedelta(days=31)  # its whole day is more than 30 days old
    name = f"vehicle_telemetry_p{old:%Y%m%d}"
    await insert_raw(conn, [r for v in ids for r in drive(v, at(old, 10), 30, timedelta(minutes=4), rng)])
    blocker = await asyncpg.connect(own_url)
    try:
        in_flight = blocker.transaction()  # a sink transaction that has marked and not committed
        await in_flight.start()
        await insert_raw(blocker, [reading(ids[0], at(old, 23, 59), 13.0, 52.0, 33.0, 44.0)])

        held = await pass_at(conn, datetime.now(timezone.utc))

        assert "claiming dirty hours" in held.deferred
        assert name in held.raw_partitions_kept and name not in held.raw_partitions_dropped
        assert name in await partitions(conn)
        await in_flight.commit()
    finally:
        await blocker.close()
    want_hourly = await from_scratch(conn, ids, "hour")
    want_daily = await from_scratch(conn, ids, "day")

    done = await pass_at(conn, datetime.now(timezone.utc))

    assert name in done.raw_partitions_dropped
    assert name not in await partitions(conn)
    assert await conn.fetchval("SELECT to_regclass($1)", name) is None
    assert await conn.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = ANY($1::uuid[])", ids) == 0
    assert_same(await rollups(conn, ids, "vehicle_telemetry_hourly"), want_hourly)
    assert_same(await rollups(conn, ids, "vehicle_telemetry_daily"), want_daily)
    assert await conn.fetchval("SELECT raw_horizon FROM telemetry_lifecycle") == at(old + timedelta(days=1), 0)


async def test_folding_into_a_dropped_day_merges_once_and_later_passes_never_wipe_it(
    conn: asyncpg.Connection, vehicles: Vehicles
) -> None:
    [vehicle] = await vehicles(1)
    old = today() - timedelta(days=31)
    track = [reading(vehicle, at(old, 10, 10 * i), 13.0 + i / 100, 52.0, 40.0 + i, 80.0 - i) for i in range(6)]
    await insert_raw(conn, track[:4])
    await pass_at(conn, datetime.now(timezone.utc))  # rolls up, then drops the day
    assert f"vehicle_telemetry_p{old:%Y%m%d}" not in await partitions(conn)

    # Two backfilled readings after the last one of 10:00, and one in a new hour.
    backfill = [*track[4:], reading(vehicle, at(old, 13, 5), 13.2, 52.1, 0.0, None)]
    assert await fold_into_rollups(conn, backfill) == 3
    assert await fold_into_rollups(conn, backfill) == 0  # a second fold is a no-op

    # What a from-scratch aggregate of all readings would say, computed in a scratch table.
    await conn.execute("CREATE TABLE scratch_points (LIKE vehicle_telemetry)")
    await conn.executemany(
        "INSERT INTO scratch_points (time, vehicle_id, location, speed, fuel_level)"
        " VALUES ($1, $2, ST_SetSRID(ST_MakePoint($3, $4), 4326), $5, $6)",
        [(r.time, r.vehicle_id, r.lon, r.lat, r.speed, r.fuel_level) for r in [*track, backfill[-1]]],
    )
    want_hourly = await from_scratch(conn, [vehicle], "hour", source="scratch_points")
    want_daily = await from_scratch(conn, [vehicle], "day", source="scratch_points")
    assert_same(await rollups(conn, [vehicle], "vehicle_telemetry_hourly"), want_hourly)
    assert_same(await rollups(conn, [vehicle], "vehicle_telemetry_daily"), want_daily)

    # A reading that still slips into the dropped day (a consumer whose clock lags) lands
    # in the default partition; the next pass folds it and removes the stray row.
    stray = reading(vehicle, at(old, 13, 30), 13.3, 52.1, 20.0, 50.0)
    await insert_raw(conn, [stray])
    report = await pass_at(conn, datetime.now(timezone.utc))
    assert (report.rollups.late_hours, report.rollups.folded_readings) == (1, 1)
    assert await conn.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = $1", vehicle) == 0
    daily = await conn.fetchrow("SELECT samples, last_fuel FROM vehicle_telemetry_daily WHERE vehicle_id = $1", vehicle)
    assert (daily["samples"], daily["last_fuel"]) == (8, 50.0)
    hours = await conn.fetch("SELECT bucket, samples FROM vehicle_telemetry_hourly WHERE vehicle_id = $1 ORDER BY 1",
                             vehicle)
    assert [(r["bucket"].hour, r["samples"]) for r in hours] == [(10, 6), (13, 2)]


async def test_a_fold_into_a_kept_day_stores_raw_rows_for_the_next_refresh(
    conn: asyncpg.Connection, vehicles: Vehicles
) -> None:
    [vehicle] = await vehicles(1)
    day = today() - timedelta(days=3)
    readings = [reading(vehicle, at(day, 4, i), 10.0, 50.0 + i / 100, 60.0, 70.0) for i in range(3)]
    async with conn.transaction():  # as the replay tool calls it
        assert await fold_into_rollups(conn, readings) == 3
    assert await fold_into_rollups(conn, readings) == 0
    await refresh_dirty_rollups(conn)
    assert_same(await rollups(conn, [vehicle], "vehicle_telemetry_daily"), await from_scratch(conn, [vehicle], "day"))

    # Readings deleted by hand: the next recompute of their hour forgets them too.
    await conn.execute("DELETE FROM vehicle_telemetry WHERE vehicle_id = $1", vehicle)
    await conn.execute("INSERT INTO telemetry_dirty_hours (hour) VALUES ($1)", at(day, 4))
    await refresh_dirty_rollups(conn)
    assert await rollups(conn, [vehicle], "vehicle_telemetry_hourly") == {}
    assert await rollups(conn, [vehicle], "vehicle_telemetry_daily") == {}


async def test_hourly_rollups_past_a_year_go_and_their_days_stay(conn: asyncpg.Connection, vehicles: Vehicles) -> None:
    [vehicle] = await vehicles(1)
    now = datetime.now(timezone.utc)
    ancient = today() - timedelta(days=400)
    columns = ("vehicle_id, bucket, samples, speed_samples, avg_speed, min_speed, max_speed, fuel_samples,"
               " avg_fuel, distance_km, first_time, last_time, first_location, last_location")
    values = ("$1, $2::timestamptz, 4, 4, 50.0, 40.0, 60.0, 0, NULL, 1.5, $2, $2 + interval '30 minutes',"
              " ST_SetSRID(ST_MakePoint(13, 52), 4326), ST_SetSRID(ST_MakePoint(13.01, 52), 4326)")
    for hour in (9, 10):
        await conn.execute(f"INSERT INTO vehicle_telemetry_hourly ({columns}) VALUES ({values})",
                           vehicle, at(ancient, hour))
    await conn.execute(f"INSERT INTO vehicle_telemetry_daily ({columns}) VALUES ({values})", vehicle, at(ancient, 0))

    report = await pass_at(conn, now)

    assert report.hourly_rows_removed == 2
    assert await conn.fetchval("SELECT count(*) FROM vehicle_telemetry_hourly WHERE vehicle_id = $1", vehicle) == 0
    assert await conn.fetchval("SELECT samples FROM vehicle_telemetry_daily WHERE vehicle_id = $1", vehicle) == 4
    # A backfill for that day now merges into the day itself; the day is never recomputed
    # from the (gone) hours.
    assert await fold_into_rollups(conn, [reading(vehicle, at(ancient, 23), 13.02, 52.0, 70.0)]) == 1
    day = await conn.fetchrow("SELECT samples, max_speed, avg_speed FROM vehicle_telemetry_daily WHERE vehicle_id = $1",
                              vehicle)
    assert (day["samples"], day["max_speed"], day["avg_speed"]) == (5, 70.0, 54.0)
    await pass_at(conn, now)
    assert await conn.fetchval("SELECT samples FROM vehicle_telemetry_daily WHERE vehicle_id = $1", vehicle) == 5


# --- running it ---------------------------------------------------------------------------


async def test_two_concurrent_fleet_maintain_runs_do_not_conflict(
    conn: asyncpg.Connection, own_url: str, vehicles: Vehicles
) -> None:
    rng = random.Random(9)
    ids = await vehicles(2)
    old = today() - timedelta(days=31)
    stray_day = today() + timedelta(days=10)
    await insert_raw(conn, [r for v in ids for r in drive(v, at(old, 20), 20, timedelta(minutes=10), rng)])
    await insert_raw(conn, [r for v in ids for r in drive(v, at(today(), 0), 20, timedelta(minutes=10), rng)])
    await insert_raw(conn, [r for v in ids for r in drive(v, at(stray_day, 1), 5, timedelta(minutes=1), rng)])
    want_hourly = await from_scratch(conn, ids, "hour")

    env = {**os.environ, "FLEET_DATABASE_URL": own_url, "FLEET_LOG_LEVEL": "warning"}
    runs = [
        await asyncio.create_subprocess_exec(sys.executable, "-m", "fleet_telemetry.cli", "maintain", "--json", env=env,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(run.communicate() for run in runs)), timeout=120)

    assert [run.returncode for run in runs] == [0, 0], [err.decode() for _, err in outputs]
    reports = [orjson.loads(out) for out, _ in outputs]
    dropped = [name for r in reports for name in r["raw_partitions_dropped"]]
    moved = [name for r in reports for name in r["rows_moved"]]
    assert dropped == [f"vehicle_telemetry_p{old:%Y%m%d}"]
    assert moved == [f"vehicle_telemetry_p{stray_day:%Y%m%d}"]
    assert sum(r["rollups"]["hours"] for r in reports) == len({bucket for _, bucket in want_hourly})
    assert_same(await rollups(conn, ids, "vehicle_telemetry_hourly"), want_hourly)
    assert await conn.fetchval("SELECT count(*) FROM vehicle_telemetry_default") == 0


async def test_a_dry_run_reports_and_changes_nothing(conn: asyncpg.Connection, vehicles: Vehicles) -> None:
    [vehicle] = await vehicles(1)
    old = today() - timedelta(days=31)
    await insert_raw(conn, [reading(vehicle, at(old, 5), 1.0, 1.0, 1.0)])
    await insert_raw(conn, [reading(vehicle, at(today() + timedelta(days=11), 5), 1.0, 1.0, 1.0)])
    state = ("SELECT (SELECT count(*) FROM telemetry_dirty_hours), (SELECT count(*) FROM vehicle_telemetry_default),"
             " (SELECT count(*) FROM pg_class WHERE relname LIKE 'vehicle_telemetry_p%'),"
             " (SELECT count(*) FROM vehicle_telemetry_hourly)")
    before = await conn.fetchrow(state)

    report = await pass_at(conn, datetime.now(timezone.utc) + timedelta(days=1), dry_run=True)

    assert tuple(await conn.fetchrow(state)) == tuple(before)
    lines = report.lines()
    assert f"would move 1 default-partition rows into vehicle_telemetry_p{today() + timedelta(days=11):%Y%m%d}" in lines
    assert f"would drop partition vehicle_telemetry_p{old:%Y%m%d} (past the raw retention)" in lines
    assert f"would create partition vehicle_telemetry_p{today() + timedelta(days=8):%Y%m%d}" in lines
    assert any(line.startswith("would roll up 2 dirty hours") for line in lines)
    assert lines[-1] == "dry run: nothing was changed"


async def test_metrics_and_the_nightly_stats_refresh_follow_the_clock(
    conn: asyncpg.Connection, own_url: str, base_settings: Settings, vehicles: Vehicles
) -> None:
    [vehicle] = await vehicles(1)
    await insert_raw(conn, [reading(vehicle, at(today(), 0, 5), 1.0, 1.0, 1.0)])
    await conn.execute("INSERT INTO maintenance_records (vehicle_id, type, cost, date) VALUES ($1, 'tyres', 420, $2)",
                       vehicle, today())
    clock = [at(today(), 3, 30)]
    metrics = MaintainMetrics()
    maintainer = Maintainer(base_settings.model_copy(update={"database_url": own_url}),
                            clock=lambda: clock[0], metrics=metrics)

    first = await maintainer.run_once()
    clock[0] = at(today(), 9)
    same_day = await maintainer.run_once()
    clock[0] = at(today() + timedelta(days=1), 2, 59)
    before_slot = await maintainer.run_once()
    clock[0] = at(today() + timedelta(days=1), 3, 1)
    next_night = await maintainer.run_once()

    assert [r.stats_refreshed for r in (first, same_day, before_slot, next_night)] == [True, False, False, True]
    assert await conn.fetchval("SELECT total_cost FROM monthly_vehicle_stats WHERE vehicle_id = $1", vehicle) == 420
    assert metrics.value("fleet_maintain_passes_total", outcome="success") == 4
    assert metrics.value("fleet_maintain_rollup_recomputes_total") == 1
    assert metrics.value("fleet_maintain_partitions_created_total", table="vehicle_telemetry") >= 1
    assert metrics.value("fleet_maintain_partitions_dropped_total", table="vehicle_telemetry") >= 1
    assert metrics.value("fleet_maintain_last_success_timestamp_seconds") > 0
    assert metrics.value("fleet_maintain_rollup_lag_seconds") == 0
    assert metrics.value("fleet_maintain_telemetry_partitions_until_timestamp_seconds") == \
        day_start(today() + timedelta(days=9)).timestamp()
    last = await conn.fetchval("SELECT last_success_at FROM maintenance_runs WHERE task = 'pass'")
    assert last == clock[0]


async def test_the_nightly_refresh_brings_the_monthly_revenue_up_to_date_too(
    conn: asyncpg.Connection, own_url: str, base_settings: Settings, vehicles: Vehicles
) -> None:
    [vehicle] = await vehicles(1)
    delivered = at(today(), 1)
    customer = await conn.fetchval("INSERT INTO customers (name) VALUES ('Acme') RETURNING id")
    driver = await conn.fetchval("INSERT INTO drivers (name) VALUES ('Dana') RETURNING id")
    assignment = await conn.fetchval(
        "INSERT INTO vehicle_assignments (vehicle_id, driver_id, start_time, end_time, status)"
        " VALUES ($1, $2, $3, $4, 'COMPLETED') RETURNING id", vehicle, driver, delivered - timedelta(hours=1),
        delivered + timedelta(hours=1))
    await conn.executemany(
        "INSERT INTO transport_jobs (customer_id, status, agreed_price, currency, assignment_id, delivered_at)"
        " VALUES ($1, 'delivered', $2, 'EUR', $3, $4)",
        [(customer, 1200, assignment, delivered), (customer, 300, assignment, delivered)])
    maintainer = Maintainer(base_settings.model_copy(update={"database_url": own_url}), clock=lambda: at(today(), 4))

    report = await maintainer.run_once()

    assert report.stats_refreshed
    row = await conn.fetchrow("SELECT month, revenue, jobs FROM monthly_vehicle_revenue WHERE vehicle_id = $1",
                              vehicle)
    assert dict(row) == {"month": today().replace(day=1), "revenue": 1500, "jobs": 2}
    assert {"refreshed monthly_vehicle_stats", "refreshed monthly_vehicle_revenue"} <= set(report.lines())


async def test_every_runs_passes_serves_metrics_and_stops_on_sigterm(own_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "FLEET_DATABASE_URL": own_url, "FLEET_MAINTAIN_METRICS_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleet_telemetry.cli", "maintain", "--every", "0.5s", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )

    def scrape() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                return str(answer.read().decode())
        except OSError:
            return ""

    def passes(text: str) -> float:
        found = re.search(r'^fleet_maintain_passes_total\{outcome="success"\} (\S+)$', text, re.MULTILINE)
        return float(found[1]) if found else 0.0

    try:
        text = ""
        for _ in range(120):
            text = await asyncio.to_thread(scrape)
            if passes(text) >= 2:
                break
            await asyncio.sleep(0.25)
        assert passes(text) >= 2
        assert "fleet_maintain_rollup_lag_seconds 0.0" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()


async def test_every_serves_metrics_only_on_fleet_metrics_address(own_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "FLEET_DATABASE_URL": own_url, "FLEET_MAINTAIN_METRICS_PORT": str(port),
           "FLEET_METRICS_ADDRESS": "127.0.0.2"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleet_telemetry.cli", "maintain", "--every", "1h", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )

    def answers(host: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as answer:
                return b"fleet_maintain_passes_total" in answer.read()
        except OSError:
            return False

    try:
        for _ in range(120):
            if await asyncio.to_thread(answers, "127.0.0.2"):
                break
            await asyncio.sleep(0.25)
        assert await asyncio.to_thread(answers, "127.0.0.2")
        assert not await asyncio.to_thread(answers, "127.0.0.1")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()


# --- the outbound events' retention ---------------------------------------------------------


async def test_published_events_past_retention_go_and_unpublished_ones_stay(conn: asyncpg.Connection) -> None:
    now = datetime(2026, 6, 10, 12, tzinfo=timezone.utc)
    vehicle = uuid.uuid4()
    rows = {  # name: (published_at, created_at)
        "old_published": (now - timedelta(days=91), now - timedelta(days=91)),
        "recent_published": (now - timedelta(days=89), now - timedelta(days=89)),
        "old_unpublished": (None, now - timedelta(days=200)),
    }
    ids = {name: uuid.uuid4() for name in rows}
    for name, (published, created) in rows.items():
        await conn.execute(
            "INSERT INTO fleet_events (id, type, vehicle_id, time, data, created_at, published_at)"
            " VALUES ($1, 'trip.started', $2, $3, '{}', $3, $4)", ids[name], vehicle, created, published)

    planned = await pass_at(conn, now, dry_run=True)
    assert planned.events_removed == 1
    assert "would remove 1 published events past retention" in planned.lines()
    assert await conn.fetchval("SELECT count(*) FROM fleet_events WHERE vehicle_id = $1", vehicle) == 3

    done = await pass_at(conn, now)
    assert done.events_removed == 1
    assert "removed 1 published events past retention" in done.lines()
    left = {r["id"] for r in await conn.fetch("SELECT id FROM fleet_events WHERE vehicle_id = $1", vehicle)}
    assert left == {ids["recent_published"], ids["old_unpublished"]}

    again = await pass_at(conn, now)
    assert again.events_removed == 0

    keep_all = await run_pass(conn, LifecyclePolicy(events_retention_days=0, lock_timeout_seconds=0.3,
                                                    lock_patience_seconds=0.2), now=now + timedelta(days=365))
    assert keep_all.events_removed == 0
    assert await conn.fetchval("SELECT count(*) FROM fleet_events WHERE vehicle_id = $1", vehicle) == 2
