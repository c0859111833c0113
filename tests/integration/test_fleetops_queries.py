"""The seed's critical queries against the real PostgreSQL/PostGIS and Redis: who is
available for a period, the nearest free driver (checked against a brute-force
computation), the cached dashboard, monthly profitability per vehicle.

Each test uses vehicles of a type of its own, a patch of ocean of its own for positions
and a Redis key of its own, so it does not see other tests' data.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from fleet_telemetry.fleetops import assignments, customers, dashboard, drivers, jobs, maintenance, queries, vehicles
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.errors import DoubleBooking
from fleet_telemetry.fleetops.values import Point
from fleet_telemetry.core.settings import Settings
from tests.integration.streams import publish, run_worker
from tests.users import TEST_ADMIN

pytestmark = pytest.mark.integration

ACTOR = TEST_ADMIN
EARTH_RADIUS_M = 6_371_008.8  # mean radius; PostGIS measures on the spheroid, within 0.5 %


def tag() -> str:
    return uuid.uuid4().hex[:10].upper()


async def vehicle(conn: asyncpg.Connection, plate: str, **extra: Any) -> uuid.UUID:
    row = await vehicles.register_vehicle(conn, actor=ACTOR, data={"vin": tag(), "license_plate": plate, **extra})
    return uuid.UUID(row["id"])


async def driver(conn: asyncpg.Connection, name: str) -> uuid.UUID:
    row = await drivers.register_driver(conn, actor=ACTOR, data={"name": name})
    return uuid.UUID(row["id"])


async def book(conn: asyncpg.Connection, v: uuid.UUID, d: uuid.UUID, start: datetime,
               end: datetime | None) -> uuid.UUID:
    row = await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=v, driver_id=d,
                                              start_time=start, end_time=end)
    return uuid.UUID(row["id"])


# --- availability ---------------------------------------------------------------------------------


async def test_availability_counts_overlaps_but_not_back_to_back_or_cancelled_bookings(
    conn: asyncpg.Connection, database: Database
) -> None:
    t = tag()
    vehicle_type = f"van-{t.lower()}"
    day = datetime(2092, 1, 1, tzinfo=timezone.utc) + timedelta(days=random.randrange(3000))
    h = lambda hour: day + timedelta(hours=hour)  # noqa: E731
    names = ["before", "after", "overlap", "open", "cancelled", "inside", "free", "workshop", "deleted"]
    ids = {n: await vehicle(conn, f"{t}-{i}", type=vehicle_type) for i, n in enumerate(names)}

    def name_of(row: dict[str, Any]) -> str:
        return names[int(row["license_plate"].rsplit("-", 1)[1])]

    people = {n: await driver(conn, f"{t} {i} {n}") for i, n in enumerate(names)}

    window = (h(10), h(12))
    await book(conn, ids["before"], people["before"], h(8), h(10))      # ends as the window starts
    await book(conn, ids["after"], people["after"], h(12), h(14))       # starts as the window ends
    await book(conn, ids["overlap"], people["overlap"], h(11), h(13))
    await book(conn, ids["open"], people["open"], h(9), None)          # open-ended
    cancelled = await book(conn, ids["cancelled"], people["cancelled"], h(9), h(11))
    await assignments.cancel_assignment(conn, actor=ACTOR, assignment_id=cancelled)
    await book(conn, ids["inside"], people["inside"], h(10) + timedelta(minutes=30), h(11))
    await vehicles.update_vehicle(conn, actor=ACTOR, vehicle_id=ids["workshop"], changes={"status": "maintenance"})
    await vehicles.delete_vehicle(conn, actor=ACTOR, vehicle_id=ids["deleted"])
    await drivers.update_driver(conn, actor=ACTOR, driver_id=people["workshop"], changes={"status": "inactive"})
    await drivers.delete_driver(conn, actor=ACTOR, driver_id=people["deleted"])

    async with database.read() as reader:
        free = await queries.available_vehicles(reader, *window, vehicle_type=vehicle_type)
        free_drivers = await queries.available_drivers(reader, *window, limit=100_000)
        later = await queries.available_vehicles(reader, h(14), h(15), vehicle_type=vehicle_type)
    assert [name_of(v) for v in free] == ["before", "after", "cancelled", "free"]
    mine = {d["id"] for d in free_drivers} & {str(p) for p in people.values()}
    assert mine == {str(people[n]) for n in ("before", "after", "cancelled", "free")}
    # From 14:00 only the open-ended booking (and the workshop, the deleted one) still block.
    assert {name_of(v) for v in later} == {
        "before", "after", "overlap", "cancelled", "inside", "free"}
    # The answer agrees with what the database lets us book: each free vehicle can be
    # booked over the window (the exclusion constraint does not object), the others not.
    for name, vid in ids.items():
        if name in ("workshop", "deleted"):
            continue
        spare = await driver(conn, f"{t} spare {name}")
        try:
            await book(conn, vid, spare, *window)
            booked = True
        except DoubleBooking:
            booked = False
        assert booked == (name in ("before", "after", "cancelled", "free")), name


# --- nearest available driver ----------------------------------------------------------------------


def destination(origin: Point, bearing_deg: float, distance_m: float) -> Point:
    """The point ``distance_m`` from ``origin`` along ``bearing_deg`` on a sphere."""
    lat1, lon1 = math.radians(origin.lat), math.radians(origin.lon)
    bearing, angular = math.radians(bearing_deg), distance_m / EARTH_RADIUS_M
    lat2 = math.asin(math.sin(lat1) * math.cos(angular) + math.cos(lat1) * math.sin(angular) * math.cos(bearing))
    lon2 = lon1 + math.atan2(math.sin(bearing) * math.sin(angular) * math.cos(lat1),
                             math.cos(angular) - math.sin(lat1) * math.sin(lat2))
    return Point(math.degrees(lat2), (math.degrees(lon2) + 540) % 360 - 180)


def haversine_m(a: Point, b: Point) -> float:
    lat1, lat2 = math.radians(a.lat), math.radians(b.lat)
    dlat, dlon = lat2 - lat1, math.radians(b.lon - a.lon)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(h))


async def put_position(conn: asyncpg.Connection, v: uuid.UUID, p: Point, at: datetime) -> None:
    await conn.execute(
        "INSERT INTO vehicle_positions (vehicle_id, time, location) VALUES ($1, $2, ST_SetSRID(ST_MakePoint($3, $4), 4326))",
        v, at, p.lon, p.lat,
    )


async def test_nearest_available_driver_matches_a_brute_force_search(
    conn: asyncpg.Connection, database: Database
) -> None:
    t = tag()
    rng = random.Random(t)
    pickup = Point(rng.uniform(-50, -40), rng.uniform(-140, -120))  # South Pacific: no one else's positions
    now = datetime.now(timezone.utc)
    radius_m = 50_000.0
    # Distances far enough apart (and from the radius) that sphere vs spheroid cannot reorder them.
    distances_km = [2, 6, 11, 17, 24, 31, 38, 44, 58, 75]
    rng.shuffle(distances_km)
    fleet: list[dict[str, Any]] = []
    for i, km in enumerate(distances_km):
        v = await vehicle(conn, f"N{t}-{i}")
        d = await driver(conn, f"{t} driver {i}")
        position = destination(pickup, rng.uniform(0, 360), km * 1000)
        await put_position(conn, v, position, now - timedelta(seconds=rng.uniform(0, 300)))
        fleet.append({"vehicle": v, "driver": d, "position": position, "eligible": True})
    for entry in fleet:
        entry["assignment"] = await book(conn, entry["vehicle"], entry["driver"], now - timedelta(hours=1),
                                         now + timedelta(hours=8))

    # Spoil some candidates, each for another reason; the brute force knows which.
    stale, future, busy, suspended, unassigned = fleet[0], fleet[1], fleet[2], fleet[3], fleet[4]
    await conn.execute("UPDATE vehicle_positions SET time = $2 WHERE vehicle_id = $1",
                       stale["vehicle"], now - timedelta(hours=2))
    await assignments.cancel_assignment(conn, actor=ACTOR, assignment_id=future["assignment"])
    await book(conn, future["vehicle"], future["driver"], now + timedelta(hours=1), now + timedelta(hours=2))
    customer = await customers.register_customer(conn, actor=ACTOR, data={"name": f"C {t}"})
    job = await jobs.create_job(conn, actor=ACTOR, data={"customer_id": customer["id"]})
    await jobs.assign_job(conn, actor=ACTOR, job_id=uuid.UUID(job["id"]), assignment_id=busy["assignment"])
    await drivers.update_driver(conn, actor=ACTOR, driver_id=suspended["driver"], changes={"status": "suspended"})
    await assignments.cancel_assignment(conn, actor=ACTOR, assignment_id=unassigned["assignment"])
    for entry in (stale, future, busy, suspended, unassigned):
        entry["eligible"] = False

    expected = sorted(
        ((haversine_m(pickup, e["position"]), str(e["driver"])) for e in fleet
         if e["eligible"] and haversine_m(pickup, e["position"]) <= radius_m),
    )
    async with database.read() as reader:
        found = await queries.nearest_available_drivers(reader, pickup, radius_m, limit=100)
        nearest_two = await queries.nearest_available_drivers(reader, pickup, radius_m, limit=2)
    assert [f["driver_id"] for f in found] == [driver_id for _, driver_id in expected]
    assert expected, "the draw left no eligible driver inside the radius"
    for f, (metres, _) in zip(found, expected):
        assert f["distance_m"] == pytest.approx(metres, rel=0.005)
    assert [f["driver_id"] for f in nearest_two] == [driver_id for _, driver_id in expected[:2]]
    by_driver = {str(e["driver"]): e for e in fleet}
    for f in found:
        assert f["vehicle_id"] == str(by_driver[f["driver_id"]]["vehicle"])
        assert f["assignment_id"] == str(by_driver[f["driver_id"]]["assignment"])


async def test_positions_written_by_the_telemetry_consumer_feed_the_nearest_driver_search(
    topics: Settings, producer: AIOKafkaProducer, conn: asyncpg.Connection, database: Database
) -> None:
    settings = topics
    t = tag()
    rng = random.Random(t)
    pickup = Point(rng.uniform(-60, -52), rng.uniform(-100, -80))
    now = datetime.now(timezone.utc).replace(microsecond=0)
    near, far = await vehicle(conn, f"T{t}-near"), await vehicle(conn, f"T{t}-far")
    d_near, d_far = await driver(conn, f"{t} near"), await driver(conn, f"{t} far")
    for v, d in ((near, d_near), (far, d_far)):
        await book(conn, v, d, now - timedelta(hours=1), now + timedelta(hours=4))
    # The far truck is nearer at first, then drives away; the near one comes closer.
    route = [(far, destination(pickup, 90, 3_000), now - timedelta(seconds=60)),
             (near, destination(pickup, 0, 20_000), now - timedelta(seconds=50)),
             (far, destination(pickup, 90, 30_000), now - timedelta(seconds=20)),
             (near, destination(pickup, 0, 5_000), now - timedelta(seconds=10))]
    await publish(producer, settings.telemetry_topic, [
        (str(v).encode(), {"vehicle_id": str(v), "time": at.isoformat(), "lat": p.lat, "lon": p.lon, "speed": 60.0})
        for v, p, at in route])
    await run_worker(settings)

    async with database.read() as reader:
        found = await queries.nearest_available_drivers(reader, pickup, 40_000)
    assert [f["driver_id"] for f in found] == [str(d_near), str(d_far)]
    assert found[0]["distance_m"] == pytest.approx(5_000, rel=0.01)
    assert found[1]["distance_m"] == pytest.approx(30_000, rel=0.01)


# --- dashboard cache ---------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def cache_key(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    key = f"test:{uuid.uuid4().hex}:{dashboard.DASHBOARD_KEY}"
    yield key
    await redis_client.delete(key, f"{key}:lock")


async def test_many_callers_missing_at_once_compute_the_dashboard_once(
    base_settings: Settings, database: Database, cache_key: str
) -> None:
    compute = dashboard.database_compute(database)

    async def slow_compute() -> dict[str, Any]:
        await asyncio.sleep(0.3)  # a slow aggregation: every caller arrives while it runs
        return await compute()

    clients = [aioredis.Redis.from_url(base_settings.redis_url) for _ in range(4)]
    try:
        caches = [dashboard.DashboardCache(c, slow_compute, 60, key=cache_key) for c in clients]
        results = await asyncio.gather(*(cache.get() for cache in caches for _ in range(8)))
    finally:
        for c in clients:
            await c.aclose()
    assert sum(cache.computations for cache in caches) == 1
    assert sorted(from_cache for _, from_cache in results) == [False] + [True] * 31
    assert all(stats == results[0][0] for stats, _ in results)


async def test_dashboard_is_served_from_the_cache_until_it_expires(
    conn: asyncpg.Connection, database: Database, redis_client: aioredis.Redis, cache_key: str
) -> None:
    compute = dashboard.database_compute(database)
    # A hit: within the TTL the cached answer is served, even though the fleet has changed.
    lasting = dashboard.DashboardCache(redis_client, compute, 600, key=cache_key + ":hit")
    try:
        first, cached = await lasting.get()
        assert not cached
        assert 590_000 < await redis_client.pttl(lasting.key) <= 600_000
        async with database.read() as reader:
            assert first["active_vehicles"] == await reader.fetchval(
                "SELECT count(*) FROM vehicles WHERE deleted_at IS NULL AND status = 'active'")
        await vehicle(conn, f"D{tag()}")  # the fleet grows; the cached answer does not see it
        second, cached = await lasting.get()
        assert cached and second == first and lasting.computations == 1
    finally:
        await redis_client.delete(lasting.key)

    # Expiry: once Redis has dropped the key, the next caller computes afresh.
    brief = dashboard.DashboardCache(redis_client, compute, 1, key=cache_key)
    before, cached = await brief.get()
    assert not cached
    while await redis_client.exists(cache_key):
        await asyncio.sleep(0.05)
    await vehicle(conn, f"E{tag()}")
    after, cached = await brief.get()
    assert not cached and brief.computations == 2
    assert after["active_vehicles"] == before["active_vehicles"] + 1


async def test_dashboard_aggregates_revenue_costs_and_fleet(conn: asyncpg.Connection) -> None:
    before = await dashboard.compute_stats(conn)
    t = tag()
    v, d = await vehicle(conn, f"R{t}"), await driver(conn, f"{t} R")
    now = datetime.now(timezone.utc)
    booking = await book(conn, v, d, now - timedelta(hours=1), now + timedelta(hours=3))
    customer = await customers.register_customer(conn, actor=ACTOR, data={"name": f"C {t}"})
    for price in ("100.10", "200.20"):
        job = await jobs.create_job(conn, actor=ACTOR, data={"customer_id": customer["id"], "agreed_price": price})
        jid = uuid.UUID(job["id"])
        await jobs.assign_job(conn, actor=ACTOR, job_id=jid, assignment_id=booking)
        await jobs.set_job_status(conn, actor=ACTOR, job_id=jid, status="in_transit")
        await jobs.set_job_status(conn, actor=ACTOR, job_id=jid, status="delivered")
    await maintenance.record_service(conn, actor=ACTOR, data={
        "vehicle_id": str(v), "type": "tyres", "cost": "55.55", "date": now.date().isoformat()})
    after = await dashboard.compute_stats(conn)

    def plus(before_value: str | None, amount: str) -> str:
        return str(Decimal(before_value or "0") + Decimal(amount))

    assert after["total_revenue"]["EUR"] == plus(before["total_revenue"].get("EUR"), "300.30")
    assert after["revenue_today"]["EUR"] == plus(before["revenue_today"].get("EUR"), "300.30")
    assert after["delivered_jobs_today"] == before["delivered_jobs_today"] + 2
    assert after["maintenance_costs"]["today"] == plus(before["maintenance_costs"]["today"], "55.55")
    assert after["active_vehicles"] == before["active_vehicles"] + 1
    assert after["vehicles_on_duty"] == before["vehicles_on_duty"] + 1


# --- profitability -----------------------------------------------------------------------------------


async def test_monthly_profitability_per_vehicle(conn: asyncpg.Connection, database: Database) -> None:
    t = tag()
    v, d = await vehicle(conn, f"M{t}"), await driver(conn, f"{t} M")
    now = datetime.now(timezone.utc)
    booking = await book(conn, v, d, now - timedelta(hours=1), now + timedelta(hours=3))
    customer = await customers.register_customer(conn, actor=ACTOR, data={"name": f"C {t}"})
    month = date(2093, 1, 1) + timedelta(days=31 * random.randrange(100))
    month = month.replace(day=1)
    delivered = datetime(month.year, month.month, 10, 12, tzinfo=timezone.utc)
    for price, currency in (("1000.00", "EUR"), ("500.00", "EUR"), ("70.00", "USD")):
        job = await jobs.create_job(conn, actor=ACTOR, data={"customer_id": customer["id"], "agreed_price": price,
                                                             "currency": currency})
        jid = uuid.UUID(job["id"])
        await jobs.assign_job(conn, actor=ACTOR, job_id=jid, assignment_id=booking)
        await jobs.set_job_status(conn, actor=ACTOR, job_id=jid, status="in_transit")
        await jobs.set_job_status(conn, actor=ACTOR, job_id=jid, status="delivered", at=delivered)
    for cost, day in (("300.00", 3), ("45.50", 20)):
        await maintenance.record_service(conn, actor=ACTOR, data={
            "vehicle_id": str(v), "type": "tyres", "cost": cost, "date": month.replace(day=day).isoformat()})
    next_month = (month + timedelta(days=32)).replace(day=1)
    await maintenance.record_service(conn, actor=ACTOR, data={
        "vehicle_id": str(v), "type": "tyres", "cost": "99.00", "date": next_month.isoformat()})

    await queries.refresh_reports(conn)
    async with database.read() as reader:
        rows = await queries.monthly_profitability(reader, month, next_month, vehicle_id=v)
    assert [(r["month"], r["revenue"], r["maintenance_cost"], r["profit"], r["jobs"], r["jobs_other_currency"],
             r["services"]) for r in rows] == [
        (month.isoformat(), "1500.00", "345.50", "1154.50", 1 + 1, 1, 2),
        (next_month.isoformat(), "0.00", "99.00", "-99.00", 0, 0, 1),
    ]
    assert rows[0]["license_plate"] == f"M{t}"
