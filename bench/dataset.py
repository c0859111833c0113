"""The benchmark's data: one seeded fleet's readings, the same bytes for every contestant.

:func:`generate` yields the message values of a simulated fleet (``fleet_telemetry.ingest.simulate``)
in event-time order, spread evenly over a window that ends just before the run, so
every reading is valid, inside retention and unique by ``(vehicle_id, time)``. The
values are written once to a file (:func:`write_dataset`); the Kafka contestants read
them from a topic filled from that file (:func:`produce_file`), the ceiling reads the
file itself (:func:`copy_row`). The same readings also go out as gateways send them:
JSON arrays of :data:`GATEWAY_ARRAY` readings per message, keyed by the gateway
(:func:`gateway_arrays`).

Also here: registering the fleet, the 1,000 geofences the pipeline checks against, and
the bulk preload that puts millions of older readings in the table before a run.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from fleet_telemetry.ingest.producer import DEFAULT_COMPRESSION, TelemetryProducer
from fleet_telemetry.core.reading import ewkb_point
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.simulate import make_fleet

# Where the simulated fleet drives (ingest.simulate's cities); geofences go there too.
GATEWAY_ARRAY = 50
"""Readings per message in the gateway-batch scenario, and vehicles per gateway."""
_CITIES = ((52.52, 13.405), (48.137, 11.575), (50.110, 8.682), (53.551, 9.993), (51.227, 6.773))


@dataclass(frozen=True)
class DatasetSpec:
    """What to generate. ``end`` is a whole millisecond, UTC; readings lie in ``[end - span, end)``."""

    readings: int
    vehicles: int
    seed: int
    end: datetime
    span: timedelta

    @property
    def start(self) -> datetime:
        return self.end - self.span


def window_ending_now(span: timedelta, margin: timedelta = timedelta(minutes=2)) -> datetime:
    """The end of a dataset window: ``margin`` before now, truncated to the millisecond."""
    end = datetime.now(timezone.utc) - margin
    return end.replace(microsecond=end.microsecond // 1000 * 1000)


def fleet_ids(spec: DatasetSpec) -> list[UUID]:
    return [vehicle.id for vehicle in make_fleet(spec.vehicles, spec.seed)]


def generate(spec: DatasetSpec) -> Iterator[bytes]:
    """The dataset's message values (one reading each, JSON), in event-time order.

    Reading ``i`` belongs to vehicle ``i % vehicles``; times are whole milliseconds, so a
    preload at other sub-millisecond times can never collide with them. Pure: the same
    spec gives the same bytes.
    """
    fleet = make_fleet(spec.vehicles, spec.seed)
    span_ms = spec.span.total_seconds() * 1000
    start = spec.start
    for i in range(spec.readings):
        moment = start + timedelta(milliseconds=math.floor(i * span_ms / spec.readings))
        yield orjson.dumps(fleet[i % spec.vehicles].step(moment))


def write_dataset(spec: DatasetSpec, path: Path) -> int:
    """Writes :func:`generate`'s values to ``path``, one per line; returns the byte count."""
    size = 0
    with path.open("wb") as out:
        for value in generate(spec):
            out.write(value)
            out.write(b"\n")
            size += len(value) + 1
    return size


