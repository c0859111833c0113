"""Given geofences and scripted tracks, when the readings flow through the broker and the
workers, then exactly these enters and exits are recorded, once, whatever the jitter,
the gaps between readings, restarts and replays."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from fleet_telemetry.consumers.worker import Worker
from fleet_telemetry.core.settings import Settings
from tests.integration.streams import publish, run_worker

pytestmark = pytest.mark.integration


def rules_settings(settings: Settings, **extra: Any) -> Settings:
    return settings.model_copy(update={
        "geofence_dwell_seconds": 20.0, "geofence_refresh_seconds": 0.2, "alert_timer_seconds": 0.3,
        "alert_offline_seconds": 7200.0, **extra,
    })


def place() -> tuple[float, float]:
    """A spot of this test's own, so fences of other tests are never in the way."""
    return random.uniform(-50, 50), random.uniform(-170, 170)


async def square(db: asyncpg.Connection, lat: float, lon: float, size: float, **columns: Any) -> int:
    wkt = (f"POLYGON(({lon} {lat}, {lon + size} {lat}, {lon + size} {lat + size},"
           f" {lon} {lat + size}, {lon} {lat}))")
    names = ", ".join(columns)
    values = "".join(f", ${i + 3}" for i in range(len(columns)))
    return await db.fetchval(
        f"INSERT INTO geofences (name, kind, area{', ' + names if names else ''})"
        f" VALUES ($1, 'polygon', ST_GeomFromText($2, 4326){values}) RETURNING id",
        f"square-{uuid.uuid4().hex[:6]}", wkt, *columns.values())


async def circle(db: asyncpg.Connection, lat: float, lon: float, radius_m: float) -> int:
    return await db.fetchval(
        "INSERT INTO geofences (name, kind, center, radius_m)"
        " VALUES ($1, 'circle', ST_SetSRID(ST_MakePoint($2, $3), 4326), $4) RETURNING id",
        f"circle-{uuid.uuid4().hex[:6]}", lon, lat, radius_m)


def reading(vid: uuid.UUID, t: datetime, lat: float, lon: float, speed: float = 40.0) -> tuple[bytes, dict[str, Any]]:
    return str(vid).encode(), {"vehicle_id": str(vid), "time": t.isoformat(), "lat": lat, "lon": lon, "speed": speed}


async def transitions(db: asyncpg.Connection, vid: uuid.UUID) -> list[tuple[int, str, datetime, bool]]:
    rows = await db.fetch("SELECT geofence_id, kind, time, crossing FROM geofence_transitions"
                          " WHERE vehicle_id = $1 ORDER BY time, kind DESC", vid)
    return [(r["geofence_id"], r["kind"], r["time"], r["crossing"]) for r in rows]


async def covered(db: asyncpg.Connection, fence: int, points: list[tuple[float, float]]) -> list[bool]:
    """PostGIS's own answer: which of the points (lat, lon) are in the fence."""
    rows = await db.fetch(
        "SELECT CASE WHEN g.kind = 'circle'"
        "  THEN ST_DWithin(g.center::geography, ST_SetSRID(ST_MakePoint(u.x, u.y), 4326)::geography, g.radius_m)"
        "  ELSE ST_Covers(g.area, ST_SetSRID(ST_MakePoint(u.x, u.y), 4326)) END AS inside"
        " FROM geofences g, unnest($2::float8[], $3::float8[]) WITH ORDINALITY AS u(x, y, n)"
        " WHERE g.id = $1 ORDER BY u.n", fence, [p[1] for p in points], [p[0] for p in points])
    return [r["inside"] for r in rows]


def visits(times: list[datetime], inside: list[bool]) -> list[tuple[str, datetime]]:
    """Enters and exits of a track that never flips back within the dwell."""
    out, was = [], False
    for t, now in zip(times, inside):
        if now != was:
            out.append(("enter" if now else "exit", t))
            was = now
    return out


