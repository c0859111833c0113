"""Benchmark of ``fleet maintain``: the cost of rolling up one new hour against the size of
the table, and how long ingestion is held up while a day of raw data is dropped.

    python -m bench.maintain_bench                      # 1M then 20M rows in the table
    python -m bench.maintain_bench --sizes 100000,1000000 --drop-rows 200000   # smaller

It works in a database of its own (``fleet_bench_maintain`` on the server of
``FLEET_DATABASE_URL``), created afresh and migrated for each size and dropped at the end
(``--keep`` keeps the last one; the drop measurement runs in it, at the largest size).

1. **Rollup of one new hour.** For each size of ``--sizes``, the table is filled with
   that many background readings spread evenly over ``--days`` days (in time order, as
   ingestion writes them). Then, ``--repeats`` times: ``--hour-rows`` readings are
   written into the next hour and marked dirty as the sink does, and
   :func:`fleet_telemetry.lifecycle.rollups.refresh_dirty_rollups` is timed (claim, the hour from raw
   rows, its day from the hourly rollups). The background rows are not marked dirty
   (rolling up 20M rows is not what is measured); the day of the new hours gets hourly
   rows for its other hours, so the day recompute has its real size.
2. **Ingestion while a day is dropped.** A writer stores batches of ``--batch`` readings
   through :class:`fleet_telemetry.consumers.sink.TelemetrySink` (COPY, dirty marks, commit) back to
   back and records each batch's latency; meanwhile a ``fleet maintain`` pass detaches
   and drops a day of ``--drop-rows`` readings past the retention. Three times: on a
   quiet table; with a 3-second report query holding the table (the detach keeps
   trying with 20 ms lock waits until it ends); with a 15-second one (after 5 s of
   those, the detach queues for at most ``FLEET_MAINTAIN_LOCK_TIMEOUT_SECONDS`` three
   times, the writers queued behind it wait as long, and the partition is left to the
   next pass).

Numbers depend on the machine and on what else runs on it; the conditions are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg

from bench.databases import drop, with_database
from fleet_telemetry.consumers.sink import TelemetrySink, create_pool
from fleet_telemetry.core.logs import configure_logging
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.lifecycle.policy import LifecyclePolicy
from fleet_telemetry.lifecycle.rollups import refresh_dirty_rollups
from fleet_telemetry.lifecycle.run import run_pass
from fleet_telemetry.schema.migrate import apply_migrations

DATABASE = "fleet_bench_maintain"
CHUNK = 500_000
VEHICLE_NAMESPACE = uuid.UUID("3b8f6a59-7f0e-4f3a-9a51-2d0d1f6b7c10")

# Background readings number $1..$2 of a table holding $3 in all over [$4, $4 + $5 seconds):
# evenly spaced in time, vehicles in turn, so every (vehicle, time) is distinct.
_FILL = """
INSERT INTO vehicle_telemetry (time, vehicle_id, location, speed, fuel_level)
SELECT $4::timestamptz + make_interval(secs => i * $5::float8 / $3),
       md5('bench-' || (i % $6))::uuid,
       ST_SetSRID(ST_MakePoint(13.0 + (i % 1009) / 1e4, 52.0 + (i % 997) / 1e4), 4326),
       (i % 130)::float8, CASE WHEN i % 7 = 0 THEN NULL ELSE (i % 100)::float8 END
  FROM generate_series($1::bigint, $2::bigint) AS i
"""
# Hourly rows for the other hours of the measured day: the day recompute reads them.
_DAY_HOURS = """
INSERT INTO vehicle_telemetry_hourly (vehicle_id, bucket, samples, speed_samples, avg_speed, min_speed,
    max_speed, fuel_samples, avg_fuel, first_fuel, first_fuel_time, last_fuel, last_fuel_time, distance_km,
    first_location, first_time, last_location, last_time)
SELECT md5('bench-' || v)::uuid, $1::timestamptz + make_interval(hours => h), 60, 60, 50, 0, 100, 60, 50, 60,
       $1::timestamptz + make_interval(hours => h), 40, $1::timestamptz + make_interval(hours => h, mins => 59),
       12.5, ST_SetSRID(ST_MakePoint(13, 52), 4326), $1::timestamptz + make_interval(hours => h),
       ST_SetSRID(ST_MakePoint(13.1, 52), 4326), $1::timestamptz + make_interval(hours => h, mins => 59)
  FROM generate_series(0, $2 - 1) AS v, generate_series(0, $3 - 1) AS h
ON CONFLICT DO NOTHING
"""
# $2 readings of $3 vehicles spread over the hour $1.
_HOUR_ROWS = """
INSERT INTO vehicle_telemetry (time, vehicle_id, location, speed, fuel_level)
SELECT $1::timestamptz + make_interval(secs => i * 3600.0 / $2), md5('bench-' || (i % $3))::uuid,
       ST_SetSRID(ST_MakePoint(13.0 + (i % 1009) / 1e4, 52.0 + (i % 997) / 1e4), 4326), (i % 130)::float8,
       (i % 100)::float8
  FROM generate_series(0, $2 - 1) AS i