def read_dataset(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        for line in source:
            yield line.rstrip(b"\n")


def reading_key(value: bytes) -> bytes:
    """A generated value's ``vehicle_id`` (its first field), the key it is published under."""
    return value[15:51]


def gateway_arrays(values: Iterable[bytes], vehicles: int, size: int = GATEWAY_ARRAY) -> Iterator[tuple[bytes, bytes]]:
    """``(key, value)`` messages holding :func:`generate`'s readings as gateways send them.

    Vehicle ``v`` (reading ``i`` is vehicle ``i % vehicles``'s) reports through gateway
    ``v // size``; each gateway sends a JSON array of the readings it collected, in their
    order, once it holds ``size`` of them (the rest at the end), keyed by the gateway's
    name. One vehicle's readings therefore stay in order in one partition. The arrays
    hold the readings' bytes unchanged. Pure.
    """
    pending: dict[int, list[bytes]] = {}
    for i, value in enumerate(values):
        gateway = (i % vehicles) // size
        held = pending.setdefault(gateway, [])
        held.append(value)
        if len(held) == size:
            yield _gateway_message(gateway, held)
            pending[gateway] = []
    for gateway, held in sorted(pending.items()):
        if held:
            yield _gateway_message(gateway, held)


def _gateway_message(gateway: int, values: list[bytes]) -> tuple[bytes, bytes]:
    return f"gateway-{gateway:05d}".encode(), b"[" + b",".join(values) + b"]"


def copy_row(value: bytes) -> tuple[Any, ...]:
    """One message value as a ``vehicle_telemetry`` COPY record (``fleet_telemetry.consumers.sink.COLUMNS`` order)."""
    r = orjson.loads(value)
    return (
        datetime.fromisoformat(r["time"]), UUID(r["vehicle_id"]), ewkb_point(r["lon"], r["lat"]),
        r.get("speed"), r.get("fuel_level"), r.get("heading"), r.get("odometer_km"), r.get("engine_status"),
    )


async def produce(settings: Settings, topic: str, messages: Iterable[tuple[bytes, bytes]],
                  compression: str | None = DEFAULT_COMPRESSION, *, linger_ms: int = 50,
                  max_batch_size: int = 1024 * 1024) -> dict[int, int]:
    """Publishes ``(key, value)`` messages to ``topic``; returns each partition's end offset.

    Blocks until the broker acknowledged every record. The end offsets come from the
    acknowledgements, not from ListOffsets (which some brokers answer late).
    ``compression`` is the producer's codec (``None``: none).
    """
    ends: dict[int, int] = {}

    def note(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            meta = future.result()
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)

    async with TelemetryProducer(settings, topic=topic, compression_type=compression, linger_ms=linger_ms,
                                 max_batch_size=max_batch_size) as producer:
        for key, value in messages:
            future = await producer.producer.send(topic, value, key=key)
            future.add_done_callback(note)
        await producer.flush()
    await asyncio.sleep(0)  # let the last callbacks run
    return ends


async def produce_file(settings: Settings, topic: str, path: Path, *, arrays_of: int | None = None,
                       vehicles: int = 0, compression: str | None = DEFAULT_COMPRESSION) -> dict[int, int]:
    """Publishes the dataset file to ``topic``, one reading per message keyed by vehicle id, or
    with ``arrays_of`` as :func:`gateway_arrays` of ``vehicles``; see :func:`produce`."""
    values = read_dataset(path)
    if arrays_of:
        return await produce(settings, topic, gateway_arrays(values, vehicles, arrays_of), compression)
    return await produce(settings, topic, ((reading_key(v), v) for v in values), compression)


async def register_fleet(conn: asyncpg.Connection, ids: list[UUID]) -> None:
    """Registers the fleet in ``vehicles`` (as ``fleet simulate`` does)."""
    await conn.executemany(
        "INSERT INTO vehicles (id, vin, license_plate, make, model, year, type, status)"
        " VALUES ($1, $2, $3, 'Simulated', 'Truck', 2024, 'truck', 'active') ON CONFLICT DO NOTHING",
        [(vid, "SIM" + vid.hex[:14].upper(), "SIM-" + vid.hex[:8].upper()) for vid in ids],
    )


def geofence_rows(count: int, seed: int) -> list[tuple[Any, ...]]:
    """``count`` active geofences around the fleet's cities: circles and squares, some with rules.

    Returns ``(name, kind, area_wkt, center_lon, center_lat, radius_m, speed_limit_kmh,
    dwell_seconds)`` tuples; pure and seeded.
    """
    rng = random.Random(seed)
    rows: list[tuple[Any, ...]] = []
    for i in range(count):
        lat, lon = rng.choice(_CITIES)
        lat += rng.uniform(-0.35, 0.35)
        lon += rng.uniform(-0.35, 0.35)
        speed_limit = rng.choice((None, None, 30.0, 50.0, 80.0))
        dwell = rng.choice((None, None, None, 600, 1800))
        if i % 2 == 0:
            rows.append((f"bench-circle-{i}", "circle", None, lon, lat, rng.uniform(200, 3000), speed_limit, dwell))
        else:
            half = rng.uniform(0.002, 0.03)
            square = (f"POLYGON(({lon - half} {lat - half}, {lon + half} {lat - half}, {lon + half} {lat + half},"
                      f" {lon - half} {lat + half}, {lon - half} {lat - half}))")
            rows.append((f"bench-square-{i}", "polygon", square, None, None, None, speed_limit, dwell))
    return rows


async def create_geofences(conn: asyncpg.Connection, count: int, seed: int) -> None:
    await conn.executemany(
        "INSERT INTO geofences (name, kind, area, center, radius_m, speed_limit_kmh, dwell_seconds)"
        " VALUES ($1, $2, ST_GeomFromText($3, 4326),"
        " CASE WHEN $4::float8 IS NULL THEN NULL ELSE ST_SetSRID(ST_MakePoint($4, $5), 4326) END,"
        " $6, $7, $8)",
        geofence_rows(count, seed),
    )


# Older readings of the same fleet, in the 24 hours before the dataset's end, at times
# ending in 500 microseconds (the dataset's are whole milliseconds, so none collide).
_PRELOAD = """
WITH fleet AS (SELECT array_agg(id ORDER BY id) AS ids, count(*)::int AS n FROM vehicles)
INSERT INTO vehicle_telemetry
SELECT $1::timestamptz - make_interval(secs => floor(g * $2::float8) / 1000.0) - interval '500 microseconds',
       fleet.ids[(1 + g % fleet.n)::int],
       ST_SetSRID(ST_MakePoint(6.5 + random() * 7.5, 48.0 + random() * 5.5), 4326),
       random() * 120, 5 + random() * 95, random() * 359.9, 10000 + random() * 390000,
       jsonb_build_object('rpm', 700 + floor(random() * 2500)::int, 'coolant_temp_c', 85 + floor(random() * 8),
                          'ignition', true, 'dtc', '[]'::jsonb)
FROM fleet, generate_series($3::bigint, $4::bigint) AS g
"""


async def preload(conn: asyncpg.Connection, rows: int, end: datetime, *, chunk: int = 1_000_000,
                  progress: Any = None) -> float:
    """Bulk-inserts ``rows`` readings of the registered fleet before ``end``; returns seconds taken.

    One transaction per ``chunk`` rows, then ``VACUUM ANALYZE`` and a checkpoint, so the
    measured run starts from a settled table rather than behind autovacuum.
    """
    started = time.monotonic()
    step_ms = 86_400_000 / rows  # spread over the 24 hours before the dataset ends
    done = 0
    while done < rows:
        upto = min(rows, done + chunk)
        await conn.execute(_PRELOAD, end, step_ms, done + 1, upto)
        done = upto
        if progress is not None:
            progress(f"preload: {done:,} of {rows:,} rows ({time.monotonic() - started:.0f} s)")
    await conn.execute("VACUUM ANALYZE vehicle_telemetry")
    await conn.execute("CHECKPOINT")
    return time.monotonic() - started
