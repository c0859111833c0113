"""``fleet geofences``: shapes in, invalid ones refused with the reason, and running
workers following additions, changes and removals without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from fleet_telemetry.consumers.rules import RuleEngine
from fleet_telemetry.consumers.rules.geofences import remove
from fleet_telemetry.consumers.rules.outcome import lock_live_geofences
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.consumers.sink import create_pool
from fleet_telemetry.consumers.worker import Worker
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.core.settings import Settings
from tests.integration.streams import publish, wait_for
from tests.users import TEST_ADMIN

pytestmark = pytest.mark.integration


def fleet(settings: Settings, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEET_DATABASE_URL": settings.database_url, "FLEET_REDIS_URL": settings.redis_url,
           "FLEET_ACTOR": TEST_ADMIN}
    return subprocess.run([sys.executable, "-m", "fleet_telemetry.cli", "geofences", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


async def test_add_list_import_and_remove(settings: Settings, db: asyncpg.Connection, tmp_path: Path) -> None:
    name = f"depot-{uuid.uuid4().hex[:6]}"
    added = fleet(settings, "add", name, "--wkt", "POLYGON((13.40 52.50, 13.41 52.50, 13.41 52.51, 13.40 52.50))",
                  "--speed-limit", "30", "--dwell", "45", "--json")
    assert added.returncode == 0, added.stderr
    polygon = json.loads(added.stdout)["id"]
    circle = fleet(settings, "add", f"{name}-yard", "--circle", "52.5,13.4,250", "--json")
    assert circle.returncode == 0, circle.stderr
    yard = json.loads(circle.stdout)["id"]
    row = await db.fetchrow("SELECT kind, ST_AsText(area) AS area, speed_limit_kmh, dwell_seconds, is_active"
                            " FROM geofences WHERE id = $1", polygon)
    assert dict(row) == {"kind": "polygon", "area": "POLYGON((13.4 52.5,13.41 52.5,13.41 52.51,13.4 52.5))",
                         "speed_limit_kmh": 30.0, "dwell_seconds": 45, "is_active": True}
    row = await db.fetchrow("SELECT kind, ST_X(center) AS lon, ST_Y(center) AS lat, radius_m FROM geofences"
                            " WHERE id = $1", yard)
    assert dict(row) == {"kind": "circle", "lon": 13.4, "lat": 52.5, "radius_m": 250.0}

    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": f"{name}-a", "speed_limit_kmh": 50},
         "geometry": {"type": "MultiPolygon", "coordinates": [[[[1, 1], [1.1, 1], [1.1, 1.1], [1, 1]]]]}},
        {"type": "Feature", "properties": {"name": f"{name}-b", "radius_m": 300, "dwell_seconds": 5},
         "geometry": {"type": "Point", "coordinates": [11.5, 48.1]}},
    ]}
    source = tmp_path / "fences.geojson"
    source.write_text(json.dumps(collection))
    imported = fleet(settings, "import", str(source), "--json")
    assert imported.returncode == 0, imported.stderr
    ids = [f["id"] for f in json.loads(imported.stdout)]
    assert [f["kind"] for f in json.loads(imported.stdout)] == ["polygon", "circle"]

    listed = json.loads(fleet(settings, "list", "--json").stdout)
    mine = {f["id"]: f for f in listed if f["name"].startswith(name)}
    assert set(mine) == {polygon, yard, *ids}
    assert mine[ids[1]]["radius_m"] == 300.0 and mine[ids[1]]["dwell_seconds"] == 5

    removed = fleet(settings, "remove", str(polygon))
    assert removed.returncode == 0, removed.stderr
    assert polygon not in {f["id"] for f in json.loads(fleet(settings, "list", "--all", "--json").stdout)}
    again = fleet(settings, "remove", str(polygon))
    assert again.returncode == 2
    assert again.stderr.strip() == f"fleet geofences: no geofence with id {polygon}; see 'fleet geofences list'"


@pytest.mark.parametrize(("args", "message"), [
    (["--wkt", "POLYGON((0 0, 1 1, 1 0, 0 1, 0 0))"], "--wkt: invalid geometry: Self-intersection[0.5 0.5]"),
    (["--wkt", "POLYGON((0 0, 1 1"], "--wkt: cannot read the geometry: parse error - invalid geometry"),
    (["--wkt", "LINESTRING(0 0, 1 1)"], "--wkt: a geofence is a Polygon or MultiPolygon, not a Linestring"),
    (["--geojson", '{"type": "Polygon", "coordinates": [[[0, 0], [2, 2], [2, 0], [0, 2], [0, 0]]]}'],
     "--geojson: invalid geometry: Self-intersection[1 1]"),
    (["--circle", "52.5,13.4"], "--circle takes LAT,LON,RADIUS_M (three numbers), not '52.5,13.4'"),
    (["--circle", "52.5,13.4,0"], "circle radius must be more than 0 metres, not 0.0"),
    (["--circle", "95,13.4,10"], "circle centre 95.0,13.4 is outside -90..90 latitude, -180..180 longitude"
     " (latitude and longitude swapped? --circle takes LAT,LON, a GeoJSON Point [LON, LAT])"),
    (["--circle", "45,190,10"], "circle centre 45.0,190.0 is outside -90..90 latitude, -180..180 longitude"),
])
async def test_bad_shapes_are_refused_with_the_reason(
    settings: Settings, db: asyncpg.Connection, args: list[str], message: str
) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    result = fleet(settings, "add", name, *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"fleet geofences: {message}"]
    assert await db.fetchval("SELECT count(*) FROM geofences WHERE name = $1", name) == 0


async def test_an_import_with_one_bad_feature_writes_nothing(settings: Settings, db: asyncpg.Connection) -> None:
    name = f"batch-{uuid.uuid4().hex[:6]}"
    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": name}, "geometry": {
            "type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}},
        {"type": "Feature", "properties": {"name": name}, "geometry": {"type": "Point", "coordinates": [1, 1]}},
    ]}
    result = fleet(settings, "import", "-", stdin=json.dumps(collection))
    assert result.returncode == 2
    assert result.stderr.strip() == "fleet geofences: feature 1: a Point is a circle and needs a 'radius_m' property"
    assert await db.fetchval("SELECT count(*) FROM geofences WHERE name = $1", name) == 0


async def test_the_index_follows_added_changed_and_removed_geofences(
    settings: Settings, db: asyncpg.Connection, redis_client
) -> None:
    pool = await create_pool(settings.database_url)
    try:
        engine = RuleEngine(pool, redis_client, settings, PipelineMetrics())
        await engine.refresh_geofences()
        fid = await db.fetchval(
            "INSERT INTO geofences (name, kind, center, radius_m) VALUES ('moving-' || gen_random_uuid(), 'circle',"
            " ST_SetSRID(ST_MakePoint(-40, -40), 4326), 100) RETURNING id")
        assert await engine.refresh_geofences() is True
        assert engine.index.fences[fid].covers(-40.0, -40.0)
        assert await engine.refresh_geofences() is False
        await db.execute("UPDATE geofences SET center = ST_SetSRID(ST_MakePoint(-41, -40), 4326) WHERE id = $1", fid)
        assert await engine.refresh_geofences() is True
        assert not engine.index.fences[fid].covers(-40.0, -40.0) and engine.index.fences[fid].covers(-41.0, -40.0)
        await redis_client.geoadd(f"geofence:{fid}", (-41.0, -40.0, "someone"))
        await db.execute("UPDATE geofences SET is_active = false WHERE id = $1", fid)
        assert await engine.refresh_geofences() is True
        assert fid not in engine.index.fences
        assert await redis_client.exists(f"geofence:{fid}") == 0
    finally:
        await pool.close()


async def test_a_running_worker_picks_up_a_new_geofence_within_seconds(topics, producer, db, make_vehicles) -> None:
    settings = topics.model_copy(update={"geofence_refresh_seconds": 0.2, "geofence_dwell_seconds": 0.0,
                                         "alert_offline_seconds": 0.0})
    (vid,) = await make_vehicles(1)
    worker = Worker(settings, stop_when_idle=None)
    running = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: _active(worker, minimum=0), timeout=30, what="the worker to start")
        before = worker.metrics.value("fleet_geofences_active")
        added = fleet(settings, "add", f"new-{uuid.uuid4().hex[:6]}", "--circle=-33.9,151.2,500", "--json")
        assert added.returncode == 0, added.stderr
        fid = json.loads(added.stdout)["id"]
        await wait_for(lambda: _active(worker, minimum=before + 1), timeout=10, what="the new geofence")
        now = datetime.now(timezone.utc)
        await publish(producer, settings.telemetry_topic, [(str(vid).encode(), {
            "vehicle_id": str(vid), "time": (now - timedelta(seconds=10)).isoformat(), "lat": -33.9, "lon": 151.2})])

        async def entered() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM geofence_transitions WHERE vehicle_id = $1"
                                          " AND geofence_id = $2 AND kind = 'enter'", vid, fid))
        await wait_for(entered, timeout=30, what="the enter")
    finally:
        worker.stop()
        assert await asyncio.wait_for(running, timeout=60) == 0


async def _active(worker: Worker, minimum: float) -> bool:
    return worker.metrics.registry.get_sample_value("fleet_geofences_active") is not None and (
        worker.metrics.value("fleet_geofences_active") >= minimum)


def _at(vid: uuid.UUID, when: datetime, lat: float, lon: float, speed: float) -> Reading:
    return Reading(vid, when, lat, lon, speed, None, None, None, None, Source("t", 0, 0), None, b"")


async def test_removing_a_geofence_closes_what_is_open_and_a_stale_worker_cannot_reopen_it(
    settings: Settings, db: asyncpg.Connection, redis_client, make_vehicles
) -> None:
    settings = settings.model_copy(update={"geofence_dwell_seconds": 0.0, "alert_offline_seconds": 0.0,
                                           "alert_overspeed_min_seconds": 0.0})
    lat, lon = random.uniform(-50, 50), random.uniform(-170, 170)
    fence = await db.fetchval(
        "INSERT INTO geofences (name, kind, area, speed_limit_kmh) VALUES ('doomed-' || gen_random_uuid(), 'polygon',"
        " ST_MakeEnvelope($1, $2, $3, $4, 4326), 30) RETURNING id", lon, lat, lon + 0.01, lat + 0.01)
    yard = await db.fetchval(
        "INSERT INTO geofences (name, kind, center, radius_m) VALUES ('yard-' || gen_random_uuid(), 'circle',"
        " ST_SetSRID(ST_MakePoint($1, $2), 4326), 300) RETURNING id", lon + 1, lat)
    inside, parked, passer_by, latecomer = await make_vehicles(4)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=20)
    mid_lat, mid_lon = lat + 0.005, lon + 0.005

    def seconds(n: int) -> datetime:
        return start + timedelta(seconds=n)

    pool = await create_pool(settings.database_url)
    try:
        engine = RuleEngine(pool, redis_client, settings, PipelineMetrics())
        await engine.refresh_geofences()
        await engine.after_write([
            _at(inside, seconds(0), mid_lat, mid_lon, 50.0), _at(inside, seconds(10), mid_lat, mid_lon + 0.001, 55.0),
            _at(parked, seconds(0), lat, lon + 1, 0.0),
            _at(passer_by, seconds(0), lat - 0.5, lon, 50.0),
        ])
        assert await _fence_rows(db, fence) == ([(inside, "enter", seconds(0))], [inside], [("overspeed", False)])
        assert await redis_client.exists(f"geofence:{fence}", f"geofence:{yard}") == 2
        alert = await db.fetchval("SELECT id FROM alerts WHERE geofence_id = $1", fence)

        removed = fleet(settings, "remove", str(fence), "--json")
        assert removed.returncode == 0, removed.stderr
        assert json.loads(removed.stdout) == {
            "removed": [fence], "closed": [{"id": fence, "exits": [str(inside)], "alerts_resolved": [alert]}]}
        exits, states, alerts = await _fence_rows(db, fence)
        assert exits[0] == (inside, "enter", seconds(0)) and exits[1][:2] == (inside, "exit") and len(exits) == 2
        assert exits[1][2] >= seconds(10)
        assert await db.fetchrow("SELECT lat, lon, crossing FROM geofence_transitions WHERE geofence_id = $1"
                                 " AND kind = 'exit'", fence) == (mid_lat, mid_lon + 0.001, False)
        assert (states, alerts) == ([], [("overspeed", True)])
        assert await redis_client.exists(f"geofence:{fence}") == 0

        text = fleet(settings, "remove", str(yard))
        assert text.returncode == 0, text.stderr
        assert text.stdout.splitlines() == [f"removed geofence {yard}",
                                            f"geofence {yard}: exit recorded for 1 vehicle inside, no open alert"]

        # This worker has not reloaded its geofences yet: what it evaluates now must not
        # bring them back (no state, transition or alert for a removed geofence).
        assert fence in engine.index.fences
        await engine.after_write([
            _at(inside, seconds(20), mid_lat, mid_lon + 0.002, 70.0),
            _at(latecomer, seconds(20), mid_lat, mid_lon, 60.0), _at(latecomer, seconds(30), mid_lat, mid_lon, 65.0),
            _at(parked, seconds(20), lat, lon + 1, 0.0),
        ])
        await engine.after_write([_at(inside, seconds(30), lat - 0.5, lon, 40.0)])
        await engine.flush()
        assert await _fence_rows(db, fence) == (exits, [], [("overspeed", True)])
        assert len((await _fence_rows(db, yard))[0]) == 2
        assert await redis_client.exists(f"geofence:{fence}", f"geofence:{yard}") == 0
        assert await db.fetchval("SELECT count(*) FROM vehicle_geofence_state WHERE geofence_id = ANY($1::int8[])",
                                 [fence, yard]) == 0
    finally:
        await pool.close()


async def _fence_rows(
    db: asyncpg.Connection, fence: int
) -> tuple[list[tuple[uuid.UUID, str, datetime]], list[uuid.UUID], list[tuple[str, bool]]]:
    """A geofence's transitions, the vehicles with a state row for it, its alerts (type, resolved)."""
    transitions = await db.fetch("SELECT vehicle_id, kind, time FROM geofence_transitions WHERE geofence_id = $1"
                                 " ORDER BY time, kind", fence)
    states = await db.fetch("SELECT vehicle_id FROM vehicle_geofence_state WHERE geofence_id = $1", fence)
    alerts = await db.fetch("SELECT type, is_resolved FROM alerts WHERE geofence_id = $1 ORDER BY id", fence)
    return ([(r["vehicle_id"], r["kind"], r["time"]) for r in transitions], [r["vehicle_id"] for r in states],
            [(r["type"], r["is_resolved"]) for r in alerts])


