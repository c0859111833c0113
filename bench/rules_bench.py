"""Benchmark of the rules stage alone: CPU per reading of ``evaluate`` and of ``RuleEngine.after_write``.

Usage (from the repository root, with the local stack running)::

    python -m bench.rules_bench [--readings 100000] [--vehicles 2000] [--hours 2] [--geofences 1000]
                                [--batch 5000] [--repeat 3] [--end TIME] [--no-database] [--profile FILE]

The defaults are the conditions of the pipeline's profile (a reading per vehicle every
144 s); ``--vehicles 5000 --readings 200000 --hours 0.4 --batch 2000`` is closer to the
full benchmark (a reading per vehicle every 36 s, each vehicle once per batch). Two
versions of the rules compare with the same ``--end``: the digests must be equal.

In a database of its own (created on FLEET_DATABASE_URL's server, migrated, dropped at
the end) it creates the benchmark's geofences (``bench.dataset.create_geofences``: circles
and squares around the fleet's cities, some with speed limits or dwells) and loads them
the way a worker does; the readings are the benchmark's dataset (``bench.dataset``), one
reading per vehicle in turn, each batch decoded into :class:`~fleet_telemetry.core.reading.Reading`
objects just before it is timed (as fresh as from a worker's decoder). Then, for each of
``--repeat`` rounds:

1. ``evaluate``: every batch of ``--batch`` readings grouped per vehicle and through the
   pure rules, starting from empty states (what ``after_write`` does but for the
   database); the CPU time of the process is measured;
2. ``after_write``: a fresh :class:`~fleet_telemetry.consumers.rules.RuleEngine` on empty
   rule tables, every batch through ``after_write`` (states, transitions and alerts
   committed, one transaction per batch; no Redis); the client's CPU time and the wall
   time are measured, and the SQL statements sent are counted.

It prints microseconds per reading (the best round) and a digest of what the rules
decided (transitions, alert actions, and the rows written), so two versions of the rules
can be compared for speed and for identical results on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import pstats
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from bench import dataset
from bench.databases import drop, recreate, with_database
from fleet_telemetry.consumers.decode import Decoded, Rules, decode_into
from fleet_telemetry.consumers.rules import RuleEngine
from fleet_telemetry.consumers.rules.engine import thresholds_from_settings
from fleet_telemetry.consumers.rules.evaluate import evaluate
from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.model import Evaluation, VehicleState
from fleet_telemetry.consumers.rules.timers import load_index
from fleet_telemetry.consumers.sink import init_connection
from fleet_telemetry.core.logs import configure_logging
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.reading import Reading, Source, by_vehicle
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.schema.migrate import apply_migrations

_SOURCE = Source("bench", 0, 0)
_RULE_TABLES = "vehicle_rule_state, vehicle_geofence_state, geofence_transitions, alerts"
_ROWS_DIGEST = """
SELECT (SELECT count(*) FROM geofence_transitions) AS transitions,
       (SELECT count(*) FROM alerts) AS alerts,
       (SELECT count(*) FROM vehicle_geofence_state) AS fence_states,
       md5(coalesce((SELECT string_agg(concat_ws('|', vehicle_id, geofence_id, kind, time, round(lat::numeric, 9),
                                                 round(lon::numeric, 9), crossing), ';'
                                       ORDER BY vehicle_id, geofence_id, time, kind)
                     FROM geofence_transitions), '')
           || coalesce((SELECT string_agg(concat_ws('|', entity_id, type, geofence_id, reading_time, is_resolved,
                                                    details - 'resolved_at'), ';'
                                          ORDER BY entity_id, type, geofence_id, reading_time)
                        FROM alerts), '')
           || coalesce((SELECT string_agg(concat_ws('|', vehicle_id, last_time, lat, lon, odometer_km, memory), ';'
                                          ORDER BY vehicle_id)
                        FROM vehicle_rule_state), '')
           || coalesce((SELECT string_agg(concat_ws('|', vehicle_id, geofence_id, inside, since, pending_since,
                                                    speeding_since, speeding_max, speeding_open), ';'
                                          ORDER BY vehicle_id, geofence_id)
                        FROM vehicle_geofence_state), '')) AS digest