"""
_MARK = "INSERT INTO telemetry_dirty_hours (hour) VALUES ($1) ON CONFLICT DO NOTHING"


def _say(text: str) -> None:
    print(text, flush=True)


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part.replace("_", "")) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(f"--sizes {text!r}: expected comma-separated row counts, e.g. 1000000,20000000") from None
    if not sizes or sizes[0] < 1:
        raise SystemExit("--sizes needs row counts of 1 or more")
    return sizes


async def _prepare(admin_url: str, url: str) -> None:
    """A freshly created and migrated benchmark database."""
    await drop(admin_url, DATABASE)
    await apply_migrations(url)


async def _conditions(conn: asyncpg.Connection) -> str:
    version = await conn.fetchval("SHOW server_version")
    buffers = await conn.fetchval("SHOW shared_buffers")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"PostgreSQL {version}, shared_buffers {buffers}; {os.cpu_count()} CPUs, load average {load}"


async def _fill(conn: asyncpg.Connection, size: int, start: datetime, span: float, vehicles: int) -> None:
    began = time.perf_counter()
    for first in range(0, size, CHUNK):
        last = min(size, first + CHUNK) - 1
        await conn.execute(_FILL, first, last, size, start, span, vehicles)
        rate = (last + 1) / (time.perf_counter() - began)
        print(f"\r  filled {last + 1:>12,} / {size:,} rows ({rate:,.0f} rows/s)", end="", flush=True)
    print(flush=True)
    await conn.execute("VACUUM ANALYZE vehicle_telemetry")
    # Write the fill's dirty pages out now, or the first measured queries pay for
    # evicting them (a steady server's background writer keeps clean buffers at hand).
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.exceptions.InsufficientPrivilegeError:
        _say("  (no CHECKPOINT without superuser or pg_checkpoint: the first timings include evictions)")


async def bench_rollup(admin_url: str, url: str, args: argparse.Namespace) -> list[tuple[int, list[float]]]:
    """For each size, in a fresh database: fill, then time the rollup of ``--repeats`` new hours."""
    now = datetime.now(timezone.utc)
    today = datetime(now.year, now.month, now.day, tzinfo=timezone.utc)
    first_new = 24 - args.repeats  # the new hours are the last ones of today; its partition exists
    start = today - timedelta(days=args.days - 1)
    span = (today + timedelta(hours=first_new) - start).total_seconds()
    results = []
    for size in _sizes(args.sizes):
        await _prepare(admin_url, url)
        conn = await asyncpg.connect(url)
        try:
            _say(f"table with {size:,} background rows over {args.days} days:")
            await _fill(conn, size, start, span, args.vehicles)
            await conn.execute(_DAY_HOURS, today, args.vehicles, first_new)
            timings = []
            for repeat in range(args.repeats):
                hour = today + timedelta(hours=first_new + repeat)
                await conn.execute(_HOUR_ROWS, hour, args.hour_rows, args.vehicles)
                await conn.execute(_MARK, hour)
                began = time.perf_counter()
                report = await refresh_dirty_rollups(conn)
                timings.append(time.perf_counter() - began)
                assert (report.hours, report.days) == (1, 1), report
            _say(f"  rollup of one new hour ({args.hour_rows:,} readings, {args.vehicles:,} vehicles):"
                 f" median {statistics.median(timings) * 1000:.0f} ms, min {min(timings) * 1000:.0f} ms,"
                 f" max {max(timings) * 1000:.0f} ms over {len(timings)} hours")
            total = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size(c.oid)) FROM pg_class c"
                                        " WHERE c.relname = $1", f"vehicle_telemetry_p{today:%Y%m%d}")
            _say(f"  (today's partition, where the new hours are: {total})")
        finally:
            await conn.close()
        results.append((size, timings))
    return results


class Ingest:
    """Writes batches through the sink back to back and records each batch's latency."""

    def __init__(self, sink: TelemetrySink, vehicles: list[uuid.UUID], batch: int) -> None:
        self.sink = sink
        self.vehicles = vehicles
        self.batch = batch
        self.samples: list[tuple[float, float]] = []  # (start, seconds)
        self.stop = asyncio.Event()
        self._tick = 0

    def _readings(self) -> list[Reading]:
        base = datetime.now(timezone.utc)
        out = []
        for i in range(self.batch):
            self._tick += 1
            vid = self.vehicles[self._tick % len(self.vehicles)]
            out.append(Reading(vehicle_id=vid, time=base + timedelta(microseconds=self._tick % 1000),
                               lat=52.5, lon=13.4, speed=50.0, fuel_level=60.0, heading=None, odometer_km=None,
                               engine_status=None, source=Source("bench", 0, self._tick), key=None, raw=b"{}"))
        return out

    async def run(self) -> None:
        while not self.stop.is_set():
            batch = self._readings()
            began = time.perf_counter()
            await self.sink.write(batch)
            self.samples.append((began, time.perf_counter() - began))

    def between(self, first: float, last: float) -> list[float]:
        return [seconds for began, seconds in self.samples if began + seconds >= first and began <= last]