async def test_a_removal_and_a_rules_transaction_in_flight_wait_for_each_other(
    settings: Settings, db: asyncpg.Connection, make_vehicles
) -> None:
    settings = settings.model_copy(update={"geofence_dwell_seconds": 0.0, "alert_offline_seconds": 0.0,
                                           "alert_overspeed_min_seconds": 0.0})
    lat, lon = random.uniform(-50, 50), random.uniform(-170, 170)
    first, second = [await db.fetchval(
        "INSERT INTO geofences (name, kind, area, speed_limit_kmh) VALUES ('racing-' || $5, 'polygon',"
        " ST_MakeEnvelope($1, $2, $3, $4, 4326), 30) RETURNING id", lon + k, lat, lon + k + 0.01, lat + 0.01,
        uuid.uuid4().hex[:8])
        for k in (0, 1)]
    vehicle, driver = await make_vehicles(2)
    worker = await asyncpg.connect(settings.database_url)
    remover = await asyncpg.connect(settings.database_url)
    pool = await create_pool(settings.database_url)
    try:
        # A rules transaction holds the geofence and raises an alert for it: the removal
        # waits for it, then resolves that alert too.
        transaction = worker.transaction()
        await transaction.start()
        assert await lock_live_geofences(worker, {first}) == {first}
        alert = await worker.fetchval("INSERT INTO alerts (entity_id, type, severity, geofence_id)"
                                      " VALUES ($1, 'overspeed', 'warning', $2) RETURNING id", vehicle, first)
        removing = asyncio.create_task(remove(remover, [first], settings.redis_url))
        await asyncio.sleep(0.5)
        assert not removing.done()
        await transaction.commit()
        removal = await asyncio.wait_for(removing, timeout=10)
        assert removal.closed[0].alerts_resolved == [alert]
        assert await db.fetchval("SELECT is_resolved FROM alerts WHERE id = $1", alert)

        # A removal in progress: a worker's batch that enters the geofence and speeds in
        # it waits, then writes nothing for it.
        engine = RuleEngine(pool, None, settings, PipelineMetrics())
        await engine.refresh_geofences()
        transaction = remover.transaction()
        await transaction.start()
        await remover.execute("SELECT id FROM geofences WHERE id = $1 FOR UPDATE", second)
        await remover.execute("UPDATE geofences SET is_active = false, deleted_at = now() WHERE id = $1", second)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        evaluating = asyncio.create_task(engine.after_write([
            _at(driver, now - timedelta(seconds=20), lat + 0.005, lon + 1.005, 60.0),
            _at(driver, now - timedelta(seconds=10), lat + 0.005, lon + 1.006, 70.0)]))
        await asyncio.sleep(0.5)
        assert not evaluating.done()
        await transaction.commit()
        await asyncio.wait_for(evaluating, timeout=10)
        assert await _fence_rows(db, second) == ([], [], [])
    finally:
        await pool.close()
        await worker.close()
        await remover.close()