"""


def decode(values: list[bytes]) -> list[Reading]:
    """Message values as readings, by the worker's own decoder (its vehicle ids, times and
    engine objects are what the rules meet)."""
    out = Decoded()
    rules = Rules(datetime.now(timezone.utc), max_future=timedelta(days=3650), retention=timedelta(days=3650))
    for value in values:
        decode_into(value, None, _SOURCE, rules, out)
    if out.rejections:
        raise ValueError(f"the dataset holds a reading the decoder refuses: {out.rejections[0].detail}")
    return out.readings


def batches(values: list[bytes], size: int) -> Iterator[list[Reading]]:
    """The dataset in batches of ``size``, each decoded just before it is handed out: the
    rules meet a batch fresh from the decoder, as in a worker."""
    for i in range(0, len(values), size):
        yield decode(values[i:i + size])


class Decisions:
    """What a run decided, in a digest independent of the order of one reading's
    transitions, and counted; each batch's result is dropped once added (a worker keeps
    none, and the garbage collector would walk through them all)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.transitions = self.actions = 0

    def add(self, result: Evaluation) -> None:
        ts = sorted((str(t.vehicle_id), t.geofence_id, t.kind, t.time.isoformat(), round(t.lat, 9),
                     round(t.lon, 9), t.crossing) for t in result.transitions)
        acts = sorted((str(a.vehicle_id), a.type, a.geofence_id or 0, a.reading_time.isoformat(), a.action,
                       orjson.dumps(a.details, option=orjson.OPT_SORT_KEYS).decode()) for a in result.actions)
        self._hash.update(repr((ts, acts, result.late, sorted(map(str, result.urgent)),
                                sorted(map(str, result.back_online)))).encode())
        self.transitions += len(ts)
        self.actions += len(acts)

    def digest(self) -> str:
        return self._hash.hexdigest()[:16]


def run_evaluate(index: GeofenceIndex, settings: Settings, values: list[bytes], size: int,
                 now: datetime) -> tuple[float, Decisions]:
    """Every batch through ``evaluate`` from empty states; returns (CPU seconds, what it decided)."""
    th = thresholds_from_settings(settings)
    states: dict[UUID, VehicleState] = {}
    decisions = Decisions()
    cpu = 0.0
    for batch in batches(values, size):
        started = time.process_time()
        groups = by_vehicle(batch)
        for vid in groups:
            if vid not in states:
                states[vid] = VehicleState()
        result = evaluate(states, groups, index, th, now)
        cpu += time.process_time() - started
        decisions.add(result)
    return cpu, decisions