async def test_a_drive_through_a_polygon_and_a_circle_and_a_jump_across_a_small_circle(
    topics, producer, db, redis_client, make_vehicles
) -> None:
    settings = rules_settings(topics)
    lat0, lon0 = place()
    poly = await square(db, lat0, lon0 + 0.01, 0.01)
    ring = await circle(db, lat0 + 0.005, lon0 + 0.04, 300.0)
    small = await circle(db, lat0 + 0.02, lon0 + 0.04, 120.0)
    driver, hopper, parker = await make_vehicles(3)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=30)

    # Along lat0 + 0.005, eastwards, a reading every 10 s: through the square, then the circle.
    times = [start + timedelta(seconds=10 * i) for i in range(120)]
    track = [(lat0 + 0.005, lon0 + 0.00025 + 0.0005 * i) for i in range(120)]
    # Every 2 minutes, 0.02 deg apart: two readings either side of the small circle.
    hops = [(start + timedelta(minutes=2 * i), lat0 + 0.02, lon0 + 0.01 + 0.02 * i) for i in range(3)]
    # Drives into the square and stays there.
    stay = [(start + timedelta(seconds=10 * i), lat0 + 0.002, lon0 + 0.008 + 0.0005 * min(i, 8)) for i in range(20)]
    messages = [reading(driver, t, la, lo) for t, (la, lo) in zip(times, track)]
    messages += [reading(hopper, t, la, lo, speed=80.0) for t, la, lo in hops]
    messages += [reading(parker, t, la, lo, speed=10.0) for t, la, lo in stay]
    await publish(producer, settings.telemetry_topic, messages)

    worker = await run_worker(settings)

    expected = sorted(
        [(poly, kind, t, False) for kind, t in visits(times, await covered(db, poly, track))]
        + [(ring, kind, t, False) for kind, t in visits(times, await covered(db, ring, track))],
        key=lambda row: (row[2], row[1] == "enter"))
    assert [row[1] for row in expected] == ["enter", "exit", "enter", "exit"]
    assert await transitions(db, driver) == expected

    hopped = await transitions(db, hopper)
    assert [(fid, kind, crossing) for fid, kind, _, crossing in hopped] == [(small, "enter", True), (small, "exit", True)]
    assert hops[1][0] < hopped[0][2] < hopped[1][2] < hops[2][0]
    assert not any(await covered(db, small, [(la, lo) for _, la, lo in hops]))

    parked = await transitions(db, parker)
    assert [(fid, kind) for fid, kind, _, _ in parked] == [(poly, "enter")]
    members = await redis_client.zrange(f"geofence:{poly}", 0, -1)
    assert str(parker).encode() in members and str(driver).encode() not in members
    state = await db.fetch("SELECT vehicle_id, inside FROM vehicle_geofence_state WHERE geofence_id = $1", poly)
    assert [(r["vehicle_id"], r["inside"]) for r in state] == [(parker, True)]
    assert worker.metrics.value("fleet_geofence_transitions_total", kind="enter") == 4
    assert worker.metrics.value("fleet_geofence_transitions_total", kind="exit") == 3


async def test_a_vehicle_parked_on_a_boundary_with_jitter_does_not_flap(topics, producer, db, make_vehicles) -> None:
    settings = rules_settings(topics)
    lat0, lon0 = place()
    fence = await square(db, lat0, lon0, 0.01)
    (vid,) = await make_vehicles(1)
    rng = random.Random(7)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=30)
    # 15 minutes parked on the west edge, GPS wandering ~10 m either side; never more
    # than 3 readings (15 s, under the 20 s dwell) on one side in a row.
    messages, side, run = [], 1, 0
    for i in range(180):
        if run >= 3 or rng.random() < 0.5:
            side, run = -side, 0
        if i == 179:
            side = -1  # leaves it outside, so the enter below starts with the drive
        run += 1
        messages.append(reading(vid, start + timedelta(seconds=5 * i),
                                lat0 + 0.005 + rng.uniform(-1e-4, 1e-4), lon0 + side * rng.uniform(1e-5, 1.2e-4),
                                speed=0.0))
    # Then it drives in for good.
    arrive = start + timedelta(seconds=5 * 180)
    for i in range(12):
        messages.append(reading(vid, arrive + timedelta(seconds=5 * i), lat0 + 0.005, lon0 + 0.001 + 0.0002 * i))
    await publish(producer, settings.telemetry_topic, messages)

    await run_worker(settings)

    assert await transitions(db, vid) == [(fence, "enter", arrive, False)]


