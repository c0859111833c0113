"""Given a worker that died with states it had not written yet, or two workers that both
believe they own a vehicle, the rules still see every stored reading once, in order."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from fleet_telemetry.consumers.rules import RuleEngine
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.consumers.sink import TelemetrySink, create_pool
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.core.settings import Settings

pytestmark = pytest.mark.integration


def track(vid: uuid.UUID, start: datetime, lat: float, lon0: float, steps: range) -> list[Reading]:
    """West to east at 10 s intervals, 0.0005 deg per step; inside [lon0, lon0 + 0.01] from step 10."""
    return [Reading(vid, start + timedelta(seconds=10 * i), lat, lon0 - 0.00475 + 0.0005 * i, 40.0, None, None,
                    None, None, Source("t", 0, i), None, b"") for i in steps]


async def setup(db: asyncpg.Connection, make_vehicles) -> tuple[uuid.UUID, int, float, float, datetime]:
    lat, lon = random.uniform(-50, 50), random.uniform(-170, 170)
    fence = await db.fetchval(
        "INSERT INTO geofences (name, kind, area) VALUES ($5, 'polygon', ST_MakeEnvelope($1, $2, $3, $4, 4326))"
        " RETURNING id", lon, lat, lon + 0.01, lat + 0.01, f"recovery-{uuid.uuid4().hex[:8]}")
    (vid,) = await make_vehicles(1)
    return vid, fence, lat + 0.005, lon, datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=20)


async def transitions(db: asyncpg.Connection, vid: uuid.UUID) -> list[tuple[str, datetime]]:
    rows = await db.fetch("SELECT kind, time FROM geofence_transitions WHERE vehicle_id = $1 ORDER BY time", vid)
    return [(r["kind"], r["time"]) for r in rows]


async def test_readings_a_dead_worker_stored_but_never_wrote_rules_for_are_caught_up(
    settings: Settings, db: asyncpg.Connection, make_vehicles
) -> None:
    vid, _, lat, lon, start = await setup(db, make_vehicles)
    settings = settings.model_copy(update={"geofence_dwell_seconds": 20.0, "alert_offline_seconds": 0.0})
    pool = await create_pool(settings.database_url)
    try:
        sink = TelemetrySink(pool)
        first = RuleEngine(pool, None, settings, PipelineMetrics())
        await first.refresh_geofences()
        for steps in (range(0, 8), range(8, 12)):  # the second batch reaches the fence, enter pending
            stored = (await sink.write(track(vid, start, lat, lon, steps))).stored
            await first.after_write(stored)
        assert await transitions(db, vid) == []
        del first  # dies: its last state was never written

        second = RuleEngine(pool, None, settings, PipelineMetrics())
        await second.refresh_geofences()
        stored = (await sink.write(track(vid, start, lat, lon, range(12, 16)))).stored
        await second.after_write(stored)
        # The enter is dated at the first reading inside, which only the dead worker saw.
        assert await transitions(db, vid) == [("enter", start + timedelta(seconds=100))]
    finally:
        await pool.close()


async def test_a_stale_worker_reads_the_state_back_instead_of_overwriting_it(
    settings: Settings, db: asyncpg.Connection, make_vehicles
) -> None:
    vid, _, lat, lon, start = await setup(db, make_vehicles)
    settings = settings.model_copy(update={"geofence_dwell_seconds": 0.0, "alert_offline_seconds": 0.0})
    pool = await create_pool(settings.database_url)
    try:
        sink = TelemetrySink(pool)
        a = RuleEngine(pool, None, settings, PipelineMetrics())
        b = RuleEngine(pool, None, settings, PipelineMetrics())
        for engine in (a, b):
            await engine.refresh_geofences()
        for engine, steps in ((a, range(0, 8)), (b, range(8, 20)), (a, range(20, 40))):
            stored = (await sink.write(track(vid, start, lat, lon, steps))).stored
            await engine.after_write(stored)
        await a.flush()
        assert await transitions(db, vid) == [("enter", start + timedelta(seconds=100)),
                                              ("exit", start + timedelta(seconds=300))]
        assert await db.fetchval("SELECT last_time FROM vehicle_rule_state WHERE vehicle_id = $1", vid) == (
            start + timedelta(seconds=390))
    finally:
        await pool.close()
