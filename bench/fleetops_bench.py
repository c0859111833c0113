"""Benchmark of the seed's critical fleet-operations queries on a large fleet.

    python -m bench.fleetops_bench                                   # 10,000 vehicles, 20,000 drivers, 1M assignments
    python -m bench.fleetops_bench --vehicles 1000 --drivers 2000 --assignments 100000 --runs 200   # smaller

It works in a database of its own (``fleet_bench_fleetops`` on the server of
``FLEET_DATABASE_URL``), created afresh, migrated, filled and dropped at the end
(``--keep`` keeps it).

The dataset: ``--vehicles`` vehicles (every 20th in the workshop), ``--drivers`` drivers,
``--assignments`` bookings, the same number per vehicle: one 8-hour shift a day per
vehicle, at an hour of its own, from ``--past-days`` days ago on, so about a third of
the fleet is on duty at any moment; drivers take turns on "their" vehicle (each driver
drives every other day); past shifts are COMPLETED, every 33rd is CANCELLED, the rest
ACTIVE. Every vehicle has a last known position somewhere in a 700 x 850 km box
(Germany), one in ten of them stale (2 hours old); one on-duty assignment in ten carries
an open job.

Measured, each ``--runs`` times after ``--warmup`` runs, one client, one connection,
prepared statements (as the CLI and the services run them):

- available vehicles for a random 2-8 hour window between now and the end of the booked
  period (first 100 by plate);
- the same, restricted to one vehicle type;
- available drivers for a random window (first 100 by name);
- nearest free driver on duty within ``--radius-km`` of a random pickup point (5 nearest);
- available vehicles through ``Database.read()`` (adds BEGIN READ ONLY ... ROLLBACK).

It prints p50/p95/p99/max in milliseconds and one ``EXPLAIN (ANALYZE, BUFFERS)`` per
query, which shows the indexes used. Numbers depend on the machine and on what else
runs on it; the conditions are printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg

from bench.databases import drop, recreate, with_database
from fleet_telemetry.fleetops import queries
from fleet_telemetry.fleetops.db import Database, init_connection
from fleet_telemetry.fleetops.values import Point
from fleet_telemetry.core.logs import configure_logging
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.schema.migrate import apply_migrations

DATABASE = "fleet_bench_fleetops"
BOX = (47.3, 5.9, 55.0, 15.0)  # lat_min, lon_min, lat_max, lon_max
VEHICLE_CHUNK = 1000

# A number in [0, 1) from the md5 of a text: deterministic "random" per row.
_UNIT = "(('x' || substr(md5({0}), 1, 8))::bit(32)::bigint / 4294967296.0)"

_VEHICLES = f"""
INSERT INTO vehicles (id, vin, license_plate, make, model, year, type, status)
SELECT md5('v' || v)::uuid, upper(substr(md5('vin' || v), 1, 17)), 'B-' || lpad(v::text, 6, '0'),
       'Volvo', 'FH16', 2015 + v % 10, CASE WHEN v % 3 = 0 THEN 'van' ELSE 'truck' END,
       CASE WHEN v % 20 = 0 THEN 'maintenance' ELSE 'active' END
  FROM generate_series(0, $1 - 1) AS v
"""
_DRIVERS = """
INSERT INTO drivers (id, name, license_number, status)
SELECT md5('d' || d)::uuid, 'Driver ' || lpad(d::text, 6, '0'), 'DL-' || d, 'active'
  FROM generate_series(0, $1 - 1) AS d
"""
# Vehicles $1..$2, $3 shifts each; shift k of vehicle v starts at $4 + (k - $5) days + its hour;
# driver v + (k % $6) * $7 drives it. Exclusion constraints check every row.
_ASSIGNMENTS = """
INSERT INTO vehicle_assignments (id, vehicle_id, driver_id, start_time, end_time, status)
SELECT md5('a' || v || '-' || k)::uuid, md5('v' || v)::uuid, md5('d' || (v + (k % $6) * $7))::uuid,
       s, s + interval '8 hours',
       CASE WHEN (v * 31 + k) % 33 = 0 THEN 'CANCELLED'
            WHEN s + interval '8 hours' <= now() THEN 'COMPLETED' ELSE 'ACTIVE' END
  FROM generate_series($1::int, $2::int) AS v, generate_series(0, $3 - 1) AS k,
       LATERAL (SELECT $4::timestamptz + make_interval(days => k - $5, hours => (v * 7) % 24)) AS t(s)
