"""Given vehicles with scripted tracks, when their readings flow through the broker and a
worker, then every alert raised and resolved and every geofence entered and exited is on
the events topic once, keyed by its vehicle, with the documented fields and an id derived
from the fact; a redelivery publishes nothing new; an event left in the outbox is
published by the worker's timer."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import pytest

from fleet_telemetry.core.events import (
    ALERT_RAISED, ALERT_RESOLVED, GEOFENCE_ENTERED, GEOFENCE_EXITED, STOP_ENDED, TRIP_ENDED, TRIP_STARTED, FleetEvent,
    event_id, record_events,
)
from fleet_telemetry.core.reading import status_time
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.views.alerts import resolve_alert
from tests.integration.streams import Record, publish, read_topic, run_worker
from tests.users import TEST_ADMIN

pytestmark = pytest.mark.integration


def events_settings(settings: Settings, **extra: Any) -> Settings:
    return settings.model_copy(update={
        "geofence_dwell_seconds": 0.0, "geofence_refresh_seconds": 0.2, "alert_timer_seconds": 0.3,
        "alert_offline_seconds": 7200.0, "alert_overspeed_kmh": 120.0, "alert_overspeed_min_seconds": 20.0,
        "events_drain_seconds": 0.2, **extra,
    })


async def square(db: asyncpg.Connection, lat: float, lon: float, size: float) -> tuple[int, str]:
    name = f"depot-{uuid.uuid4().hex[:6]}"
    wkt = f"POLYGON(({lon} {lat}, {lon + size} {lat}, {lon + size} {lat + size}, {lon} {lat + size}, {lon} {lat}))"
    fence = await db.fetchval("INSERT INTO geofences (name, kind, area) VALUES ($1, 'polygon',"
                              " ST_GeomFromText($2, 4326)) RETURNING id", name, wkt)
    return fence, name


async def assign_driver(db: asyncpg.Connection, vid: uuid.UUID, since: datetime) -> uuid.UUID:
    driver = await db.fetchval("INSERT INTO drivers (name) VALUES ('Ada') RETURNING id")
    await db.execute("INSERT INTO vehicle_assignments (vehicle_id, driver_id, start_time) VALUES ($1, $2, $3)",
                     vid, driver, since)
    return driver


def decoded(records: list[Record], *vehicles: uuid.UUID) -> list[tuple[bytes | None, dict[str, Any]]]:
    """The events of ``vehicles`` (the session's database is shared, and a worker publishes
    whatever its outbox holds, other tests' leftovers too)."""
    keys = {str(v).encode() for v in vehicles}
    return [(r.key, orjson.loads(r.value)) for r in records if r.key in keys]


async def test_alerts_and_geofence_visits_are_published_once_with_stable_ids(
    topics, producer, db, make_vehicles
) -> None:
    # No drain timer turn during the test: the batches' own events step publishes.
    settings = events_settings(topics, events_drain_seconds=3600.0)
    (vid,) = await make_vehicles(1)
    fence, fence_name = await square(db, 10.0, 20.01, 0.01)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=20)
    driver = await assign_driver(db, vid, start - timedelta(hours=1))
    t = [start + timedelta(seconds=10 * i) for i in range(12)]
    # Eastwards along lat 10.005: into the square at t[2], out of it at t[5]; over the
    # speed limit from t[6] to t[9] (30 s), back to 90 at t[10].
    speeds = [90, 90, 90, 90, 90, 90, 130, 130, 135, 130, 90, 90]
    lons = [20.0 + 0.004 * i for i in range(12)]
    await publish(producer, settings.telemetry_topic, [
        (str(vid).encode(), {"vehicle_id": str(vid), "time": t[i].isoformat(), "lat": 10.005, "lon": lons[i],
                             "speed": float(speeds[i])}) for i in range(12)])

    worker = await run_worker(settings)

    alert = await db.fetchrow("SELECT * FROM alerts WHERE entity_id = $1", vid)
    assert alert["type"] == "overspeed" and alert["is_resolved"]
    crossings = await db.fetch("SELECT kind, time, lat, lon, crossing FROM geofence_transitions"
                               " WHERE vehicle_id = $1 ORDER BY time", vid)
    assert [r["kind"] for r in crossings] == ["enter", "exit"]
    resolved_at = datetime.fromisoformat(orjson.loads(alert["details"])["resolved_reading_time"])
    expected = [
        (GEOFENCE_ENTERED, crossings[0]["time"], fence),
        (GEOFENCE_EXITED, crossings[1]["time"], fence),
        (ALERT_RAISED, alert["reading_time"], alert["id"]),
        (ALERT_RESOLVED, resolved_at, alert["id"]),
        (TRIP_STARTED, t[0], t[0]),  # moving from the first reading: a trip once it went 0.5 km
    ]

    records = await read_topic(settings, settings.events_topic, expected=len(expected))
    events = decoded(records, vid)
    assert all(orjson.loads(r.value)["vehicle_id"] == r.key.decode() for r in records if r.key)
    assert sorted((e["type"], e["time"], e["id"]) for _, e in events) == sorted(
        (kind, status_time(when), str(event_id(kind, vid, when, fact))) for kind, when, fact in expected)
    for _, event in events:
        assert set(event) == {"id", "type", "vehicle_id", "driver_id", "time", "data"}
        assert event["vehicle_id"] == str(vid) and event["driver_id"] == str(driver)
    by_type = {e["type"]: e for _, e in events}
    entered = crossings[0]
    assert by_type[GEOFENCE_ENTERED]["data"] == {
        "geofence_id": fence, "geofence_name": fence_name, "lat": entered["lat"], "lon": entered["lon"],
        "crossing": entered["crossing"]}
    raised = by_type[ALERT_RAISED]["data"]
    assert (raised["alert_id"], raised["alert_type"], raised["severity"], raised["geofence_id"]) == (
        alert["id"], "overspeed", "warning", None)
    assert by_type[ALERT_RESOLVED]["data"]["details"]["resolved_reading_time"] == resolved_at.isoformat()
    # The alerts and visits in time order within the vehicle's partition (the trip's start is
    # dated at its first reading but known only once it went far enough).
    times = [e["time"] for _, e in events if not e["type"].startswith("trip.")]
    assert times == sorted(times)
    for kind in (ALERT_RAISED, GEOFENCE_EXITED):
        on_topic = sum(1 for r in records if orjson.loads(r.value)["type"] == kind)
        assert worker.metrics.value("fleet_events_published_total", type=kind) == on_topic >= 1
    assert await db.fetchval("SELECT count(*) FROM fleet_events WHERE vehicle_id = $1 AND published_at IS NULL",
                             vid) == 0

    # The whole stream again, to a new consumer group: every reading is redelivered.
    await run_worker(settings.model_copy(update={"consumer_group": settings.consumer_group + "-again"}))
    again = decoded(await read_topic(settings, settings.events_topic, expected=len(records) + 1, timeout=3.0), vid)
    assert sorted(e["id"] for _, e in again) == sorted(e["id"] for _, e in events)


