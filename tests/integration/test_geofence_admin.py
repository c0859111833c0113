"""``fleet geofences`` completed: update, unique names among the active ones, export that
import reads back, the negative-latitude hint, swapped coordinates, and ``import --name``."""

from __future__ import annotations

import json
import subprocess
import random
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from fleet_telemetry.consumers.rules import RuleEngine
from fleet_telemetry.consumers.sink import create_pool
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.schema.migrate import load_migrations
from tests.databases import create_database, drop_database
from tests.integration.cli import fleet
from tests.users import seed as seed_users

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def empty(base_settings: Settings) -> AsyncIterator[Settings]:
    """A freshly migrated database of this test's own (no geofence, no vehicle)."""
    name = f"fleet_test_{uuid.uuid4().hex[:10]}"
    url = await create_database(base_settings.database_url, name, migrate=True)
    await seed_users(url)
    try:
        yield base_settings.model_copy(update={"database_url": url, "redis_key_prefix": f"test-{name}:"})
    finally:
        await drop_database(base_settings.database_url, name)


def added(settings: Settings, *args: str) -> int:
    result = fleet(settings, "geofences", "add", *args, "--json")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["id"])


def error(result: "subprocess.CompletedProcess[str]") -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    return line


def square(lon: float, lat: float, size: float = 0.01) -> str:
    return (f"POLYGON(({lon} {lat}, {lon + size} {lat}, {lon + size} {lat + size}, {lon} {lat + size},"
            f" {lon} {lat}))")


async def test_update_changes_fields_and_switching_off_closes_what_is_open(
    settings: Settings, db: asyncpg.Connection, redis_client: aioredis.Redis, make_vehicles
) -> None:
    settings = settings.model_copy(update={"geofence_dwell_seconds": 0.0, "alert_offline_seconds": 0.0,
                                           "alert_overspeed_min_seconds": 0.0,
                                           "redis_key_prefix": f"test-{uuid.uuid4().hex[:8]}:"})
    name = f"gate-{uuid.uuid4().hex[:6]}"
    lat, lon = random.uniform(-50, 50), random.uniform(-170, 170)
    fid = added(settings, name, "--wkt", square(lon, lat), "--speed-limit", "30")

    renamed = fleet(settings, "geofences", "update", str(fid), "--name", f"{name}-north", "--dwell", "15", "--json")
    assert renamed.returncode == 0, renamed.stderr
    assert {k: json.loads(renamed.stdout)[k] for k in ("name", "speed_limit_kmh", "dwell_seconds", "active")} == {
        "name": f"{name}-north", "speed_limit_kmh": 30.0, "dwell_seconds": 15, "active": True}
    cleared = fleet(settings, "geofences", "update", str(fid), "--speed-limit", "none", "--dwell", "none")
    assert cleared.stdout.strip() == f"geofence {fid} updated (polygon '{name}-north', active)"
    assert await db.fetchrow("SELECT speed_limit_kmh, dwell_seconds FROM geofences WHERE id = $1", fid) == (None, None)
    fleet(settings, "geofences", "update", str(fid), "--speed-limit", "30")

    # A vehicle inside, speeding: switching the geofence off records its exit and resolves the alert.
    (vid,) = await make_vehicles(1)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
    pool = await create_pool(settings.database_url)
    try:
        engine = RuleEngine(pool, redis_client, settings, PipelineMetrics())
        await engine.refresh_geofences()
        await engine.after_write([Reading(vid, start + timedelta(seconds=s), lat + 0.005, lon + 0.005, 60.0, None,
                                          None, None, None, Source("t", 0, s), None, b"") for s in (0, 10)])
    finally:
        await pool.close()
    key = f"{settings.redis_key_prefix}geofence:{fid}"
    assert await redis_client.exists(key) == 1
    alert = await db.fetchval("SELECT id FROM alerts WHERE geofence_id = $1 AND NOT is_resolved", fid)
    assert alert is not None

    off = fleet(settings, "geofences", "update", str(fid), "--inactive", "--json")
    assert off.returncode == 0, off.stderr
    shown = json.loads(off.stdout)
    assert shown["active"] is False
    assert shown["closed"] == [{"id": fid, "exits": [str(vid)], "alerts_resolved": [alert]}]
    assert await db.fetchval("SELECT details ->> 'resolved_because' FROM alerts WHERE id = $1", alert) == \
        "geofence deactivated"
    assert await db.fetchval("SELECT count(*) FROM vehicle_geofence_state WHERE geofence_id = $1", fid) == 0
    assert await redis_client.exists(key) == 0

    # Its name is free while it is off; switching it on again needs the name back.
    other = added(settings, f"{name}-north", f"--circle={lat},{lon},100")
    assert error(fleet(settings, "geofences", "update", str(fid), "--active")) == (
        f"fleet geofences: an active geofence has this name already: '{name}-north' (id {other}); choose another"
        " name, or deactivate it first ('fleet geofences update ID --inactive')")
    on = fleet(settings, "geofences", "update", str(fid), "--active", "--name", f"{name}-south")
    assert on.returncode == 0, on.stderr

    assert error(fleet(settings, "geofences", "update", str(fid))) == (
        "fleet geofences: nothing to change: give --name, --speed-limit, --dwell, --active or --inactive")
    assert error(fleet(settings, "geofences", "update", "987654321", "--name", "x")) == (
        "fleet geofences: no geofence with id 987654321; see 'fleet geofences list'")
    assert "must be above 0" in error(fleet(settings, "geofences", "update", str(fid), "--speed-limit", "0"))
    assert "not allowed with argument" in error(fleet(settings, "geofences", "update", str(fid), "--active",
                                                      "--inactive"))


