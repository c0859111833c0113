"""Given vehicles booked to drivers and scripted tracks, when they flow through the broker
and a worker, then harsh braking and harsh acceleration are one alert per episode with
the driver on duty, never raised twice by a redelivery; and after ``fleet maintain`` each
driver's day has the score the documented formula gives, recomputed after a late backfill."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops import assignments, drivers
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.lifecycle.driver_scores import measure_hour, score_day
from fleet_telemetry.lifecycle.policy import ScoreRules
from fleet_telemetry.lifecycle.run import Maintainer
from tests.users import TEST_ADMIN
from tests.users import seed as seed_users
from tests.databases import create_database, drop_database
from tests.integration.cli import fleet
from tests.integration.streams import publish, run_worker

pytestmark = pytest.mark.integration

ACTOR = TEST_ADMIN


def rules_settings(settings: Settings, **extra: Any) -> Settings:
    return settings.model_copy(update={
        "geofence_refresh_seconds": 0.2, "alert_timer_seconds": 0.3, "alert_offline_seconds": 0.0, **extra})


def message(vid: uuid.UUID, t: datetime, speed: float, lat: float, lon: float = 9.0) -> tuple[bytes, dict[str, Any]]:
    return str(vid).encode(), {"vehicle_id": str(vid), "time": t.isoformat(), "lat": lat, "lon": lon, "speed": speed}


async def book(conn: asyncpg.Connection, vid: uuid.UUID, name: str, start: datetime,
               end: datetime | None = None) -> tuple[uuid.UUID, uuid.UUID]:
    """Registers driver ``name`` and books them on ``vid``; returns (driver id, assignment id)."""
    driver = await drivers.register_driver(conn, actor=ACTOR, data={"name": name})
    did = uuid.UUID(str(driver["id"]))
    booking = await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=vid, driver_id=did, start_time=start,
                                                  end_time=end)
    return did, uuid.UUID(str(booking["id"]))


async def behaviour_alerts(db: asyncpg.Connection, vid: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT type, reading_time, is_resolved, driver_id, details FROM alerts"
        " WHERE entity_id = $1 AND type LIKE 'harsh%' ORDER BY reading_time", vid)
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


# --- harsh braking and acceleration through a worker ----------------------------------------------


async def test_harsh_braking_is_one_alert_with_the_driver_on_duty_and_a_redelivery_adds_none(
        topics: Settings, producer: AIOKafkaProducer, db: asyncpg.Connection, conn: asyncpg.Connection,
        make_vehicles: Any) -> None:
    settings = rules_settings(topics)
    braking, slow = await make_vehicles(2)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=20)
    driver, _ = await book(conn, braking, f"Ada {braking.hex[:6]}", start - timedelta(hours=1))
    # 80 km/h to 40 km/h in one second (-11.1 m/s²), then steady; the other vehicle makes
    # the same change over ten seconds (-1.1 m/s²) and then over six (too far apart).
    one_second = [(0, 80.0), (1, 80.0), (2, 40.0), (3, 38.0), (4, 38.0)]
    apart = [(0, 80.0), (10, 40.0), (16, 80.0), (22, 40.0)]
    stream = ([message(braking, start + timedelta(seconds=s), v, 45.0 + s * 1e-4) for s, v in one_second]
              + [message(slow, start + timedelta(seconds=s), v, 46.0 + s * 1e-4) for s, v in apart])
    await publish(producer, settings.telemetry_topic, stream)

    worker = await run_worker(settings)

    assert await behaviour_alerts(db, braking) == [{
        "type": "harsh_braking", "reading_time": start + timedelta(seconds=2), "is_resolved": True,
        "driver_id": driver,
        "details": {"acceleration_mps2": -11.11, "threshold_mps2": -3.5, "speed_before_kmh": 80.0, "speed_kmh": 40.0,
                    "seconds": 1.0, "since": (start + timedelta(seconds=1)).isoformat(), "peak_mps2": -11.11,
                    "from_kmh": 80.0, "to_kmh": 40.0, "ended_at": (start + timedelta(seconds=2)).isoformat(),
                    "duration_s": 1.0, "resolved_reading_time": (start + timedelta(seconds=3)).isoformat()},
    }]
    assert await behaviour_alerts(db, slow) == []
    assert worker.metrics.value("fleet_alerts_total", type="harsh_braking", action="raised") == 1

    # The same stream again, read by a fresh consumer group from the beginning: twice over.
    await publish(producer, settings.telemetry_topic, stream)
    again = await run_worker(settings.model_copy(update={"consumer_group": settings.consumer_group + "-again"}))
    assert len(await behaviour_alerts(db, braking)) == 1
    assert again.metrics.value("fleet_alerts_total", type="harsh_braking", action="raised") == 0

    # Operators see the driver on the alert.
    listed = fleet(settings, "alerts", "list", "--vehicle", str(braking), "--type", "harsh_braking", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["driver_id"] == str(driver) and row["driver"] == f"Ada {braking.hex[:6]}"
    shown = fleet(settings, "alerts", "show", str(row["id"]), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["driver"] == f"Ada {braking.hex[:6]}"
    text = fleet(settings, "alerts", "list", "--driver", str(driver))
    assert text.returncode == 0 and f"driver=Ada {braking.hex[:6]}" in text.stdout and "harsh_braking" in text.stdout


async def test_harsh_acceleration_without_a_booking_has_no_driver(
        topics: Settings, producer: AIOKafkaProducer, db: asyncpg.Connection, make_vehicles: Any) -> None:
    settings = rules_settings(topics)
    (vid,) = await make_vehicles(1)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=10)
    # 0 -> 15 km/h in one second (+4.2 m/s²), 15 -> 27 (+3.3), then +1.
    track = [(0, 0.0), (1, 15.0), (2, 27.0), (3, 28.0)]
    await publish(producer, settings.telemetry_topic,
                  [message(vid, start + timedelta(seconds=s), v, 47.0 + s * 1e-4) for s, v in track])

    await run_worker(settings)

    (alert,) = await behaviour_alerts(db, vid)
    assert (alert["type"], alert["reading_time"], alert["is_resolved"], alert["driver_id"]) == (
        "harsh_acceleration", start + timedelta(seconds=1), True, None)
    assert alert["details"]["peak_mps2"] == 4.17 and alert["details"]["to_kmh"] == 27.0


async def test_a_worker_restart_between_two_readings_keeps_the_previous_speed(
        topics: Settings, producer: AIOKafkaProducer, db: asyncpg.Connection, make_vehicles: Any) -> None:
    settings = rules_settings(topics)
    (vid,) = await make_vehicles(1)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
    await publish(producer, settings.telemetry_topic, [message(vid, start, 90.0, 48.0)])
    await run_worker(settings)  # stops when idle, its states written
    assert await db.fetchval("SELECT (memory ->> 'last_speed')::float8 FROM vehicle_rule_state WHERE vehicle_id = $1",
                             vid) == 90.0

    # The next reading, a second later, reaches another worker: 90 -> 60 km/h is -8.3 m/s².
    await publish(producer, settings.telemetry_topic, [message(vid, start + timedelta(seconds=1), 60.0, 48.0001)])
    await run_worker(settings)

    (alert,) = await behaviour_alerts(db, vid)
    assert (alert["type"], alert["reading_time"], alert["is_resolved"]) == (
        "harsh_braking", start + timedelta(seconds=1), False)
    assert alert["details"]["acceleration_mps2"] == -8.33


# --- daily scores through fleet maintain ----------------------------------------------------------


@pytest_asyncio.fixture
async def own_url(base_settings: Settings) -> AsyncIterator[str]:
    """A migrated database of this test's own: a maintenance pass acts on the whole database."""
    name = f"fleet_test_behaviour_{uuid.uuid4().hex[:10]}"
    try:
        url = await create_database(base_settings.database_url, name, migrate=True)
        await seed_users(url)
        yield url
    finally:
        await drop_database(base_settings.database_url, name)


