"""Benchmark: ``fleet replay --direct`` of a file against a bare asyncpg binary COPY.

Usage (from the repository root, with the local stack running)::

    python -m bench.replay_bench [--readings 1000000] [--workers N] [--format ndjson|csv] [--gzip]

In a database of its own (created on FLEET_DATABASE_URL's server, migrated, dropped at
the end) it

1. generates a file of N readings of 1,000 registered vehicles (every field set, times
   within the last days so they are stored raw, sorted by time like an export);
2. measures the ceiling: the same rows, already decoded in memory as tuples, written
   with ``copy_records_to_table`` into ``vehicle_telemetry`` in batches of
   ``--batch-size``, one transaction per batch; only the COPY and commit are timed;
3. empties the table and runs ``fleet replay FILE --direct`` in a subprocess, timing
   the whole command (start-up, reading, decoding, storing, the rollup refresh) and
   sampling the resident memory of its process tree;
4. prints the ratio ``replay rows/s / COPY rows/s`` (end to end, and for the load phase
   without start-up and rollup refresh), peak memory, and memory at 25/50/75/100 % of
   the run (flat memory: these stay level whatever N is).

``--json`` prints the results as one JSON object as well.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import IO, Any

import asyncpg
import orjson

from bench import databases
from bench.databases import with_database
from fleet_telemetry.consumers.sink import COLUMNS, init_connection
from fleet_telemetry.core.logs import configure_logging
from fleet_telemetry.core.reading import ewkb_point
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.schema.migrate import apply_migrations

_NAMESPACE = uuid.UUID("0b7f3e38-52c4-4a8e-9c55-3c1d0f6a9e21")


def vehicle_ids(count: int) -> list[uuid.UUID]:
    return [uuid.uuid5(_NAMESPACE, f"bench-{i}") for i in range(count)]


def readings(n: int, vehicles: list[uuid.UUID], end: datetime) -> Iterator[dict[str, Any]]:
    """``n`` readings, every 10 s per vehicle, sorted by time, ending at ``end``."""
    per_vehicle = math.ceil(n / len(vehicles))
    start = end - timedelta(seconds=10 * per_vehicle)
    produced = 0
    for step in range(per_vehicle):
        moment = start + timedelta(seconds=10 * step)
        iso = moment.isoformat()
        for index, vid in enumerate(vehicles):
            if produced == n:
                return
            produced += 1
            phase = (step + index) % 360
            yield {
                "vehicle_id": str(vid), "time": iso,
                "lat": 48.0 + (index % 50) * 0.1 + step * 1e-4, "lon": 9.0 + (index // 50) * 0.1 + step * 1e-4,
                "speed": float(phase % 120), "fuel_level": 100.0 - (step % 900) / 10.0,
                "heading": float(phase), "odometer_km": 10000.0 + step * 0.25,
                "engine_status": {"rpm": 800 + phase * 5, "coolant_temp_c": 88.5, "ignition": True},
            }


def write_file(path: str, n: int, vehicles: list[uuid.UUID], end: datetime, fmt: str, compress: bool) -> None:
    raw: Any = gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb")
    with raw:
        if fmt == "ndjson":
            buffer: list[bytes] = []
            for reading in readings(n, vehicles, end):
                buffer.append(orjson.dumps(reading))
                if len(buffer) == 10000:
                    raw.write(b"\n".join(buffer) + b"\n")
                    buffer.clear()
            if buffer:
                raw.write(b"\n".join(buffer) + b"\n")
            return
        text = open_text(raw)
        columns = ["vehicle_id", "time", "lat", "lon", "speed", "fuel_level", "heading", "odometer_km", "engine_status"]
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        for reading in readings(n, vehicles, end):
            row = [reading[c] for c in columns[:-1]]
            writer.writerow([*row, orjson.dumps(reading["engine_status"]).decode()])
        text.flush()
        text.detach()


def open_text(raw: IO[bytes]) -> Any:
    import io

    return io.TextIOWrapper(raw, encoding="utf-8", newline="")  # type: ignore[arg-type]


def row_of(reading: dict[str, Any]) -> tuple[Any, ...]:
    return (
        datetime.fromisoformat(reading["time"]), uuid.UUID(reading["vehicle_id"]),
        ewkb_point(reading["lon"], reading["lat"]), reading["speed"], reading["fuel_level"],
        reading["heading"], reading["odometer_km"], reading["engine_status"],
    )


async def bare_copy(
    url: str, n: int, vehicles: list[uuid.UUID], end: datetime, batch_size: int, database: str
) -> tuple[float, float, float]:
    """Seconds spent in COPY + commit for the rows, built (untimed) batch by batch, and the
    CPU seconds of this thread and of the PostgreSQL backend during those COPYs."""
    conn = await asyncpg.connect(url)
    try:
        await init_connection(conn)
        spent = client_cpu = 0.0
        batch: list[tuple[Any, ...]] = []
        server = ServerCpu(database)

        async def flush() -> tuple[float, float]:
            started, cpu = time.perf_counter(), time.thread_time()
            async with conn.transaction():
                await conn.copy_records_to_table("vehicle_telemetry", records=batch, columns=COLUMNS)
            return time.perf_counter() - started, time.thread_time() - cpu

        server_cpu = 0.0
        for reading in readings(n, vehicles, end):
            batch.append(row_of(reading))
            if len(batch) == batch_size:
                before = server.total()
                wall, cpu = await flush()
                server_cpu += server.total() - before
                spent, client_cpu, batch = spent + wall, client_cpu + cpu, []
        if batch:
            before = server.total()
            wall, cpu = await flush()
            server_cpu += server.total() - before
            spent, client_cpu = spent + wall, client_cpu + cpu
        return spent, client_cpu, server_cpu
    finally:
        await conn.close()


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class ServerCpu:
    """CPU seconds used by the PostgreSQL backends serving ``database`` since creation.

    Reads ``/proc`` on demand (:meth:`total`) or every 50 ms in a thread (:meth:`start`),
    so backends that come and go during a run are counted (up to the last sample).
    """

    def __init__(self, database: str) -> None:
        self._needle = database.encode()
        self._baseline: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._others: set[int] = set()
        self._first = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.total()

    def total(self) -> float:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in self._others:
                continue
            pid = int(entry)
            if pid not in self._last:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if b"postgres" not in cmdline:
                    self._others.add(pid)
                    continue
                if self._needle not in cmdline:
                    continue  # another database's backend, or one still authenticating
            cpu = _cpu_seconds(pid)
            if cpu is None:
                continue
            if pid not in self._last:
                self._baseline[pid] = cpu if self._first else 0.0
            self._last[pid] = cpu
        self._first = False
        return sum(self._last[pid] - self._baseline[pid] for pid in self._last)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.total()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.total()


class TreeMemory:
    """Samples the resident memory (sum over a process and its children) every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            total = sum(_rss(p) for p in _tree(self.pid))
            if total:
                self.samples.append((time.monotonic() - started, total))
            self._stop.wait(0.05)

    def at(self, fraction: float) -> int:
        if not self.samples:
            return 0
        end = self.samples[-1][0]
        return max((rss for t, rss in self.samples if t <= end * fraction), default=self.samples[0][1])


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out.extend(_tree(int(child)))
    except OSError:
        pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def run_replay(url: str, path: str, workers: int | None, batch_size: int, rejects: str, database: str) -> dict[str, Any]:
    env = {**os.environ, "FLEET_DATABASE_URL": url, "FLEET_METRICS_PORT": "0", "FLEET_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "fleet_telemetry.cli", "replay", path, "--direct", "--json",
               "--rejects", rejects, "--batch-size", str(batch_size)]
    if workers is not None:
        command += ["--workers", str(workers)]
    server = ServerCpu(database)
    server.start()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    memory = TreeMemory(process.pid)
    memory.start()
    out, err = process.communicate()
    wall = time.perf_counter() - started
    memory.stop()
    server_cpu = server.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    if process.returncode != 0:
        raise SystemExit(f"replay_bench: fleet replay exited {process.returncode}: {err.decode()[-2000:]}")
    summary = json.loads(out)
    return {
        "wall_s": wall, "summary": summary,
        "peak_tree_rss": max((rss for _, rss in memory.samples), default=0),
        "rss_at": {f"{int(f * 100)}%": memory.at(f) for f in (0.25, 0.5, 0.75, 1.0)},
        "peak_process_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "client_cpu_s": client_cpu, "server_cpu_s": server_cpu,
    }