async def test_names_are_unique_among_active_geofences(settings: Settings, db: asyncpg.Connection) -> None:
    name = f"depot-{uuid.uuid4().hex[:6]}"
    first = added(settings, name, "--circle", "52.5,13.4,100")
    assert error(fleet(settings, "geofences", "add", name, "--circle", "52.6,13.4,100")) == (
        f"fleet geofences: an active geofence has this name already: '{name}' (id {first}); choose another name,"
        " or deactivate it first ('fleet geofences update ID --inactive')")
    added(settings, name, "--circle", "52.6,13.4,100", "--inactive")  # an inactive one may share it
    twice = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": f"{name}-x", "radius_m": 50},
         "geometry": {"type": "Point", "coordinates": [13.4, 52.5]}} for _ in range(2)]}
    assert error(fleet(settings, "geofences", "import", "-", stdin=json.dumps(twice))) == (
        f"fleet geofences: geofence names repeat: '{name}-x'; a name is unique among the active geofences")
    assert await db.fetchval("SELECT count(*) FROM geofences WHERE name LIKE $1 || '%'", name) == 2


async def test_the_migration_renames_active_geofences_that_share_a_name(empty: Settings) -> None:
    conn = await asyncpg.connect(empty.database_url)
    try:
        await conn.execute("DROP INDEX geofences_active_name_key")
        ids = [await conn.fetchval("INSERT INTO geofences (name, kind, center, radius_m, is_active) VALUES ($1,"
                                   " 'circle', ST_SetSRID(ST_MakePoint(13.4, 52.5), 4326), 100, $2) RETURNING id",
                                   name, active)
               for name, active in (("yard", True), ("yard", True), ("yard", False), ("gate", True))]
        (migration,) = [m for m in load_migrations() if m.version == "0032_geofence_active_names"]
        await conn.execute(migration.sql)
        names = [await conn.fetchval("SELECT name FROM geofences WHERE id = $1", i) for i in ids]
        assert names == ["yard", f"yard #{ids[1]}", "yard", "gate"]
    finally:
        await conn.close()


async def test_export_is_what_import_reads_back(settings: Settings, empty: Settings, tmp_path: Path) -> None:
    first = added(empty, "depot", "--wkt", square(13.4, 52.5), "--speed-limit", "30", "--dwell", "45")
    added(empty, "yard", "--circle=-33.9,151.2,250")
    added(empty, "old", "--circle", "48.1,11.5,80", "--inactive")
    exported = fleet(empty, "geofences", "export", "--all")
    assert exported.returncode == 0, exported.stderr
    collection = json.loads(exported.stdout)
    assert collection["type"] == "FeatureCollection"
    assert [f["properties"]["name"] for f in collection["features"]] == ["depot", "yard", "old"]
    assert collection["features"][1]["geometry"] == {"type": "Point", "coordinates": [151.2, -33.9]}
    listed = json.loads(fleet(empty, "geofences", "export", "--json").stdout)
    assert [f["name"] for f in listed] == ["depot", "yard"]
    assert listed[0]["wkt"] == "POLYGON((13.4 52.5,13.41 52.5,13.41 52.51,13.4 52.51,13.4 52.5))"

    # Into another database, under other names (the same names may be in use there).
    tag = uuid.uuid4().hex[:6]
    for feature in collection["features"]:
        feature["properties"]["name"] += f"-{tag}"
    source = tmp_path / "fences.geojson"
    source.write_text(json.dumps(collection))
    imported = fleet(settings, "geofences", "import", str(source), "--json")
    assert imported.returncode == 0, imported.stderr
    again = {f["name"]: f for f in json.loads(fleet(settings, "geofences", "export", "--json", "--all").stdout)
             if f["name"].endswith(tag)}
    before = {f["name"] + f"-{tag}": f for f in json.loads(fleet(empty, "geofences", "export", "--json",
                                                                  "--all").stdout)}
    keep = ("kind", "active", "speed_limit_kmh", "dwell_seconds", "wkt", "lat", "lon", "radius_m", "area_m2")
    assert {n: {k: f.get(k) for k in keep} for n, f in again.items()} == \
        {n: {k: f.get(k) for k in keep} for n, f in before.items()}
    assert first


