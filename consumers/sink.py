"""The PostgreSQL sink: one batch of readings into ``vehicle_telemetry``, exactly once.

:meth:`TelemetrySink.write` checks that each reading's vehicle is registered, drops
readings whose identity ``(vehicle_id, time)`` is already stored (or appears earlier in
the same batch: the first one wins), and writes the rest with binary COPY in one
transaction, together with the hours the batch touched (for the rollups). It returns
what was stored, what was a duplicate and what belongs to an unknown vehicle. The
caller commits Kafka offsets only after this returns.

The fast path COPYs straight into the partitioned table. Only when that trips the
unique constraint (a redelivery or a replay) does the batch go through a staging table
and ``INSERT ... ON CONFLICT DO NOTHING``, which reports exactly which rows were new.
"""

from __future__ import annotations

import time as monotonic_clock
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from fleet_telemetry.core.reading import Reading, ewkb_point
from fleet_telemetry.core.retry import CONNECT_TIMEOUT_SECONDS

COLUMNS = ("time", "vehicle_id", "location", "speed", "fuel_level", "heading", "odometer_km", "engine_status")

_STAGING_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS telemetry_staging"
    " (LIKE vehicle_telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_INSERT_FROM_STAGING = (
    "INSERT INTO vehicle_telemetry SELECT * FROM telemetry_staging"
    " ON CONFLICT (vehicle_id, time) DO NOTHING RETURNING vehicle_id, time"
)
# The hours a batch touched, for the incremental rollups; PostgreSQL truncates and
# de-duplicates the batch's times faster than Python would.
_MARK_HOURS = (
    "INSERT INTO telemetry_dirty_hours (hour)"
    " SELECT DISTINCT date_trunc('hour', t, 'UTC') FROM unnest($1::timestamptz[]) AS u(t)"
    " ON CONFLICT (hour) DO NOTHING"
)
_ONE_HOUR = timedelta(hours=1)


def hour_marks(times: list[datetime]) -> list[datetime]:
    """Times whose hours are the hours ``times`` touch, for ``_MARK_HOURS``: the earliest
    and the latest when they are at most an hour apart (then every time lies in one of
    their two hours: a live stream's batch, at the cost of a ``min`` and a ``max``), else
    all of them (a batch of late or replayed readings spread wider)."""
    earliest, latest = min(times), max(times)
    return [earliest, latest] if latest - earliest <= _ONE_HOUR else times


_REGISTERED = "SELECT id FROM vehicles WHERE id = ANY($1::uuid[]) AND deleted_at IS NULL"
_UPSERT_POSITIONS = """
INSERT INTO vehicle_positions AS p (vehicle_id, time, location, speed, updated_at)
SELECT v, t, ST_SetSRID(ST_MakePoint(lon, lat), 4326), s, now()
FROM unnest($1::uuid[], $2::timestamptz[], $3::float8[], $4::float8[], $5::float8[]) AS u(v, t, lon, lat, s)
ON CONFLICT (vehicle_id) DO UPDATE
SET time = excluded.time, location = excluded.location, speed = excluded.speed, updated_at = now()
WHERE p.time < excluded.time
"""


def _jsonb_encode(value: Any) -> bytes:
    """jsonb's binary input (version 1, then the text); JSON text the decoder kept goes as it is."""
    return b"\x01" + (value if type(value) is bytes else orjson.dumps(value, default=_json_default))


def _json_default(value: Any) -> str:
    # orjson writes uuid.UUID itself but not asyncpg's subclass, which vehicle ids are.
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _jsonb_decode(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def init_connection(conn: asyncpg.Connection) -> None:
    """Binary codecs for the COPY: geometry as EWKB bytes, jsonb via orjson."""
    geometry_schema = await conn.fetchval(
        "SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace"
        " WHERE t.typname = 'geometry' LIMIT 1"
    )
    if geometry_schema is not None:
        await conn.set_type_codec(
            "geometry", schema=geometry_schema, encoder=bytes, decoder=bytes, format="binary"
        )
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_jsonb_encode, decoder=_jsonb_decode, format="binary"
    )


async def create_pool(database_url: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        database_url, min_size=min_size, max_size=max_size, init=init_connection,
        command_timeout=60, timeout=CONNECT_TIMEOUT_SECONDS,
    )
    assert pool is not None
    return pool


@dataclass
class WriteOutcome:
    stored: list[Reading] = field(default_factory=list)
    duplicates: list[Reading] = field(default_factory=list)
    unknown: list[Reading] = field(default_factory=list)
    refused: list[tuple[Reading, str]] = field(default_factory=list)
    """Readings PostgreSQL refused as data (SQLSTATE class 22), with its message."""


# Data errors: PostgreSQL (SQLSTATE class 22) or asyncpg's encoder refused a value. The
# decoder should have caught it; if it did not, only the offending readings are set
# aside instead of the whole batch failing again on every redelivery.
_DATA_ERRORS = (asyncpg.exceptions.DataError, asyncpg.exceptions._base.DataError)