async def prepare(admin_url: str, name: str, url: str, vehicles: list[uuid.UUID]) -> None:
    await databases.create(admin_url, name)
    await apply_migrations(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.executemany(
            "INSERT INTO vehicles (id, vin, license_plate, make, model, year, type, status)"
            " VALUES ($1, $2, $3, 'Bench', 'B1', 2024, 'truck', 'active')",
            [(vid, vid.hex[:17].upper(), "B-" + vid.hex[:8].upper()) for vid in vehicles],
        )
    finally:
        await conn.close()


async def reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE vehicle_telemetry, telemetry_dirty_hours, vehicle_telemetry_hourly,"
                           " vehicle_telemetry_daily")
        await conn.execute("VACUUM ANALYZE vehicle_telemetry")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def drop(admin_url: str, name: str) -> None:
    await databases.drop(admin_url, name)


def _mb(value: int) -> str:
    return f"{value / 1e6:,.0f} MB"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=1_000_000, help="readings in the file (default 1,000,000)")
    parser.add_argument("--vehicles", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="fleet replay --workers (default: its own)")
    parser.add_argument("--batch-size", type=int, default=5000, help="rows per COPY and per replay chunk")
    parser.add_argument("--format", choices=("ndjson", "csv"), default="ndjson")
    parser.add_argument("--gzip", action="store_true", help="compress the file")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate COPY and replay this many times and keep the best of each (default 1)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    configure_logging("console", "warning")
    settings = Settings()
    name = f"fleet_bench_replay_{uuid.uuid4().hex[:8]}"
    admin_url = with_database(settings.database_url, "postgres")
    url = with_database(settings.database_url, name)
    vehicles = vehicle_ids(args.vehicles)
    end = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fleet-replay-bench-") as tmp:
        path = os.path.join(tmp, f"readings.{args.format}" + (".gz" if args.gzip else ""))
        started = time.perf_counter()
        write_file(path, args.readings, vehicles, end, args.format, args.gzip)
        print(f"generated {args.readings:,} readings ({os.path.getsize(path) / 1e6:,.0f} MB {args.format}"
              f"{' gzip' if args.gzip else ''}) in {time.perf_counter() - started:.1f} s", flush=True)
        await prepare(admin_url, name, url, vehicles)
        copy_s = math.inf
        copy_cpu = (0.0, 0.0)
        result: dict[str, Any] = {}
        try:
            for round_ in range(1, args.rounds + 1):
                await reset(url)
                seconds, client_cpu, server_cpu = await bare_copy(
                    url, args.readings, vehicles, end, args.batch_size, name)
                if seconds < copy_s:
                    copy_s, copy_cpu = seconds, (client_cpu, server_cpu)
                print(f"round {round_}: bare COPY {args.readings / seconds:,.0f} rows/s ({seconds:.2f} s)", flush=True)
                await reset(url)
                this = run_replay(url, path, args.workers, args.batch_size, os.path.join(tmp, "rejects.ndjson"), name)
                if this["summary"]["stored"] != args.readings:
                    raise SystemExit(f"replay_bench: the replay stored {this['summary']['stored']:,}"
                                     f" of {args.readings:,}")
                print(f"round {round_}: fleet replay {args.readings / this['wall_s']:,.0f} rows/s end to end"
                      f" ({this['wall_s']:.2f} s)", flush=True)
                if not result or this["wall_s"] < result["wall_s"]:
                    result = this
        finally:
            await drop(admin_url, name)
    summary = result["summary"]
    copy_rate = args.readings / copy_s
    wall_rate = args.readings / result["wall_s"]
    load_rate = args.readings / summary["seconds"]
    cpus = os.cpu_count()
    print(f"bare COPY:     {copy_rate:>10,.0f} rows/s ({copy_s:.2f} s)")
    print(f"fleet replay:  {wall_rate:>10,.0f} rows/s end to end ({result['wall_s']:.2f} s: start-up, load, "
          f"rollup refresh); {load_rate:,.0f} rows/s load phase ({summary['seconds']:.2f} s)")
    print(f"ratio:         {wall_rate / copy_rate:.2f} end to end, {load_rate / copy_rate:.2f} load phase "
          f"(target 0.8)")
    print(f"memory:        peak {_mb(result['peak_tree_rss'])} for the replay's process tree, "
          f"largest process {_mb(result['peak_process_rss'])}; tree at "
          + ", ".join(f"{k} {_mb(v)}" for k, v in result["rss_at"].items()) + " of the run")
    print(f"conditions:    {cpus} CPUs, load average before {load[0]:.2f}, workers "
          f"{args.workers if args.workers is not None else 'default'}, batch {args.batch_size:,}, "
          f"{args.vehicles:,} vehicles, {args.format}{' gzip' if args.gzip else ''}, best of {args.rounds}")
    per_row = 1e6 / args.readings
    print(f"CPU per row:   bare COPY {sum(copy_cpu) * per_row:.1f} us (client {copy_cpu[0] * per_row:.1f}"
          f" + PostgreSQL {copy_cpu[1] * per_row:.1f}); fleet replay "
          f"{(result['client_cpu_s'] + result['server_cpu_s']) * per_row:.1f} us (client "
          f"{result['client_cpu_s'] * per_row:.1f} + PostgreSQL {result['server_cpu_s'] * per_row:.1f},"
          " start-up and rollup refresh included)")
    rollups = summary.get("rollups") or {}
    print(f"rollup refresh inside the replay: {rollups.get('seconds', 0):.2f} s "
          f"({rollups.get('hours', 0)} hours, {rollups.get('days', 0)} days)")
    if args.json:
        print(json.dumps({
            "readings": args.readings, "copy_rows_per_s": copy_rate, "replay_rows_per_s": wall_rate,
            "replay_load_rows_per_s": load_rate, "ratio": wall_rate / copy_rate,
            "ratio_load": load_rate / copy_rate, "peak_tree_rss_bytes": result["peak_tree_rss"],
            "peak_process_rss_bytes": result["peak_process_rss"], "rss_at": result["rss_at"],
            "cpus": cpus, "loadavg": load[0], "workers": args.workers, "batch_size": args.batch_size,
            "format": args.format, "gzip": args.gzip, "rounds": args.rounds,
            "rollup_refresh_s": rollups.get("seconds"),
            "copy_cpu_s": {"client": copy_cpu[0], "server": copy_cpu[1]},
            "replay_cpu_s": {"client": result["client_cpu_s"], "server": result["server_cpu_s"]},
        }))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
