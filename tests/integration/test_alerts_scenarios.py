"""Given vehicles with scripted readings, when they flow through the broker and a worker,
then exactly these alert rows exist: one per episode, resolved once its condition
clears, never raised by late data or a replay."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from fleet_telemetry.consumers.worker import Worker
from fleet_telemetry.core.settings import Settings
from tests.integration.streams import publish, run_worker, wait_for

pytestmark = pytest.mark.integration


def rules_settings(settings: Settings, **extra: Any) -> Settings:
    return settings.model_copy(update={
        "geofence_refresh_seconds": 0.2, "alert_timer_seconds": 0.3, "alert_offline_seconds": 7200.0, **extra,
    })


def message(vid: uuid.UUID, t: datetime, **fields: Any) -> tuple[bytes, dict[str, Any]]:
    body = {"vehicle_id": str(vid), "time": t.isoformat(), "lat": 41.9, "lon": 12.5, **fields}
    return str(vid).encode(), body


async def alert_rows(db: asyncpg.Connection, vid: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT type, severity, geofence_id, reading_time, is_resolved, resolved_at IS NOT NULL AS has_resolved_at,"
        " details FROM alerts WHERE entity_id = $1 ORDER BY reading_time, type", vid)
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]


async def test_a_speeding_episode_raises_one_alert_resolved_once(topics, producer, db, make_vehicles) -> None:
    settings = rules_settings(topics, alert_overspeed_kmh=120.0, alert_overspeed_min_seconds=20.0)
    (vid,) = await make_vehicles(1)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=20)
    t = [start + timedelta(seconds=5 * i) for i in range(16)]
    # A 5 s burst over the limit (too short), then 30 s over it, then back to 90.
    speeds = [90, 90, 90, 130, 130, 90, 135, 135, 140, 135, 135, 135, 125, 90, 90, 90]
    await publish(producer, settings.telemetry_topic,
                  [message(vid, t[i], speed=float(s), lon=12.5 + 0.0015 * i) for i, s in enumerate(speeds)])

    worker = await run_worker(settings)

    assert await alert_rows(db, vid) == [{
        "type": "overspeed", "severity": "warning", "geofence_id": None, "reading_time": t[10],
        "is_resolved": True, "has_resolved_at": True,
        "details": {"limit_kmh": 120.0, "since": t[6].isoformat(), "speed_kmh": 135.0, "max_speed_kmh": 140.0,
                    "ended_at": t[13].isoformat(), "duration_s": 35.0, "resolved_reading_time": t[13].isoformat()},
    }]
    assert worker.metrics.value("fleet_alerts_total", type="overspeed", action="raised") == 1
    assert worker.metrics.value("fleet_alerts_total", type="overspeed", action="resolved") == 1
    assert worker.metrics.value("fleet_rule_evaluation_seconds_count") >= 1


async def test_a_refuel_then_a_siphoning_while_parked(topics, producer, db, make_vehicles) -> None:
    settings = rules_settings(topics)
    (vid,) = await make_vehicles(1)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=40)
    plan = [  # (minutes, speed, fuel)
        (0, 0.0, 8.0), (1, 0.0, 8.0),                      # nearly empty at the pump: low fuel
        (3, 0.0, 60.0), (4, 0.0, 95.0),                    # refuelled: low fuel resolved, no theft
        (6, 60.0, 94.0), (8, 60.0, 92.0), (10, 60.0, 90.0),  # driving, normal consumption
        (12, 0.0, 90.0), (13, 0.0, 90.0), (14, 0.0, 85.0), (15, 0.0, 80.0), (16, 0.0, 80.0),  # parked: siphoned
    ]
    await publish(producer, settings.telemetry_topic,
                  [message(vid, start + timedelta(minutes=m), speed=s, fuel_level=f, lon=12.5 + 0.01 * (m >= 6) * m)
                   for m, s, f in plan])

    worker = await run_worker(settings)

    at = lambda minutes: start + timedelta(minutes=minutes)  # noqa: E731
    assert await alert_rows(db, vid) == [
        {"type": "low_fuel", "severity": "warning", "geofence_id": None, "reading_time": at(0),
         "is_resolved": True, "has_resolved_at": True,
         "details": {"fuel_level": 8.0, "threshold_percent": 10.0, "fuel_level_after": 60.0,
                     "resolved_reading_time": at(3).isoformat()}},
        {"type": "fuel_drop", "severity": "critical", "geofence_id": None, "reading_time": at(15),
         "is_resolved": False, "has_resolved_at": False,
         "details": {"from_percent": 90.0, "to_percent": 80.0, "since": at(13).isoformat(), "seconds": 120.0}},
    ]
    assert worker.metrics.value("fleet_alerts_total", type="fuel_drop", action="raised") == 1


async def test_engine_trouble_codes_overheating_and_a_gps_jump(topics, producer, db, make_vehicles) -> None:
    settings = rules_settings(topics)
    (vid,) = await make_vehicles(1)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=20)
    t = [start + timedelta(seconds=10 * i) for i in range(9)]
    engine = [
        {"dtc": [], "coolant_temp_c": 90}, {"dtc": ["P0301"], "coolant_temp_c": 108},
        {"dtc": ["P0301", "P0420"], "coolant_temp_c": 104}, {"dtc": ["P0420", "P0301"], "coolant_temp_c": 99},
        {"dtc": [], "coolant_temp_c": 95}, {"rpm": 900}, {"rpm": 900}, {"rpm": 900}, {"rpm": 900},
    ]
    lons = [12.5, 12.5005, 12.501, 12.5015, 12.502, 12.5025, 13.2, 12.503, 12.5035]  # t[6]: 57 km in 10 s
    await publish(producer, settings.telemetry_topic,
                  [message(vid, t[i], speed=20.0, lon=lons[i], engine_status=engine[i]) for i in range(9)])

    await run_worker(settings)

    rows = await alert_rows(db, vid)
    assert [(r["type"], r["reading_time"], r["is_resolved"]) for r in rows] == [
        ("engine_dtc", t[1], True), ("overheating", t[1], True), ("gps_jump", t[6], True)]
    dtc, heat, jump = rows
    assert dtc["details"] == {"codes": ["P0301", "P0420"], "new": ["P0420"], "cleared_at": t[4].isoformat(),
                              "resolved_reading_time": t[4].isoformat()}
    assert heat["severity"] == "critical"
    assert heat["details"]["coolant_temp_c"] == 108 and heat["details"]["coolant_temp_c_after"] == 99
    assert jump["details"]["to"] == [41.9, 13.2] and jump["details"]["implied_speed_kmh"] > 300
    assert jump["details"]["resolved_reading_time"] == t[7].isoformat()
    # Flagged, not followed: the vehicle's last accepted position is the last plausible one.
    assert await db.fetchval("SELECT lon FROM vehicle_rule_state WHERE vehicle_id = $1", vid) == 12.5035


async def test_a_vehicle_that_goes_silent_is_offline_then_back(topics, producer, db, make_vehicles) -> None:
    settings = rules_settings(topics, alert_offline_seconds=40.0)
    quiet, chatty = await make_vehicles(2)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    last_seen = now - timedelta(minutes=9)
    await publish(producer, settings.telemetry_topic,
                  [message(quiet, now - timedelta(minutes=10)), message(quiet, last_seen),
                   message(chatty, now)])
    worker = Worker(settings, stop_when_idle=None)
    running = asyncio.create_task(worker.run())
    try:
        async def offline(vid: uuid.UUID, resolved: bool) -> bool:
            return bool(await db.fetchval(
                "SELECT count(*) FROM alerts WHERE entity_id = $1 AND type = 'offline' AND is_resolved = $2",
                vid, resolved))

        await wait_for(lambda: offline(quiet, False), timeout=30, what="the offline alert")
        back = datetime.now(timezone.utc)
        await publish(producer, settings.telemetry_topic, [message(quiet, back)])
        await wait_for(lambda: offline(quiet, True), timeout=30, what="the offline alert resolved")
    finally:
        worker.stop()
        assert await asyncio.wait_for(running, timeout=60) == 0

    rows = await alert_rows(db, quiet)
    assert [(r["type"], r["severity"], r["reading_time"], r["is_resolved"]) for r in rows] == [
        ("offline", "warning", last_seen, True)]
    details = rows[0]["details"]
    assert details["silent_seconds_threshold"] == 40.0
    assert datetime.fromisoformat(details["last_seen"]) == last_seen
    assert datetime.fromisoformat(details["back_at"]) == back.replace(microsecond=back.microsecond)
    assert await alert_rows(db, chatty) == []


async def test_maintenance_due_by_odometer_and_by_date_until_serviced(topics, producer, db, make_vehicles) -> None:
    settings = rules_settings(topics)
    by_km, by_date = await make_vehicles(2)
    tag = uuid.uuid4().hex[:8]
    oil = await db.fetchval("INSERT INTO maintenance_schedules (name, vehicle_type, interval_km)"
                            " VALUES ($1, 'truck', 10000) RETURNING id", f"oil-{tag}")
    brakes = await db.fetchval("INSERT INTO maintenance_schedules (name, vehicle_type, interval_months)"
                               " VALUES ($1, 'truck', 12) RETURNING id", f"brakes-{tag}")
    await db.execute("INSERT INTO maintenance_triggers (vehicle_id, schedule_id, next_due_km) VALUES ($1, $2, 10000)",
                     by_km, oil)
    await db.execute("INSERT INTO maintenance_triggers (vehicle_id, schedule_id, next_due_date) VALUES ($1, $2, $3),"
                     " ($4, $2, $5)", by_date, brakes, date.today() - timedelta(days=1), by_km,
                     date.today() + timedelta(days=30))
    now = datetime.now(timezone.utc).replace(microsecond=0)
    await publish(producer, settings.telemetry_topic,
                  [message(by_km, now - timedelta(seconds=60), odometer_km=9990.0),
                   message(by_km, now - timedelta(seconds=30), odometer_km=10004.5)])

    async def open_due(vid: uuid.UUID) -> int:
        return await db.fetchval("SELECT count(*) FROM alerts WHERE entity_id = $1 AND type = 'maintenance_due'"
                                 " AND NOT is_resolved", vid)

    worker = Worker(settings, stop_when_idle=None)
    running = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: _both(open_due(by_km), open_due(by_date)), timeout=30, what="maintenance alerts")
        # The oil change is done: the writer moves the trigger on.
        await db.execute("UPDATE maintenance_triggers SET next_due_km = 20000, last_service_km = 10004.5"
                         " WHERE vehicle_id = $1 AND schedule_id = $2", by_km, oil)

        async def resolved() -> bool:
            return await open_due(by_km) == 0
        await wait_for(resolved, timeout=30, what="the oil change to resolve the alert")
    finally:
        worker.stop()
        assert await asyncio.wait_for(running, timeout=60) == 0

    km_rows, date_rows = await alert_rows(db, by_km), await alert_rows(db, by_date)
    assert [(r["type"], r["severity"], r["reading_time"], r["is_resolved"]) for r in km_rows] == [
        ("maintenance_due", "info", now - timedelta(seconds=30), True)]
    assert km_rows[0]["details"]["odometer_km"] == 10004.5
    assert [(d["schedule"], d["next_due_km"]) for d in km_rows[0]["details"]["due"]] == [(f"oil-{tag}", 10000.0)]
    assert [(r["type"], r["reading_time"], r["is_resolved"]) for r in date_rows] == [("maintenance_due", None, False)]
    assert [d["schedule"] for d in date_rows[0]["details"]["due"]] == [f"brakes-{tag}"]


async def _both(*checks: Any) -> bool:
    return all([await check for check in checks])


async def test_late_readings_are_stored_but_fire_nothing_and_a_replay_raises_nothing(
    topics, producer, db, make_vehicles
) -> None:
    settings = rules_settings(topics, alert_overspeed_min_seconds=0.0)
    (vid,) = await make_vehicles(1)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=20)
    t = [start + timedelta(seconds=10 * i) for i in range(10)]
    await publish(producer, settings.telemetry_topic,
                  [message(vid, t[i], speed=50.0, fuel_level=50.0, lon=12.5 + 0.001 * i) for i in range(5, 10)])
    await run_worker(settings)
    # Older than what was evaluated: over the speed limit, nearly empty, jumped far away.
    await publish(producer, settings.telemetry_topic,
                  [message(vid, t[i], speed=200.0, fuel_level=2.0, lon=15.0) for i in range(0, 3)])
    late = await run_worker(settings)
    replay = await run_worker(settings.model_copy(update={"consumer_group": settings.consumer_group + "-replay"}))

    assert await db.fetchval("SELECT count(*) FROM vehicle_telemetry WHERE vehicle_id = $1", vid) == 8
    assert await alert_rows(db, vid) == []
    assert late.metrics.value("fleet_late_readings_total") == 3
    assert replay.metrics.value("fleet_readings_total", outcome="duplicate") == 8
    assert await db.fetchval("SELECT last_time FROM vehicle_rule_state WHERE vehicle_id = $1", vid) == t[9]