class VehicleRegistry:
    """Which vehicle ids are registered (and not soft-deleted), cached for ``ttl`` seconds.

    Known ids are cached; unknown ids are asked again on every batch, so a vehicle
    registered a moment ago is accepted at once.
    """

    def __init__(self, ttl: float = 60.0) -> None:
        self._ttl = ttl
        self._known: dict[UUID, float] = {}

    async def unknown(self, conn: asyncpg.Connection, ids: set[UUID]) -> set[UUID]:
        now = monotonic_clock.monotonic()
        missing = [vid for vid in ids if self._known.get(vid, 0.0) < now]
        if not missing:
            return set()
        rows = await conn.fetch(_REGISTERED, missing)
        expires = now + self._ttl
        found = set()
        for row in rows:
            found.add(row["id"])
            self._known[row["id"]] = expires
        if len(self._known) > 1_000_000:  # bound memory on a fleet with churn
            self._known = {k: v for k, v in self._known.items() if v >= now}
        return set(missing) - found


class TelemetrySink:
    """Writes batches of readings into PostgreSQL. One instance per worker."""

    def __init__(self, pool: asyncpg.Pool, registry: VehicleRegistry | None = None) -> None:
        self._pool = pool
        self._registry = registry or VehicleRegistry()

    async def write(self, readings: list[Reading]) -> WriteOutcome:
        """Store ``readings`` once; raises asyncpg errors (the caller retries transient ones)."""
        outcome = WriteOutcome()
        if not readings:
            return outcome
        async with self._pool.acquire() as conn:
            unknown = await self._registry.unknown(conn, {r.vehicle_id for r in readings})
            if not unknown and len({(r.vehicle_id, r.time) for r in readings}) == len(readings):
                await self._store_all(conn, readings, outcome)  # the common batch: every reading new to it
                return outcome
            accepted: list[Reading] = []
            seen: set[tuple[UUID, datetime]] = set()
            for reading in readings:
                identity = (reading.vehicle_id, reading.time)
                if unknown and reading.vehicle_id in unknown:
                    outcome.unknown.append(reading)
                elif identity in seen:
                    outcome.duplicates.append(reading)
                else:
                    seen.add(identity)
                    accepted.append(reading)
            if accepted:
                await self._store_all(conn, accepted, outcome)
        return outcome

    async def _store_all(self, conn: asyncpg.Connection, accepted: list[Reading], outcome: WriteOutcome) -> None:
        try:
            await self._store(conn, accepted, outcome)
        except _DATA_ERRORS:
            await self._store_isolating(conn, accepted, outcome)

    async def _store(self, conn: asyncpg.Connection, accepted: list[Reading], outcome: WriteOutcome) -> None:
        rows = [
            (r.time, r.vehicle_id, ewkb_point(r.lon, r.lat), r.speed, r.fuel_level,
             r.heading, r.odometer_km, r.engine_status if r.engine_json is None else r.engine_json)
            for r in accepted
        ]
        times = [r.time for r in accepted]
        try:
            async with conn.transaction():
                await conn.copy_records_to_table("vehicle_telemetry", records=rows, columns=COLUMNS)
                await conn.execute(_MARK_HOURS, hour_marks(times))
            outcome.stored.extend(accepted)
        except asyncpg.exceptions.UniqueViolationError:
            new = await self._write_skipping_stored(conn, rows, times)
            for reading in accepted:
                (outcome.stored if (reading.vehicle_id, reading.time) in new else outcome.duplicates).append(reading)

    async def _store_isolating(self, conn: asyncpg.Connection, readings: list[Reading],
                               outcome: WriteOutcome) -> None:
        """Halves the batch until the readings PostgreSQL refuses are alone; stores the rest."""
        try:
            await self._store(conn, readings, outcome)
        except _DATA_ERRORS as exc:
            if len(readings) == 1:
                outcome.refused.append((readings[0], str(exc).splitlines()[0][:200]))
                return
            middle = len(readings) // 2
            await self._store_isolating(conn, readings[:middle], outcome)
            await self._store_isolating(conn, readings[middle:], outcome)

    async def _write_skipping_stored(
        self, conn: asyncpg.Connection, rows: list[tuple[Any, ...]], times: list[datetime]
    ) -> set[tuple[UUID, datetime]]:
        await conn.execute(_STAGING_DDL)
        async with conn.transaction():
            await conn.copy_records_to_table("telemetry_staging", records=rows, columns=COLUMNS)
            inserted = await conn.fetch(_INSERT_FROM_STAGING)
            if inserted:
                await conn.execute(_MARK_HOURS, times)
        return {(row["vehicle_id"], row["time"]) for row in inserted}

    async def update_positions(self, newest: dict[UUID, Reading]) -> None:
        """Last-known positions for the nearest-driver search; never moves one backwards."""
        if not newest:
            return
        values = list(newest.values())
        async with self._pool.acquire() as conn:
            await conn.execute(
                _UPSERT_POSITIONS,
                [r.vehicle_id for r in values], [r.time for r in values],
                [r.lon for r in values], [r.lat for r in values], [r.speed for r in values],
            )
