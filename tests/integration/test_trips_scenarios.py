"""Given vehicles with scripted tracks, when they flow through the broker and a worker,
then exactly these trips, stops, idling alerts and events exist: split by stops, never
split or repeated by a restart or a replay, and recomputed by ``fleet maintain`` where
late readings changed them."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import pytest

from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.consumers.sink import TelemetrySink, create_pool
from fleet_telemetry.core.geodesy import sphere_distance_m
from fleet_telemetry.core.reading import Reading, Source
from fleet_telemetry.consumers.worker import Worker
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.trips.model import thresholds_from_settings
from fleet_telemetry.trips.recompute import rebuild
from fleet_telemetry.trips.tracker import TripTracker
from tests.integration.cli import fleet
from tests.integration.streams import publish, run_worker, wait_for

pytestmark = pytest.mark.integration

LAT = 41.9
STEP = 10  # seconds between readings
DLON = 0.002  # degrees east per step: about 166 m, 60 km/h


def trips_settings(settings: Settings, **extra: Any) -> Settings:
    return settings.model_copy(update={"alert_offline_seconds": 0.0, "alert_timer_seconds": 0.3, **extra})


Point = tuple[datetime, float, float, dict[str, Any]]


def drive(start: datetime, seconds: int, lon0: float, **fields: Any) -> list[Point]:
    return [(start + timedelta(seconds=i * STEP), lon0 + i * DLON, 60.0, fields) for i in range(seconds // STEP + 1)]


def halt(start: datetime, seconds: int, lon: float, **fields: Any) -> list[Point]:
    """Halted after ``start``: the first reading one step later."""
    return [(start + timedelta(seconds=i * STEP), lon, 0.0, fields) for i in range(1, seconds // STEP + 1)]


def messages(vid: uuid.UUID, track: list[Point]) -> list[tuple[bytes, dict[str, Any]]]:
    return [(str(vid).encode(), {"vehicle_id": str(vid), "time": t.isoformat(), "lat": LAT, "lon": lon,
                                 "speed": speed, **fields}) for t, lon, speed, fields in track]


def great_circle_km(track: list[Point]) -> float:
    return sum(sphere_distance_m(a[1], LAT, b[1], LAT) for a, b in zip(track, track[1:])) / 1000


async def trip_rows(db: asyncpg.Connection, vid: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT id, start_time, end_time, ST_X(start_location) AS start_lon, ST_X(end_location) AS end_lon,"
        " start_geofence_id, end_geofence_id, distance_km, duration_s, max_speed_kmh, idle_s, updated_at"
        " FROM trips WHERE vehicle_id = $1 ORDER BY start_time", vid)
    return [dict(r) for r in rows]


async def stop_rows(db: asyncpg.Connection, vid: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT id, start_time, end_time, duration_s, geofence_id, idle_s, updated_at FROM stops"
                          " WHERE vehicle_id = $1 ORDER BY start_time", vid)
    return [dict(r) for r in rows]


async def events(db: asyncpg.Connection, vid: uuid.UUID) -> list[tuple[str, datetime, uuid.UUID]]:
    rows = await db.fetch("SELECT type, time, id FROM fleet_events WHERE vehicle_id = $1 AND type LIKE ANY"
                          " (ARRAY['trip.%', 'stop.%']) ORDER BY time, type", vid)
    return [(r["type"], r["time"], r["id"]) for r in rows]


def at(t0: datetime) -> datetime:
    return t0.replace(microsecond=0)


async def test_a_drive_a_stop_and_a_drive_are_two_trips_and_one_stop(topics, producer, db, make_vehicles) -> None:
    settings = trips_settings(topics)
    (vid,) = await make_vehicles(1)
    depot = await db.fetchval(
        "INSERT INTO geofences (name, kind, center, radius_m) VALUES ($1, 'circle', ST_SetSRID(ST_MakePoint($2, $3),"
        " 4326), 100) RETURNING id", f"depot-{vid.hex[:8]}", 12.5, LAT)
    start = at(datetime.now(timezone.utc)) - timedelta(minutes=45)  # still within the gap at the end
    first = drive(start, 600, 12.5)
    parked = halt(first[-1][0], 600, first[-1][1])
    second = drive(parked[-1][0] + timedelta(seconds=STEP), 600, first[-1][1])
    await publish(producer, settings.telemetry_topic, messages(vid, first + parked + second))

    worker = await run_worker(settings)

    trips = await trip_rows(db, vid)
    assert [(t["start_time"], t["end_time"]) for t in trips] == [
        (first[0][0], parked[0][0]), (second[0][0], None)]
    one = trips[0]
    assert one["distance_km"] == pytest.approx(great_circle_km(first), rel=0.02)
    assert one["duration_s"] == 610 and one["max_speed_kmh"] == 60.0
    assert one["start_geofence_id"] == depot and one["end_geofence_id"] is None
    stops = await stop_rows(db, vid)
    assert [(s["start_time"], s["end_time"], s["duration_s"]) for s in stops] == [
        (parked[0][0], second[0][0], (second[0][0] - parked[0][0]).total_seconds())]
    assert [(kind, t) for kind, t, _ in await events(db, vid)] == [
        ("trip.started", first[0][0]), ("stop.started", parked[0][0]), ("trip.ended", parked[0][0]),
        ("stop.ended", second[0][0]), ("trip.started", second[0][0])]
    ended = json.loads(await db.fetchval("SELECT data FROM fleet_events WHERE vehicle_id = $1 AND type = 'trip.ended'",
                                         vid))
    assert ended["trip_id"] == str(one["id"]) and ended["start_geofence_id"] == depot
    assert ended["distance_km"] == pytest.approx(one["distance_km"], abs=0.001)
    odometer = await db.fetchval("SELECT odometer_km FROM vehicle_motion_state WHERE vehicle_id = $1", vid)
    assert odometer == pytest.approx(great_circle_km(first) + great_circle_km(second), rel=0.02)
    assert worker.metrics.value("fleet_trips_total", kind="trip", action="ended") == 1
    assert worker.metrics.value("fleet_trips_total", kind="stop", action="started") == 1

    # What an operator sees, the vehicle named by its plate.
    plate = await db.fetchval("SELECT license_plate FROM vehicles WHERE id = $1", vid)
    window = ("--vehicle", plate, "--from", (start - timedelta(hours=1)).isoformat())
    listed = json.loads(ok(fleet(settings, "trips", "list", *window, "--json")))
    assert [(t["id"], t["end_time"] is None) for t in listed] == [(str(one["id"]), False), (str(trips[1]["id"]), True)]
    assert listed[0]["distance_km"] == round(one["distance_km"], 3)
    assert [s["id"] for s in json.loads(ok(fleet(settings, "stops", "list", *window, "--json")))] == [
        str(stops[0]["id"])]
    shown = json.loads(ok(fleet(settings, "vehicles", "show", plate, "--json")))
    assert shown["odometer_km"] == round(odometer, 3) and shown["engine_hours"] == 0
    # A rebuild recomputes the same trips: nothing rewritten, no new event.
    rebuilt = fleet(settings, "trips", "rebuild", "--since", "1d", "--vehicle", plate, "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["trips"] == 2 and "[1/1] vehicle" in rebuilt.stderr
    assert await trip_rows(db, vid) == trips and await stop_rows(db, vid) == stops
    assert len(await events(db, vid)) == 5
    bad = fleet(settings, "trips", "list", "--vehicle", plate, "--from", "yesterday")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    unknown = fleet(settings, "trips", "rebuild", "--since", "2h", "--vehicle", "NO-SUCH-PLATE")
    assert unknown.returncode == 2 and "NO-SUCH-PLATE" in unknown.stderr.strip().splitlines()[-1]


def ok(done: Any) -> str:
    assert done.returncode == 0, done.stderr
    return str(done.stdout)


async def test_idling_at_a_gate_raises_one_alert_resolved_and_counted_on_the_trip(
    topics, producer, db, make_vehicles
) -> None:
    settings = trips_settings(topics, trips_idle_min_seconds=120.0)
    (vid,) = await make_vehicles(1)
    start = at(datetime.now(timezone.utc)) - timedelta(hours=2)
    engine = {"engine_status": {"ignition": True, "rpm": 850}}
    first = drive(start, 600, 12.5, **engine)
    gate = halt(first[-1][0], 240, first[-1][1], **engine)
    second = drive(gate[-1][0] + timedelta(seconds=STEP), 300, first[-1][1], **engine)
    await publish(producer, settings.telemetry_topic, messages(vid, first + gate + second))

    worker = await run_worker(settings)

    rows = await db.fetch("SELECT type, severity, reading_time, is_resolved, details FROM alerts"
                          " WHERE entity_id = $1 ORDER BY reading_time", vid)
    assert [(r["type"], r["severity"], r["reading_time"], r["is_resolved"]) for r in rows] == [
        ("idling", "info", gate[0][0] + timedelta(seconds=120), True)]
    details = json.loads(rows[0]["details"])
    assert details["idle_s"] == 240.0 and details["resolved_reading_time"] == second[0][0].isoformat()
    assert worker.metrics.value("fleet_alerts_total", type="idling", action="raised") == 1
    assert worker.metrics.value("fleet_alerts_total", type="idling", action="resolved") == 1
    # One trip through the gate, still open; its idle seconds are in the stored state until it ends.
    trips = await trip_rows(db, vid)
    assert [(t["start_time"], t["end_time"]) for t in trips] == [(first[0][0], None)]
    memory = json.loads(await db.fetchval("SELECT memory FROM vehicle_motion_state WHERE vehicle_id = $1", vid))
    assert memory["trip"]["idle"] == 240.0
    engine_s = await db.fetchval("SELECT engine_s FROM vehicle_motion_state WHERE vehicle_id = $1", vid)
    assert engine_s == (second[-1][0] - first[0][0]).total_seconds()
    # Ended by a stop: the idle seconds are the trip row's.
    end = halt(second[-1][0], 400, second[-1][1], engine_status={"ignition": False})
    await publish(producer, settings.telemetry_topic, messages(vid, end))
    await run_worker(settings)
    (trip,) = await trip_rows(db, vid)
    assert trip["end_time"] == end[0][0] and trip["idle_s"] == 240.0


async def test_a_worker_stopped_and_started_mid_trip_makes_one_trip(topics, producer, db, make_vehicles) -> None:
    settings = trips_settings(topics)
    (vid,) = await make_vehicles(1)
    start = at(datetime.now(timezone.utc)) - timedelta(hours=2)
    track = drive(start, 1200, 12.5)
    end = halt(track[-1][0], 400, track[-1][1])
    await publish(producer, settings.telemetry_topic, messages(vid, track[:3]))  # not a trip yet: 20 s, 0.3 km
    await run_worker(settings)
    assert await trip_rows(db, vid) == []
    await publish(producer, settings.telemetry_topic, messages(vid, track[3:60]))
    await run_worker(settings)
    await publish(producer, settings.telemetry_topic, messages(vid, track[60:] + end))
    await run_worker(settings)

    trips = await trip_rows(db, vid)
    assert [(t["start_time"], t["end_time"]) for t in trips] == [(start, end[0][0])]
    assert trips[0]["distance_km"] == pytest.approx(great_circle_km(track), rel=0.02)
    assert [kind for kind, _, _ in await events(db, vid)] == ["trip.started", "stop.started", "trip.ended"]


def readings(vid: uuid.UUID, track: list[Point]) -> list[Reading]:
    return [Reading(vid, t, LAT, lon, speed, None, None, None, None, Source("t", 0, i), None, b"")
            for i, (t, lon, speed, _) in enumerate(track)]


async def test_a_worker_that_died_with_unwritten_states_is_caught_up_to_the_same_trip(
    settings: Settings, db: asyncpg.Connection, make_vehicles
) -> None:
    (vid,) = await make_vehicles(1)
    start = at(datetime.now(timezone.utc)) - timedelta(hours=2)
    track = drive(start, 1200, 12.5)
    track += halt(track[-1][0], 400, track[-1][1])
    pool = await create_pool(settings.database_url)
    try:
        sink = TelemetrySink(pool)
        first = TripTracker(pool, settings, PipelineMetrics())
        for part in (track[0:5], track[5:40], track[40:70]):  # confirmed in the first batch, then written behind
            await first.after_write((await sink.write(readings(vid, part))).stored)
        assert len(await trip_rows(db, vid)) == 1
        del first  # dies: its last states were never written

        second = TripTracker(pool, settings, PipelineMetrics())
        await second.after_write((await sink.write(readings(vid, track[70:]))).stored)
    finally:
        await pool.close()
    trips = await trip_rows(db, vid)
    assert [(t["start_time"], t["end_time"]) for t in trips] == [(start, track[121][0])]
    assert trips[0]["distance_km"] == pytest.approx(great_circle_km(track[:121]), rel=1e-6)


async def test_a_replay_adds_no_trip_and_no_event_id_even_after_maintain(topics, producer, db, make_vehicles) -> None:
    settings = trips_settings(topics)
    (vid,) = await make_vehicles(1)
    start = at(datetime.now(timezone.utc)) - timedelta(minutes=45)  # still within the gap at the end
    first = drive(start, 600, 12.5)
    parked = halt(first[-1][0], 600, first[-1][1])
    second = drive(parked[-1][0] + timedelta(seconds=STEP), 600, first[-1][1])
    await publish(producer, settings.telemetry_topic, messages(vid, first + parked + second))
    await run_worker(settings)
    trips, stops, before = await trip_rows(db, vid), await stop_rows(db, vid), await events(db, vid)

    replay = await run_worker(settings.model_copy(update={"consumer_group": settings.consumer_group + "-replay"}))
    assert replay.metrics.value("fleet_readings_total", outcome="duplicate") == len(first + parked + second)
    assert await trip_rows(db, vid) == trips and await stop_rows(db, vid) == stops
    assert await events(db, vid) == before
    done = fleet(settings, "maintain")
    assert done.returncode == 0, done.stderr
    assert await trip_rows(db, vid) == trips and await stop_rows(db, vid) == stops
    assert await events(db, vid) == before


async def test_a_late_backfill_last_week_is_recomputed_by_maintain_and_nothing_else_changes(
    topics, producer, db, make_vehicles
) -> None:
    settings = trips_settings(topics)
    (vid,) = await make_vehicles(1)
    week = at(datetime.now(timezone.utc)).replace(minute=0, second=0) - timedelta(days=7)
    # Last week: three trips two hours apart (the second with a hole in its readings), then today's trip.
    tracks = [drive(week + timedelta(hours=2 * i), 600, 12.5) for i in range(3)]
    hole = tracks[1][20:40]
    tracks[1] = tracks[1][:20] + tracks[1][40:]
    stopped = [halt(track[-1][0], 400, track[-1][1]) for track in tracks]
    today = drive(at(datetime.now(timezone.utc)) - timedelta(hours=1), 600, 12.5)
    await publish(producer, settings.telemetry_topic,
                  messages(vid, [p for t, s in zip(tracks, stopped) for p in t + s] + today))
    await run_worker(settings)
    before = await trip_rows(db, vid)
    assert len(before) == 4
    assert before[1]["distance_km"] == pytest.approx(great_circle_km(tracks[1]), rel=1e-6)
    events_before = await events(db, vid)
    odometer = "SELECT odometer_km FROM vehicle_motion_state WHERE vehicle_id = $1"
    odometer_before = await db.fetchval(odometer, vid)

    # The hole arrives late (a backfill): a detour 300 m north. The live path only marks it.
    late = [(t, lon, 60.0, {"lat": LAT + 0.0027}) for t, lon, _, _ in hole]
    await publish(producer, settings.telemetry_topic, messages(vid, late))
    await run_worker(settings)
    assert await trip_rows(db, vid) == before
    assert await db.fetchval("SELECT count(*) FROM trip_dirty_hours WHERE vehicle_id = $1", vid) == 1

    done = fleet(settings, "maintain")
    assert done.returncode == 0, done.stderr
    after = await trip_rows(db, vid)
    assert [a["id"] for a in after] == [b["id"] for b in before]
    path = [(lon, LAT) for _, lon, _, _ in tracks[1][:20]] + [(lon, LAT + 0.0027) for _, lon, _, _ in hole] + [
        (lon, LAT) for _, lon, _, _ in tracks[1][20:]]
    detour_km = sum(sphere_distance_m(*a, *b) for a, b in zip(path, path[1:])) / 1000
    assert after[1]["distance_km"] == pytest.approx(detour_km, rel=0.02)
    assert after[1]["distance_km"] > before[1]["distance_km"] + 0.3
    assert after[1]["updated_at"] > before[1]["updated_at"]
    for i in (0, 2, 3):  # untouched: the same rows, not even rewritten
        assert after[i] == before[i]
    assert await db.fetchval("SELECT count(*) FROM trip_dirty_hours WHERE vehicle_id = $1", vid) == 0
    # The odometer accumulator has the detour too.
    assert await db.fetchval(odometer, vid) == pytest.approx(
        odometer_before + after[1]["distance_km"] - before[1]["distance_km"], rel=1e-9)
    # The same facts (a trip's id, start and end did not change): no new event id.
    assert await events(db, vid) == events_before


async def test_a_backfill_written_by_replay_direct_is_recomputed_by_maintain(
    topics, producer, db, make_vehicles, tmp_path
) -> None:
    settings = trips_settings(topics)
    (vid,) = await make_vehicles(1)
    week = at(datetime.now(timezone.utc)).replace(minute=0, second=0) - timedelta(days=7)
    track = drive(week, 600, 12.5)
    hole = track[20:40]
    track = track[:20] + track[40:]
    today = drive(at(datetime.now(timezone.utc)) - timedelta(hours=1), 600, 12.5)
    await publish(producer, settings.telemetry_topic,
                  messages(vid, track + halt(track[-1][0], 400, track[-1][1]) + today))
    await run_worker(settings)
    before = await trip_rows(db, vid)
    assert len(before) == 2

    # The hole comes back from an archive, written around the workers: a detour 300 m north.
    late = [(t, lon, 60.0, {"lat": LAT + 0.0027}) for t, lon, _, _ in hole]
    archive = tmp_path / "archive.ndjson"
    archive.write_bytes(b"".join(orjson.dumps(value) + b"\n" for _, value in messages(vid, late)))
    replayed = fleet(settings, "replay", str(archive), "--direct", "--workers", "1",
                     "--rejects", str(tmp_path / "rejects.ndjson"))
    assert replayed.returncode == 0, replayed.stderr
    assert await trip_rows(db, vid) == before  # nothing live: only marked
    assert await db.fetchval("SELECT count(*) FROM trip_dirty_hours WHERE vehicle_id = $1", vid) == 1

    done = fleet(settings, "maintain")
    assert done.returncode == 0, done.stderr
    after = await trip_rows(db, vid)
    assert [a["id"] for a in after] == [b["id"] for b in before]
    assert after[0]["distance_km"] > before[0]["distance_km"] + 0.3
    assert after[1] == before[1]
    assert await db.fetchval("SELECT count(*) FROM trip_dirty_hours WHERE vehicle_id = $1", vid) == 0


async def test_maintain_ends_the_trip_of_a_vehicle_silent_for_the_gap(topics, producer, db, make_vehicles) -> None:
    settings = trips_settings(topics)
    (vid,) = await make_vehicles(1)
    track = drive(at(datetime.now(timezone.utc)) - timedelta(hours=2), 600, 12.5)
    await publish(producer, settings.telemetry_topic, messages(vid, track))
    await run_worker(settings)
    assert [t["end_time"] for t in await trip_rows(db, vid)] == [None]

    done = fleet(settings, "maintain")
    assert done.returncode == 0, done.stderr
    (trip,) = await trip_rows(db, vid)
    assert (trip["end_time"], trip["end_lon"]) == (track[-1][0], track[-1][1])
    assert [(s["start_time"], s["end_time"]) for s in await stop_rows(db, vid)] == [(track[-1][0], None)]
    assert [kind for kind, _, _ in await events(db, vid)] == ["trip.started", "stop.started", "trip.ended"]
    # The next reading finds nothing left to end.
    await publish(producer, settings.telemetry_topic, messages(vid, halt(at(datetime.now(timezone.utc)), 20, 12.6)))
    await run_worker(settings)
    assert len(await trip_rows(db, vid)) == 1 and len(await stop_rows(db, vid)) == 1


async def test_maintenance_falls_due_by_the_odometer_summed_from_positions(topics, producer, db, make_vehicles) -> None:
    settings = trips_settings(topics)
    (vid,) = await make_vehicles(1)
    oil = await db.fetchval("INSERT INTO maintenance_schedules (name, vehicle_type, interval_km)"
                            " VALUES ($1, 'truck', 5) RETURNING id", f"oil-{vid.hex[:8]}")
    await db.execute("INSERT INTO maintenance_triggers (vehicle_id, schedule_id, next_due_km) VALUES ($1, $2, 5)",
                     vid, oil)
    track = drive(at(datetime.now(timezone.utc)) - timedelta(minutes=30), 600, 12.5)  # about 10 km, no odometer
    track += halt(track[-1][0], 400, track[-1][1])
    await publish(producer, settings.telemetry_topic, messages(vid, track))

    async def due() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM alerts WHERE entity_id = $1 AND type = 'maintenance_due'"
                                      " AND NOT is_resolved", vid))

    worker = Worker(settings, stop_when_idle=None)
    running = asyncio.create_task(worker.run())
    try:
        await wait_for(due, timeout=60, what="maintenance due by the accumulated odometer")
    finally:
        worker.stop()
        assert await asyncio.wait_for(running, timeout=60) == 0
    details = json.loads(await db.fetchval("SELECT details FROM alerts WHERE entity_id = $1 AND type = 'maintenance_due'",
                                           vid))
    assert details["odometer_km"] == pytest.approx(great_circle_km(track), rel=0.02)


async def test_a_worker_holding_a_copy_older_than_a_recomputation_reads_it_back(
    settings: Settings, db: asyncpg.Connection, make_vehicles
) -> None:
    (vid,) = await make_vehicles(1)
    start = at(datetime.now(timezone.utc)) - timedelta(minutes=50)
    track = drive(start, 1200, 12.5)
    track += halt(track[-1][0], 400, track[-1][1])
    pool = await create_pool(settings.database_url)
    try:
        sink = TelemetrySink(pool)
        worker = TripTracker(pool, settings, PipelineMetrics())
        for part in (track[0:10], track[10:40]):
            await worker.after_write((await sink.write(readings(vid, part))).stored)
        maintainer = await asyncpg.connect(settings.database_url)  # as fleet maintain's own connection
        try:
            await rebuild(maintainer, vid, start - timedelta(hours=1), thresholds_from_settings(settings),
                          datetime.now(timezone.utc))
        finally:
            await maintainer.close()
        assert await db.fetchval("SELECT revision FROM vehicle_motion_state WHERE vehicle_id = $1", vid) == 1
        # Its next write (the trip's end) is refused; it reads the row back, catches up, and writes again.
        await worker.after_write((await sink.write(readings(vid, track[40:]))).stored)
    finally:
        await pool.close()
    trips = await trip_rows(db, vid)
    assert [(t["start_time"], t["end_time"]) for t in trips] == [(start, track[121][0])]
    assert trips[0]["distance_km"] == pytest.approx(great_circle_km(track[:121]), rel=1e-6)
    assert [kind for kind, _, _ in await events(db, vid)] == ["trip.started", "stop.started", "trip.ended"]