"""
_POSITIONS = f"""
INSERT INTO vehicle_positions (vehicle_id, time, location, speed)
SELECT md5('v' || v)::uuid,
       now() - make_interval(secs => CASE WHEN v % 10 = 0 THEN 7200 ELSE (v * 13) % 600 END),
       ST_SetSRID(ST_MakePoint({BOX[1]} + {BOX[3] - BOX[1]} * {_UNIT.format("'lon' || v")},
                               {BOX[0]} + {BOX[2] - BOX[0]} * {_UNIT.format("'lat' || v")}), 4326),
       60
  FROM generate_series(0, $1 - 1) AS v
"""
_CUSTOMERS = "INSERT INTO customers (id, name) SELECT md5('c' || c)::uuid, 'Customer ' || c FROM generate_series(0, 49) c"
_OPEN_JOBS = """
INSERT INTO transport_jobs (customer_id, status, agreed_price, assignment_id)
SELECT md5('c' || (abs(hashtext(a.id::text)) % 50))::uuid, 'in_transit', 900, a.id
  FROM vehicle_assignments a
 WHERE a.status = 'ACTIVE' AND tstzrange(a.start_time, a.end_time, '[)') @> now()
   AND abs(hashtext(a.id::text)) % 10 = 0
"""
_DELIVERED_JOBS = """
INSERT INTO transport_jobs (customer_id, status, agreed_price, assignment_id, delivered_at)
SELECT md5('c' || (abs(hashtext(a.id::text)) % 50))::uuid, 'delivered', 1000 + abs(hashtext(a.id::text)) % 500,
       a.id, a.end_time
  FROM vehicle_assignments a
 WHERE a.status = 'COMPLETED' AND abs(hashtext(a.id::text)) % 20 = 0
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def build(conn: asyncpg.Connection, args: argparse.Namespace, anchor: datetime) -> dict[str, Any]:
    shifts = max(1, args.assignments // args.vehicles)
    rotation = max(1, args.drivers // args.vehicles)
    timings: dict[str, Any] = {}
    started = time.perf_counter()
    await conn.execute(_VEHICLES, args.vehicles)
    await conn.execute(_DRIVERS, args.drivers)
    timings["vehicles_drivers_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for first in range(0, args.vehicles, VEHICLE_CHUNK):
        last = min(args.vehicles, first + VEHICLE_CHUNK) - 1
        await conn.execute(_ASSIGNMENTS, first, last, shifts, anchor, args.past_days, rotation, args.vehicles)
        done = (last + 1) * shifts
        print(f"  assignments: {done:,} of {args.vehicles * shifts:,}"
              f" ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    timings["assignments_s"] = time.perf_counter() - started
    started = time.perf_counter()
    await conn.execute(_POSITIONS, args.vehicles)
    await conn.execute(_CUSTOMERS)
    await conn.execute(_OPEN_JOBS)
    await conn.execute(_DELIVERED_JOBS)
    await conn.execute("VACUUM ANALYZE")
    timings["positions_jobs_analyze_s"] = time.perf_counter() - started
    counts = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM vehicles) AS vehicles, (SELECT count(*) FROM drivers) AS drivers,"
        " (SELECT count(*) FROM vehicle_assignments) AS assignments,"
        " (SELECT count(*) FROM vehicle_assignments WHERE status = 'ACTIVE') AS active_assignments,"
        " (SELECT count(*) FROM vehicle_assignments WHERE status = 'ACTIVE'"
        "    AND tstzrange(start_time, end_time, '[)') @> now()) AS on_duty,"
        " (SELECT count(*) FROM vehicle_positions) AS positions,"
        " (SELECT count(*) FROM transport_jobs) AS jobs,"
        " pg_size_pretty(pg_total_relation_size('vehicle_assignments')) AS assignments_size"
    )
    return {**dict(counts), **{k: round(v, 1) for k, v in timings.items()}, "shifts_per_vehicle": shifts}


Query = Callable[[asyncpg.Connection, random.Random], Awaitable[Any]]


def window(rng: random.Random, anchor: datetime, args: argparse.Namespace, shifts: int) -> tuple[datetime, datetime]:
    """A 2-8 hour window between now and the end of the booked period: what a dispatcher
    plans (earlier shifts are COMPLETED and block nothing)."""
    ahead = max(0.1, shifts - args.past_days - 1)
    start = datetime.now(timezone.utc) + timedelta(days=rng.uniform(0, ahead))
    start = start.replace(minute=rng.choice((0, 15, 30, 45)), second=0, microsecond=0)
    return start, start + timedelta(hours=rng.randint(2, 8))


def pickup(rng: random.Random) -> Point:
    return Point(rng.uniform(BOX[0] + 0.5, BOX[2] - 0.5), rng.uniform(BOX[1] + 0.5, BOX[3] - 0.5))


async def measure(conn: asyncpg.Connection, query: Query, runs: int, warmup: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    for _ in range(warmup):
        await query(conn, rng)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await query(conn, rng)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def explain(conn: asyncpg.Connection, sql: str, *params: Any) -> str:
    rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON) " + sql, *params)
    return "\n".join("    " + r[0] for r in rows)


async def main(args: argparse.Namespace) -> int:
    settings = Settings()
    configure_logging("console", "warning")
    url = with_database(settings.database_url, args.database)
    admin_url = with_database(settings.database_url, "postgres")
    print(f"conditions: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()},"
          f" load average at start {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    await recreate(admin_url, args.database)
    await apply_migrations(url)
    conn = await asyncpg.connect(url)
    await init_connection(conn)
    try:
        version = await conn.fetchval("SELECT version()")
        postgis = await conn.fetchval("SELECT postgis_lib_version()")
        print(f"server: {version.split(',')[0]}, PostGIS {postgis}")
        anchor = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        print(f"building: {args.vehicles:,} vehicles, {args.drivers:,} drivers, {args.assignments:,} assignments",
              file=sys.stderr)
        info = await build(conn, args, anchor)
        print("dataset: " + ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in info.items()))
        shifts = info["shifts_per_vehicle"]
        radius_m = args.radius_km * 1000

        async def vehicles_any(c: asyncpg.Connection, rng: random.Random) -> Any:
            return await queries.available_vehicles(c, *window(rng, anchor, args, shifts))

        async def vehicles_typed(c: asyncpg.Connection, rng: random.Random) -> Any:
            return await queries.available_vehicles(c, *window(rng, anchor, args, shifts), vehicle_type="van")

        async def drivers_any(c: asyncpg.Connection, rng: random.Random) -> Any:
            return await queries.available_drivers(c, *window(rng, anchor, args, shifts))

        async def nearest(c: asyncpg.Connection, rng: random.Random) -> Any:
            return await queries.nearest_available_drivers(c, pickup(rng), radius_m, limit=5)

        results: list[tuple[str, list[float], float]] = []
        for name, query in (("available vehicles (first 100)", vehicles_any),
                            ("available vehicles of a type (first 100)", vehicles_typed),
                            ("available drivers (first 100)", drivers_any),
                            (f"nearest free driver within {args.radius_km:g} km (5)", nearest)):
            rng = random.Random(1)
            sizes = [len(await query(conn, rng)) for _ in range(20)]
            samples = await measure(conn, query, args.runs, args.warmup, seed=7)
            results.append((name, samples, statistics.mean(sizes)))

        async with Database(url, max_size=1) as database:
            async def through_router(_: asyncpg.Connection, rng: random.Random) -> Any:
                async with database.read() as reader:
                    return await queries.available_vehicles(reader, *window(rng, anchor, args, shifts))

            samples = await measure(conn, through_router, args.runs, args.warmup, seed=7)
            results.append(("available vehicles via Database.read()", samples, 100.0))

        print(f"\nlatency over {args.runs} runs each (after {args.warmup} warm-up runs), milliseconds:")
        print(f"  {'query':<48} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}  rows")
        for name, samples, rows in results:
            print(f"  {name:<48} {percentile(samples, 50):7.2f} {percentile(samples, 95):7.2f}"
                  f" {percentile(samples, 99):7.2f} {max(samples):7.2f}  {rows:.0f}")

        rng = random.Random(3)
        start, end = window(rng, anchor, args, shifts)
        point = pickup(rng)
        print("\nEXPLAIN available vehicles:")
        print(await explain(conn, queries.AVAILABLE_VEHICLES, start, end, None, 100))
        print("\nEXPLAIN available drivers:")
        print(await explain(conn, queries.AVAILABLE_DRIVERS, start, end, 100))
        print("\nEXPLAIN nearest free driver:")
        print(await explain(conn, queries.NEAREST_AVAILABLE_DRIVERS, point.lon, point.lat, radius_m, 900.0, 5))
        print(f"\nload average at end {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    finally:
        await conn.close()
        if not args.keep:
            await drop(admin_url, args.database)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleetops_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=10_000)
    parser.add_argument("--drivers", type=int, default=20_000, help="at least --vehicles")
    parser.add_argument("--assignments", type=int, default=1_000_000)
    parser.add_argument("--past-days", type=int, default=80, help="shifts before today (the rest lie ahead)")
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--radius-km", type=float, default=50.0)
    parser.add_argument("--database", default=DATABASE)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args(argv)
    if args.drivers < args.vehicles:
        parser.error("--drivers must be at least --vehicles (each vehicle has its own drivers)")
    if min(args.vehicles, args.assignments, args.runs) < 1:
        parser.error("--vehicles, --assignments and --runs must be positive")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