def test_a_negative_latitude_after_circle_gets_the_way_to_write_it(settings: Settings) -> None:
    line = error(fleet(settings, "geofences", "add", "cape", "--circle", "-33.9,18.4,500"))
    assert line.startswith("fleet geofences add: error: argument --circle: expected one argument: a negative"
                           " latitude reads as an option, so write --circle=-33.9,18.4,500")


async def test_swapped_coordinates_are_refused_or_warned_about(empty: Settings) -> None:
    conn = await asyncpg.connect(empty.database_url)
    try:  # the fleet drives around Munich
        vid = uuid.uuid4()
        await conn.execute("INSERT INTO vehicles (id, vin, license_plate) VALUES ($1, 'SWAP1', 'M-SW 1')", vid)
        await conn.execute("INSERT INTO vehicle_positions (vehicle_id, time, location) VALUES ($1, now(),"
                           " ST_SetSRID(ST_MakePoint(11.5, 48.1), 4326))", vid)
    finally:
        await conn.close()
    # Sydney written latitude first: a latitude of 151 cannot be.
    assert error(fleet(empty, "geofences", "add", "harbour", "--wkt", "POLYGON((-33.9 151.2, -33.8 151.2,"
                       " -33.8 151.3, -33.9 151.2))")) == (
        "fleet geofences: --wkt: latitude and longitude look swapped: latitudes reach 151.3 while every longitude"
        " would fit as a latitude; WKT and GeoJSON take longitude first (x y)")
    assert "(latitude and longitude swapped? --circle takes LAT,LON" in error(
        fleet(empty, "geofences", "add", "harbour", "--circle", "151.2,-33.9,500"))
    # Munich written latitude first lands in the Horn of Africa, far from the fleet: stored, with a warning
    # (the first one inactive: an active geofence there would make the second look intended).
    swapped = fleet(empty, "geofences", "add", "depot", "--wkt", square(48.1, 11.5), "--inactive")
    assert swapped.returncode == 0
    assert swapped.stderr.startswith("fleet geofences: warning: 'depot' lies over 100 km from every vehicle and"
                                     " active geofence, but with latitude and longitude exchanged it would be near")
    circle = fleet(empty, "geofences", "add", "yard", "--circle", "11.5,48.1,300")
    assert circle.returncode == 0 and "warning: 'yard' lies over 100 km" in circle.stderr
    right = fleet(empty, "geofences", "add", "gate", "--wkt", square(11.5, 48.1))
    assert right.returncode == 0 and right.stderr == ""


async def test_import_names_unnamed_features_with_name(settings: Settings, db: asyncpg.Connection) -> None:
    name = f"zone-{uuid.uuid4().hex[:6]}"

    def feature(lon: float) -> dict[str, object]:
        return {"type": "Feature", "properties": {},
                "geometry": {"type": "Polygon", "coordinates": [[[lon, 1], [lon + 0.1, 1], [lon + 0.1, 1.1],
                                                                 [lon, 1]]]}}

    one = json.dumps(feature(1.0))
    assert error(fleet(settings, "geofences", "import", "-", stdin=one)) == (
        "fleet geofences: feature 0: needs a name (a 'name' property, or --name)")
    named = fleet(settings, "geofences", "import", "-", "--name", name, "--json", stdin=one)
    assert named.returncode == 0, named.stderr
    assert [f["name"] for f in json.loads(named.stdout)] == [name]
    several = json.dumps({"type": "FeatureCollection", "features": [
        feature(2.0), {**feature(3.0), "properties": {"name": f"{name}-own"}}, feature(4.0)]})
    imported = fleet(settings, "geofences", "import", "-", "--name", f"{name}-b", "--json", stdin=several)
    assert imported.returncode == 0, imported.stderr
    assert [f["name"] for f in json.loads(imported.stdout)] == [f"{name}-b 1", f"{name}-own", f"{name}-b 2"]