class StatementCounter:
    """The worker's connection set-up, and a count of the statements sent (asyncpg query loggers)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, record: Any) -> None:
        self.count += 1

    async def attach(self, conn: asyncpg.Connection) -> None:
        await init_connection(conn)
        conn.add_query_logger(self)


async def run_after_write(url: str, settings: Settings, values: list[bytes], size: int) -> dict[str, Any]:
    """Every batch through a fresh engine's ``after_write``; the client's CPU and wall time."""
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"TRUNCATE {_RULE_TABLES}")
    finally:
        await admin.close()
    counter = StatementCounter()
    pool = await asyncpg.create_pool(url, min_size=2, max_size=4, init=counter.attach)
    try:
        engine = RuleEngine(pool, None, settings, PipelineMetrics())
        await engine.refresh_geofences()
        counter.count = 0
        cpu = wall = 0.0
        for batch in batches(values, size):
            started, clock = time.process_time(), time.perf_counter()
            await engine.after_write(batch)
            cpu, wall = cpu + time.process_time() - started, wall + time.perf_counter() - clock
        statements = counter.count
        await engine.flush()  # the states not written yet, so the rows compare between runs
        async with pool.acquire() as conn:
            rows = dict(await conn.fetchrow(_ROWS_DIGEST))
    finally:
        await pool.close()
    return {"cpu": cpu, "wall": wall, "statements": statements, **rows}


async def main(args: argparse.Namespace) -> int:
    configure_logging("console", "warning")
    base = Settings()
    spec = dataset.DatasetSpec(
        readings=args.readings, vehicles=args.vehicles, seed=args.seed,
        end=args.end or dataset.window_ending_now(timedelta(hours=args.hours)), span=timedelta(hours=args.hours),
    )
    name = f"fleet_bench_rules_{uuid.uuid4().hex[:8]}"
    admin_url = with_database(base.database_url, "postgres")
    url = with_database(base.database_url, name)
    await recreate(admin_url, name)
    try:
        await apply_migrations(url)
        conn = await asyncpg.connect(url)
        try:
            await dataset.register_fleet(conn, dataset.fleet_ids(spec))
            await dataset.create_geofences(conn, args.geofences, args.seed)
            index = await load_index(conn)
        finally:
            await conn.close()
        settings = base.model_copy(update={"database_url": url})
        values = list(dataset.generate(spec))
        n = len(values)
        print(f"{n:,} readings of {args.vehicles:,} vehicles over {args.hours} h, {len(index):,} geofences"
              f" (grid cell {index.cell:.5f} deg), batches of {args.batch:,}", flush=True)
        now = spec.end + timedelta(minutes=1)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run_evaluate(index, settings, values, args.batch, now)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").dump_stats(args.profile)
        best_eval = best_cpu = best_wall = float("inf")
        for round_ in range(args.repeat):
            seconds, decisions = run_evaluate(index, settings, values, args.batch, now)
            best_eval = min(best_eval, seconds)
            print(f"round {round_ + 1}: evaluate {seconds / n * 1e6:6.2f} us CPU/reading ({decisions.transitions:,}"
                  f" transitions, {decisions.actions:,} alert actions, digest {decisions.digest()})", flush=True)
            if args.no_database:
                continue
            w = await run_after_write(url, settings, values, args.batch)
            best_cpu, best_wall = min(best_cpu, w["cpu"]), min(best_wall, w["wall"])
            print(f"round {round_ + 1}: after_write {w['cpu'] / n * 1e6:6.2f} us client CPU/reading,"
                  f" {w['wall'] / n * 1e6:6.2f} us wall/reading, {w['statements'] / (n / args.batch):.1f}"
                  f" statements/batch ({w['transitions']:,} transitions, {w['alerts']:,} alerts,"
                  f" {w['fence_states']:,} fence states; rows digest {w['digest'][:16]})", flush=True)
        print(f"best: evaluate {best_eval / n * 1e6:.2f} us CPU/reading", end="")
        if not args.no_database:
            print(f"; after_write {best_cpu / n * 1e6:.2f} us client CPU/reading,"
                  f" {best_wall / n * 1e6:.2f} us wall/reading", end="")
        print()
    finally:
        if not args.keep:
            await drop(admin_url, name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.rules_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--readings", type=int, default=100_000)
    p.add_argument("--vehicles", type=int, default=2_000)
    p.add_argument("--hours", type=float, default=2.0, help="the span of the readings' times")
    p.add_argument("--geofences", type=int, default=1_000)
    p.add_argument("--batch", type=int, default=5_000, help="readings per batch (the worker's batch size)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the best is reported")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--end", type=datetime.fromisoformat, metavar="TIME",
                   help="when the readings end (timezone-aware ISO 8601; default: 2 minutes ago), to compare digests")
    p.add_argument("--no-database", action="store_true", help="time evaluate only")
    p.add_argument("--profile", metavar="FILE", help="write a cProfile of one evaluate round to FILE")
    p.add_argument("--keep", action="store_true", help="keep the database")
    return p


if __name__ == "__main__":
    sys.exit(asyncio.run(main(build_parser().parse_args())))