def track_point(minute: float) -> tuple[float, float]:
    """Northwards at about 80 km/h: 0.012 degrees of latitude a minute."""
    return 45.0 + 0.012 * minute, 9.0


async def expected_km(db: asyncpg.Connection, points: list[tuple[datetime, float, float]]) -> float:
    """Geodesic length of the consecutive pairs of ``points`` in time order."""
    points = sorted(points)
    metres = await db.fetchval(
        "SELECT coalesce(sum(ST_Distance(ST_SetSRID(ST_MakePoint(lon1, lat1), 4326)::geography,"
        " ST_SetSRID(ST_MakePoint(lon2, lat2), 4326)::geography)), 0)"
        " FROM unnest($1::float8[], $2::float8[], $3::float8[], $4::float8[]) AS u(lat1, lon1, lat2, lon2)",
        [p[1] for p in points[:-1]], [p[2] for p in points[:-1]], [p[1] for p in points[1:]],
        [p[2] for p in points[1:]])
    return float(metres) / 1000.0


async def test_a_drivers_day_is_scored_by_the_formula_and_rescored_after_a_late_backfill(
        topics: Settings, producer: AIOKafkaProducer, own_url: str) -> None:
    settings = rules_settings(topics, database_url=own_url)
    db = await asyncpg.connect(own_url)
    try:
        await run_scored_day(settings, producer, db)
    finally:
        await db.close()