def _latency_line(label: str, values: list[float]) -> str:
    if not values:
        return f"  {label}: no batch"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"  {label}: {len(values)} batches, median {statistics.median(values) * 1000:.1f} ms,"
            f" p99 {p99 * 1000:.1f} ms, max {max(values) * 1000:.1f} ms")


async def _old_day(conn: asyncpg.Connection, days_ago: int, rows: int, vehicles: int) -> str:
    day = (datetime.now(timezone.utc) - timedelta(days=days_ago)).date()
    await conn.execute("SELECT fleet_ensure_telemetry_partitions($1, $1)", day)
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    for first in range(0, rows, CHUNK):
        await conn.execute(_FILL, first, min(rows, first + CHUNK) - 1, rows, start, 86_399.0, vehicles)
    return f"vehicle_telemetry_p{day:%Y%m%d}"


async def bench_drop(url: str, conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> None:
    policy = LifecyclePolicy.from_settings(settings)
    ids = [uuid.uuid5(VEHICLE_NAMESPACE, str(i)) for i in range(100)]
    await conn.executemany(
        "INSERT INTO vehicles (id, vin, license_plate, make, model, year) VALUES ($1, $2, $3, 'Bench', 'B', 2024)"
        " ON CONFLICT DO NOTHING",
        [(v, v.hex[:17].upper(), "B-" + v.hex[:8].upper()) for v in ids],
    )
    await run_pass(conn, policy, now=datetime.now(timezone.utc))  # settle: nothing else left to do
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        scenarios = (("quiet table", 0.0, 45), ("a 3 s report query running", 3.0, 46),
                     ("a 15 s report query running", 15.0, 47))
        for label, reader_seconds, days_ago in scenarios:
            name = await _old_day(conn, days_ago, args.drop_rows, args.vehicles)
            _say(f"drop of {name} ({args.drop_rows:,} rows) while ingesting batches of {args.batch}, {label}:")
            ingest = Ingest(TelemetrySink(pool), ids, args.batch)
            writing = asyncio.create_task(ingest.run())
            await asyncio.sleep(2.0)
            reader = None
            if reader_seconds:
                reader = await asyncpg.connect(url)
                query = asyncio.create_task(reader.execute(
                    "SELECT count(*), pg_sleep($1) FROM vehicle_telemetry WHERE time >= now() - interval '1 minute'",
                    reader_seconds))
                await asyncio.sleep(0.2)
            began = time.perf_counter()
            report = await run_pass(conn, policy, now=datetime.now(timezone.utc))
            ended = time.perf_counter()
            await asyncio.sleep(1.0)
            ingest.stop.set()
            await writing
            if reader is not None:
                await query
                await reader.close()
            _say(_latency_line("before the pass", ingest.between(0.0, began - 0.001)))
            _say(_latency_line("during the pass", ingest.between(began, ended)))
            state = "dropped" if name in report.raw_partitions_dropped else f"kept (deferred: {report.deferred})"
            _say(f"  pass took {(ended - began) * 1000:.0f} ms; {name} {state}")
            if name not in report.raw_partitions_dropped:
                report = await run_pass(conn, policy, now=datetime.now(timezone.utc))
                _say(f"  next pass, the query done: {name}"
                     f" {'dropped' if name in report.raw_partitions_dropped else 'still kept'}")
    finally:
        await pool.close()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.maintain_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,20000000", help="background rows, comma-separated")
    parser.add_argument("--days", type=int, default=10, help="days the background rows are spread over")
    parser.add_argument("--vehicles", type=int, default=1000, help="vehicles in the data")
    parser.add_argument("--hour-rows", type=int, default=20_000, help="readings in the new hour")
    parser.add_argument("--repeats", type=int, default=3, help="new hours rolled up and timed per size (1-4)")
    parser.add_argument("--drop-rows", type=int, default=1_000_000, help="readings in the dropped day")
    parser.add_argument("--batch", type=int, default=500, help="readings per ingested batch")
    parser.add_argument("--skip-rollup", action="store_true", help="only the drop measurement")
    parser.add_argument("--skip-drop", action="store_true", help="only the rollup measurement")
    parser.add_argument("--keep", action="store_true", help=f"keep the database {DATABASE} afterwards")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= 4:
        raise SystemExit("--repeats must be 1 to 4 (the new hours are the last ones of today)")
    settings = Settings()
    configure_logging("console", "warning")
    admin_url = with_database(settings.database_url, "postgres")
    url = with_database(settings.database_url, DATABASE)
    admin = await asyncpg.connect(admin_url)
    try:
        _say(f"conditions at the start: {await _conditions(admin)}")
    finally:
        await admin.close()
    try:
        if not args.skip_rollup:
            await bench_rollup(admin_url, url, args)
        else:
            await _prepare(admin_url, url)
        conn = await asyncpg.connect(url)
        try:
            if not args.skip_drop:
                await bench_drop(url, conn, args, settings)
            _say(f"conditions at the end: {await _conditions(conn)}")
        finally:
            await conn.close()
    finally:
        if not args.keep:
            await drop(admin_url, DATABASE)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