async def test_an_event_left_in_the_outbox_and_an_operators_resolve_are_published_by_the_timer(
    topics, db, conn, make_vehicles
) -> None:
    settings = events_settings(topics)
    vid, other = await make_vehicles(2)
    when = datetime(2026, 11, 25, 8, 0, 0, 250_000, tzinfo=timezone.utc)
    # A writer that committed its fact and died before publishing it.
    async with conn.transaction():
        (left,) = await record_events(conn, [FleetEvent.of(TRIP_ENDED, vid, when, {"distance_km": 12.5}, "trip-1")])
    # An operator resolves an alert from the command line.
    alert_id = await db.fetchval(
        "INSERT INTO alerts (entity_id, type, severity, reading_time) VALUES ($1, 'offline', 'warning', $2)"
        " RETURNING id", other, when)
    await resolve_alert(conn, actor=TEST_ADMIN, alert_id=alert_id, note="parked for the night")
    resolved_at = await db.fetchval("SELECT resolved_at FROM alerts WHERE id = $1", alert_id)

    worker = await run_worker(settings)

    records = await read_topic(settings, settings.events_topic, expected=3)
    events = decoded(records, vid, other)
    assert sorted((key, e["type"], e["id"]) for key, e in events) == sorted([
        (str(vid).encode(), TRIP_ENDED, str(left.id)),
        (str(other).encode(), ALERT_RAISED, str(event_id(ALERT_RAISED, other, when, alert_id))),
        (str(other).encode(), ALERT_RESOLVED, str(event_id(ALERT_RESOLVED, other, resolved_at, alert_id))),
    ])
    trip = next(e for _, e in events if e["type"] == TRIP_ENDED)
    assert trip == {"id": str(left.id), "type": TRIP_ENDED, "vehicle_id": str(vid), "driver_id": None,
                    "time": "2026-11-25T08:00:00.250000Z", "data": {"distance_km": 12.5}}
    resolved = next(e for _, e in events if e["type"] == ALERT_RESOLVED)
    admin = await conn.fetchval("SELECT id FROM users WHERE email = $1", TEST_ADMIN)
    assert resolved["data"]["details"]["resolved_by"] == str(admin)
    assert await db.fetchval("SELECT count(*) FROM fleet_events WHERE vehicle_id = ANY($1) AND published_at IS NULL",
                             [vid, other]) == 0
    trips = sum(1 for r in records if orjson.loads(r.value)["type"] == TRIP_ENDED)
    assert worker.metrics.value("fleet_events_published_total", type=TRIP_ENDED) == trips >= 1