async def run_scored_day(settings: Settings, producer: AIOKafkaProducer, db: asyncpg.Connection) -> None:
    day = datetime.now(timezone.utc).date() - timedelta(days=1)
    t0 = datetime(day.year, day.month, day.day, 9, 0, tzinfo=timezone.utc)
    vid = uuid.uuid4()
    await db.execute("INSERT INTO vehicles (id, vin, license_plate, make, model, year) VALUES ($1, $2, $3,"
                     " 'MAN', 'TGX', 2021)", vid, vid.hex[:17].upper(), "B-" + vid.hex[:8].upper())
    name = f"Grace {vid.hex[:6]}"
    async with Database(settings.database_url) as database, database.write() as writer:
        driver, booking = await book(writer, vid, name, t0 + timedelta(minutes=30), t0 + timedelta(hours=2))  # 09:30-11:00

    def at_minute(m: float) -> datetime:
        return t0 + timedelta(minutes=m)

    readings: list[tuple[datetime, float, float, float]] = []  # (time, speed, lat, lon)
    for m in range(0, 21):  # 09:00-09:20, before the booking: nobody's distance
        readings.append((at_minute(m), 80.0, *track_point(m)))
    for m in range(60, 91):  # 10:00-10:30 at 80 km/h
        readings.append((at_minute(m), 80.0, *track_point(m)))
    lat30, lon30 = track_point(90)
    # 10:30:01 harsh braking to 40, 10:30:03 harsh acceleration to 52 (one second each).
    for s, v in ((1, 40.0), (2, 38.0), (3, 52.0), (4, 53.0)):
        readings.append((at_minute(90) + timedelta(seconds=s), v, lat30 + s * 1e-4, lon30))
    for m in range(91, 111):  # 10:31-10:50; over the limit at 10:44 and 10:45 (overspeed at 10:45)
        readings.append((at_minute(m), 130.0 if m in (44 + 60, 45 + 60) else 80.0, *track_point(m)))
    jump_time = at_minute(100)
    readings = [(t, v, lat, lon + 1.0) if t == jump_time else (t, v, lat, lon) for t, v, lat, lon in readings]
    for m in range(125, 131):  # 11:05-11:10, after the booking
        readings.append((at_minute(m), 80.0, *track_point(m)))
    await publish(producer, settings.telemetry_topic, [message(vid, t, v, lat, lon) for t, v, lat, lon in readings])
    await run_worker(settings)

    kinds = await db.fetch("SELECT type, driver_id FROM alerts WHERE entity_id = $1 ORDER BY reading_time", vid)
    assert [(r["type"], r["driver_id"]) for r in kinds] == [
        ("harsh_braking", driver), ("harsh_acceleration", driver), ("gps_jump", driver), ("overspeed", driver)]

    maintainer = Maintainer(settings)
    report = await maintainer.run_once()
    assert report.driver_scores.days >= 1 and report.driver_scores.pending_hours == 0

    # The booking's readings, the jump's two steps left out.
    booked = [(t, lat, lon) for t, _, lat, lon in readings if at_minute(30) <= t < at_minute(120)]
    before, after = [p for p in booked if p[0] < jump_time], [p for p in booked if p[0] > jump_time]
    km = await expected_km(db, before) + await expected_km(db, after)
    penalty = 5.0 + 3.0 + 5.0  # harsh braking, harsh acceleration, overspeed at the default penalties
    row = await db.fetchrow("SELECT * FROM driver_daily_scores WHERE driver_id = $1 AND day = $2", driver, day)
    assert row is not None
    assert row["distance_km"] == pytest.approx(km, abs=0.0011)
    assert (row["harsh_braking"], row["harsh_acceleration"], row["overspeed"], row["penalty_points"]) == (
        1, 1, 1, penalty)
    assert row["score"] == max(0.0, 100.0 - penalty * 100.0 / row["distance_km"])
    assert 75 < row["score"] < 85

    # Recomputing the whole day, every hour of it, gives the same row.
    async with db.transaction():
        for hour in range(24):
            await measure_hour(db, t0 - timedelta(hours=9 - hour), ScoreRules())
        assert await score_day(db, day, ScoreRules()) == 0

    # A late backfill inside the booking (09:40-09:50): no alert, more distance, a better score.
    late = [(at_minute(m), 80.0, *track_point(m)) for m in range(40, 51)]
    await publish(producer, settings.telemetry_topic, [message(vid, t, v, lat, lon) for t, v, lat, lon in late])
    await run_worker(settings)
    assert await db.fetchval("SELECT count(*) FROM alerts WHERE entity_id = $1", vid) == 4
    report = await maintainer.run_once()
    assert report.driver_scores.days >= 1
    km_after = await expected_km(db, sorted(before + [(t, lat, lon) for t, _, lat, lon in late])) + await expected_km(
        db, after)
    rescored = await db.fetchrow("SELECT * FROM driver_daily_scores WHERE driver_id = $1 AND day = $2", driver, day)
    assert rescored["distance_km"] == pytest.approx(km_after, abs=0.0011) and km_after > km + 20
    assert rescored["score"] == max(0.0, 100.0 - penalty * 100.0 / rescored["distance_km"])

    # fleet drivers scores: the period's score over its sums.
    shown = fleet(settings, "drivers", "scores", "--from", str(day), "--to", str(day), "--driver", str(driver),
                  "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [{
        "driver_id": str(driver), "name": name, "days": 1, "distance_km": round(rescored["distance_km"], 3),
        "harsh_braking": 1, "harsh_acceleration": 1, "overspeed": 1, "penalty_points": penalty,
        "score": rescored["score"]}]
    table = fleet(settings, "drivers", "scores", "--from", str(day - timedelta(days=3)), "--to", str(day))
    assert table.returncode == 0, table.stderr
    header, line = table.stdout.splitlines()[:2]
    assert header.split() == ["driver", "days", "distance_km", "braking", "acceleration", "overspeed", "penalty",
                              "score"]
    assert line.startswith(name) and line.split()[-1] == f"{rescored['score']:.1f}"

    # The booking ended after the fact at 10:20: the day is rescored without what came later.
    async with Database(settings.database_url) as database, database.write() as writer:
        await assignments.end_assignment(writer, actor=ACTOR, assignment_id=booking, at=at_minute(80))
    report = await maintainer.run_once()
    assert report.driver_scores.days >= 1
    shortened = [(t, lat, lon) for t, _, lat, lon in readings + late if at_minute(30) <= t < at_minute(80)]
    ended = await db.fetchrow("SELECT * FROM driver_daily_scores WHERE driver_id = $1 AND day = $2", driver, day)
    assert ended["distance_km"] == pytest.approx(await expected_km(db, shortened), abs=0.0011)
    assert (ended["harsh_braking"], ended["harsh_acceleration"], ended["overspeed"], ended["penalty_points"],
            ended["score"]) == (0, 0, 0, 0.0, 100.0)


async def test_drivers_scores_refuses_bad_arguments_with_one_line(settings: Settings) -> None:
    today = date.today()
    for args, expected in (
        (("--from", str(today), "--to", str(today - timedelta(days=1))), "is before --from"),
        (("--from", "yesterday", "--to", str(today)), "--from"),
        (("--from", str(today), "--to", str(today), "--driver", "nobody"), "not a UUID"),
        (("--from", str(today), "--to", str(today), "--driver", str(uuid.uuid4())), "no driver with id"),
    ):
        done = fleet(settings, "drivers", "scores", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