async def test_a_worker_restarted_in_the_middle_of_a_visit_does_not_enter_twice(
    topics, producer, db, make_vehicles
) -> None:
    settings = rules_settings(topics)
    lat0, lon0 = place()
    fence = await square(db, lat0, lon0, 0.01)
    a, b = await make_vehicles(2)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=30)

    def leg(vid: uuid.UUID, first: int, last: int) -> list[tuple[bytes, dict[str, Any]]]:
        # West to east through the square at lat0 + 0.005; inside from step 10 to step 29.
        return [reading(vid, start + timedelta(seconds=10 * i), lat0 + 0.005, lon0 - 0.00475 + 0.0005 * i)
                for i in range(first, last)]

    # a: the enter is confirmed before the restart. b: the restart comes one reading after
    # it crossed in, with the enter still waiting for the dwell.
    await publish(producer, settings.telemetry_topic, leg(a, 0, 20) + leg(b, 0, 11))
    await run_worker(settings)
    assert [kind for _, kind, _, _ in await transitions(db, a)] == ["enter"]
    assert await transitions(db, b) == []

    await publish(producer, settings.telemetry_topic, leg(a, 20, 45) + leg(b, 11, 45))
    await run_worker(settings)  # a new worker, same group: it reads the state back
    entered, left = start + timedelta(seconds=100), start + timedelta(seconds=300)
    for vid in (a, b):
        assert await transitions(db, vid) == [(fence, "enter", entered, False), (fence, "exit", left, False)]


async def test_two_workers_then_a_replay_record_each_transition_and_alert_once(
    topics, producer, db, make_vehicles
) -> None:
    settings = rules_settings(topics, alert_overspeed_kmh=100.0, alert_overspeed_min_seconds=20.0)
    lat0, lon0 = place()
    fence = await square(db, lat0, lon0, 0.01, speed_limit_kmh=50.0)
    vehicles = await make_vehicles(6)
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=30)
    messages = []
    for n, vid in enumerate(vehicles):
        lat = lat0 + 0.001 + 0.0015 * n
        for i in range(45):
            # In through the square at 70 km/h (over its 50), out on the other side at 130.
            speed = 70.0 if i < 30 else 130.0
            messages.append(reading(vid, start + timedelta(seconds=10 * i), lat, lon0 - 0.00475 + 0.0005 * i, speed))
    await publish(producer, settings.telemetry_topic, messages)

    one, two = Worker(settings, stop_when_idle=4), Worker(settings, stop_when_idle=4, worker_index=1)
    codes = await asyncio.wait_for(asyncio.gather(one.run(), two.run()), timeout=120)
    assert codes == [0, 0]
    replay = await run_worker(settings.model_copy(update={"consumer_group": settings.consumer_group + "-replay"}))

    for vid in vehicles:
        assert [kind for _, kind, _, _ in await transitions(db, vid)] == ["enter", "exit"]
    rows = await db.fetch(
        "SELECT entity_id, geofence_id, is_resolved FROM alerts WHERE entity_id = ANY($1::uuid[])"
        " AND type = 'overspeed' ORDER BY entity_id, geofence_id NULLS LAST", vehicles)
    # Per vehicle: one in the fence (resolved on leaving it), one on the open road (still open).
    assert [(r["entity_id"], r["geofence_id"], r["is_resolved"]) for r in rows] == [
        row for vid in sorted(vehicles) for row in ((vid, fence, True), (vid, None, False))]
    assert replay.metrics.value("fleet_alerts_total", type="overspeed", action="raised") == 0
    assert replay.metrics.value("fleet_geofence_transitions_total", kind="enter") == 0
    # Every duplicate reaches the rules, which skip what they have evaluated already.
    assert replay.metrics.value("fleet_late_readings_total") == len(messages)
    raised = sum(w.metrics.value("fleet_alerts_total", type="overspeed", action="raised") for w in (one, two))
    assert raised == 12