async def test_sql_event_ids_equal_pythons(db) -> None:
    vid = uuid.uuid4()
    moments = [
        datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc),
        datetime(2026, 11, 25, 9, 30, 1, 7, tzinfo=timezone(timedelta(hours=2))),
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=-5))),
    ]
    for when in moments:
        for kind, fact in [(ALERT_RAISED, 42), (GEOFENCE_EXITED, 7), (ALERT_RESOLVED, "x|y")]:
            sql = await db.fetchval("SELECT fleet_event_id($1, $2, $3, $4)", kind, vid, when, str(fact))
            assert sql == event_id(kind, vid, when, fact)


async def test_an_alert_about_something_else_than_a_vehicle_has_no_event(db) -> None:
    driver = uuid.uuid4()
    await db.execute("INSERT INTO alerts (entity_type, entity_id, type, severity) VALUES ('driver', $1,"
                     " 'document_expiring', 'info')", driver)
    assert await db.fetchval("SELECT count(*) FROM fleet_events WHERE vehicle_id = $1", driver) == 0


async def test_facts_of_one_instant_end_before_they_start_and_an_oversized_event_goes_out_reduced(
    topics, conn, make_vehicles
) -> None:
    settings = events_settings(topics)
    vid, other = await make_vehicles(2)
    when = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)
    started = FleetEvent.of(TRIP_STARTED, vid, when, {"trip_id": "t-2"}, "t-2")
    stop_ended = FleetEvent.of(STOP_ENDED, vid, when, {"stop_id": "s-1"}, "s-1")
    huge = FleetEvent.of(ALERT_RAISED, other, when, {"alert_type": "engine_dtc", "codes": ["P0300"] * 300_000},
                         "huge")
    async with conn.transaction():  # recorded in this order: the trip's start first
        await record_events(conn, [started, stop_ended, huge])

    await run_worker(settings)

    events = decoded(await read_topic(settings, settings.events_topic, expected=3), vid, other)
    assert [e["type"] for key, e in events if key == str(vid).encode()] == [STOP_ENDED, TRIP_STARTED]
    (big,) = [e for key, e in events if key == str(other).encode()]
    assert big["id"] == str(huge.id) and big["type"] == ALERT_RAISED and big["time"] == status_time(when)
    assert big["data"]["alert_type"] == "engine_dtc" and "codes" not in big["data"]
    assert "more than the broker accepts" in big["data"]["data_omitted"]
    assert await conn.fetchval("SELECT count(*) FROM fleet_events WHERE id = ANY($1) AND published_at IS NULL",
                               [started.id, stop_ended.id, huge.id]) == 0
