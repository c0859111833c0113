"""The schema's own rules, checked against the real PostgreSQL/PostGIS.

Every test uses vehicles, drivers and days of its own, so the suite can run twice in a
row on the same session database.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta, timezone

import asyncpg
import pytest

pytestmark = pytest.mark.integration

MakeVehicles = Callable[[int], Awaitable[list[uuid.UUID]]]

INSERT_READING = (
    "INSERT INTO vehicle_telemetry (time, vehicle_id, location, speed, fuel_level)"
    " VALUES ($1, $2, ST_SetSRID(ST_MakePoint($3, $4), 4326), $5, $6)"
)


def _at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=timezone.utc)


def _far_day() -> date:
    """A day no migration creates a partition for, different for every test run."""
    return date(2080, 1, 1) + timedelta(days=random.randrange(0, 20 * 365))


async def _make_drivers(db: asyncpg.Connection, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    await db.executemany(
        "INSERT INTO drivers (id, name, license_number, status) VALUES ($1, $2, $3, 'active')",
        [(did, f"Driver {did.hex[:6]}", "DL-" + did.hex[:12].upper()) for did in ids],
    )
    return ids


async def _book(
    db: asyncpg.Connection,
    vehicle: uuid.UUID,
    driver: uuid.UUID,
    start: datetime,
    end: datetime | None,
    status: str = "ACTIVE",
) -> None:
    await db.execute(
        "INSERT INTO vehicle_assignments (vehicle_id, driver_id, start_time, end_time, status)"
        " VALUES ($1, $2, $3, $4, $5)",
        vehicle, driver, start, end, status,
    )


# --- the whole seed schema is there --------------------------------------------------------


async def test_every_table_view_and_function_exists(db: asyncpg.Connection) -> None:
    expected = {
        "roles", "users", "vehicles", "drivers", "vehicle_assignments", "vehicle_positions",
        "customers", "transport_jobs", "routes", "shipments", "maintenance_records",
        "maintenance_schedules", "maintenance_triggers", "geofences", "alerts",
        "vehicle_telemetry", "vehicle_telemetry_default", "telemetry_dirty_hours",
        "vehicle_telemetry_hourly", "vehicle_telemetry_daily", "audit_logs",
        "audit_logs_default", "monthly_vehicle_stats", "schema_migrations",
    }
    names = {
        r["relname"]
        for r in await db.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            " AND relkind IN ('r', 'p', 'm')"
        )
    }
    assert expected <= names
    functions = {
        r["proname"]
        for r in await db.fetch("SELECT proname FROM pg_proc WHERE proname LIKE 'fleet_%'")
    }
    assert {"fleet_ensure_telemetry_partitions", "fleet_ensure_audit_partitions"} <= functions
    extensions = {r["extname"] for r in await db.fetch("SELECT extname FROM pg_extension")}
    assert {"postgis", "btree_gist"} <= extensions


async def test_predefined_roles_are_seeded(db: asyncpg.Connection) -> None:
    roles = {r["name"]: r for r in await db.fetch("SELECT name, permissions FROM roles")}
    assert {"admin", "fleet_manager", "dispatcher", "driver", "viewer"} <= set(roles)
    assert await db.fetchval(
        "SELECT permissions ? 'vehicles:write' FROM roles WHERE name = 'fleet_manager'"
    )
    assert not await db.fetchval(
        "SELECT permissions ? 'vehicles:write' FROM roles WHERE name = 'viewer'"
    )


async def test_telemetry_columns_are_the_copy_contract(db: asyncpg.Connection) -> None:
    columns = await db.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
        " WHERE attrelid = 'vehicle_telemetry'::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum"
    )
    assert [(c["attname"], c["type"]) for c in columns] == [
        ("time", "timestamp with time zone"),
        ("vehicle_id", "uuid"),
        ("location", "geometry(Point,4326)"),
        ("speed", "double precision"),
        ("fuel_level", "double precision"),
        ("heading", "double precision"),
        ("odometer_km", "double precision"),
        ("engine_status", "jsonb"),
    ]


# --- vehicle_assignments: no double booking ------------------------------------------------


async def test_overlapping_active_booking_of_a_vehicle_is_rejected(
    db: asyncpg.Connection, make_vehicles: MakeVehicles
) -> None:
    (vehicle,) = await make_vehicles(1)
    first, second = await _make_drivers(db, 2)
    day = date(2030, 5, 6)
    await _book(db, vehicle, first, _at(day, 10), _at(day, 12))

    with pytest.raises(asyncpg.exceptions.ExclusionViolationError) as caught:
        await _book(db, vehicle, second, _at(day, 11), _at(day, 13))

    assert caught.value.constraint_name == "vehicle_assignments_no_vehicle_overlap"


async def test_overlapping_active_booking_of_a_driver_is_rejected(
    db: asyncpg.Connection, make_vehicles: MakeVehicles
) -> None:
    first, second = await make_vehicles(2)
    (driver,) = await _make_drivers(db, 1)
    day = date(2030, 5, 6)
    await _book(db, first, driver, _at(day, 10), _at(day, 12))

    with pytest.raises(asyncpg.exceptions.ExclusionViolationError) as caught:
        await _book(db, second, driver, _at(day, 9), _at(day, 10, 30))

    assert caught.value.constraint_name == "vehicle_assignments_no_driver_overlap"


async def test_an_open_ended_booking_blocks_everything_after_its_start(
    db: asyncpg.Connection, make_vehicles: MakeVehicles
) -> None:
    first_vehicle, second_vehicle = await make_vehicles(2)
    first_driver, second_driver = await _make_drivers(db, 2)
    day = date(2030, 5, 6)
    await _book(db, first_vehicle, first_driver, _at(day, 10), None)

    with pytest.raises(asyncpg.exceptions.ExclusionViolationError):
        await _book(db, first_vehicle, second_driver, _at(day + timedelta(days=400), 8), _at(day + timedelta(days=400), 9))
    with pytest.raises(asyncpg.exceptions.ExclusionViolationError):
        await _book(db, second_vehicle, first_driver, _at(day + timedelta(days=2), 8), None)
    # Before the open-ended booking starts, the vehicle is free.
    await _book(db, first_vehicle, second_driver, _at(day, 8), _at(day, 10))


async def test_back_to_back_bookings_are_accepted(
    db: asyncpg.Connection, make_vehicles: MakeVehicles
) -> None:
    (vehicle,) = await make_vehicles(1)
    (driver,) = await _make_drivers(db, 1)
    day = date(2030, 5, 6)

    await _book(db, vehicle, driver, _at(day, 10), _at(day, 11))
    await _book(db, vehicle, driver, _at(day, 11), _at(day, 12))

    count = await db.fetchval("SELECT count(*) FROM vehicle_assignments WHERE vehicle_id = $1", vehicle)
    assert count == 2


async def test_a_cancelled_booking_does_not_block(
    db: asyncpg.Connection, make_vehicles: MakeVehicles
) -> None:
    (vehicle,) = await make_vehicles(1)
    first, second = await _make_drivers(db, 2)
    day = date(2030, 5, 6)
    await _book(db, vehicle, first, _at(day, 10), _at(day, 12), status="CANCELLED")

    await _book(db, vehicle, second, _at(day, 10), _at(day, 12))
    await _book(db, vehicle, first, _at(day, 11), _at(day, 13), status="COMPLETED")


async def test_a_booking_must_end_after_it_starts(
    db: asyncpg.Connection, make_vehicles: MakeVehicles
) -> None:
    (vehicle,) = await make_vehicles(1)
    (driver,) = await _make_drivers(db, 1)
    day = date(2030, 5, 6)

    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await _book(db, vehicle, driver, _at(day, 10), _at(day, 10))
    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await _book(db, vehicle, driver, _at(day, 10), _at(day, 12), status="PLANNED")


# --- vehicle_telemetry: partitions -------------------------------------------------------


async def test_a_reading_lands_in_its_days_partition(db: asyncpg.Connection) -> None:
    vehicle = uuid.uuid4()  # no FK: the consumer validates vehicle ids
    today = datetime.now(timezone.utc).date()
    for day in (today - timedelta(days=30), today, today + timedelta(days=7)):
        await db.execute(INSERT_READING, _at(day, 12), vehicle, 13.4, 52.5, 50.0, 80.0)

    rows = await db.fetch(
        "SELECT time, tableoid::regclass::text AS part FROM vehicle_telemetry"
        " WHERE vehicle_id = $1 ORDER BY time",
        vehicle,
    )
    assert [r["part"] for r in rows] == [
        f"vehicle_telemetry_p{r['time'].strftime('%Y%m%d')}" for r in rows
    ]


async def test_a_reading_without_a_partition_lands_in_the_default_one(db: asyncpg.Connection) -> None:
    vehicle = uuid.uuid4()
    await db.execute(INSERT_READING, _at(_far_day(), 3), vehicle, 2.35, 48.85, None, None)

    part = await db.fetchval(
        "SELECT tableoid::regclass::text FROM vehicle_telemetry WHERE vehicle_id = $1", vehicle
    )
    assert part == "vehicle_telemetry_default"


async def test_a_duplicate_reading_is_refused_by_the_identity(db: asyncpg.Connection) -> None:
    vehicle = uuid.uuid4()
    when = _at(datetime.now(timezone.utc).date(), 1, 2)
    await db.execute(INSERT_READING, when, vehicle, 1.0, 1.0, 10.0, 10.0)

    with pytest.raises(asyncpg.exceptions.UniqueViolationError):
        await db.execute(INSERT_READING, when, vehicle, 2.0, 2.0, 20.0, 20.0)


async def test_ensure_partitions_moves_default_rows_without_loss(db: asyncpg.Connection) -> None:
    day = _far_day()
    vehicle = uuid.uuid4()
    # 48 readings of `day`, plus 2 of the next day that must stay in the default partition.
    for i in range(48):
        await db.execute(
            INSERT_READING, _at(day, i // 2, (i % 2) * 30), vehicle, 10.0 + i / 100, 50.0, float(i), 90.0 - i
        )
    for hour in (0, 23):
        await db.execute(INSERT_READING, _at(day + timedelta(days=1), hour), vehicle, 11.0, 51.0, 1.0, 1.0)
    query = (
        "SELECT time, vehicle_id, ST_AsText(location) AS location, speed, fuel_level,"
        " tableoid::regclass::text AS part FROM vehicle_telemetry WHERE vehicle_id = $1 ORDER BY time"
    )
    before = await db.fetch(query, vehicle)
    assert {r["part"] for r in before} == {"vehicle_telemetry_default"}

    created = await db.fetchval("SELECT fleet_ensure_telemetry_partitions($1, $1)", day)

    assert created == 1
    after = await db.fetch(query, vehicle)
    partition = f"vehicle_telemetry_p{day:%Y%m%d}"
    assert [r["part"] for r in after] == [partition] * 48 + ["vehicle_telemetry_default"] * 2
    strip = lambda rows: [tuple(r)[:-1] for r in rows]  # noqa: E731
    assert strip(after) == strip(before)
    assert await db.fetchval("SELECT fleet_ensure_telemetry_partitions($1, $1)", day) == 0


async def test_concurrent_ensure_calls_create_each_partition_once(database_url: str) -> None:
    first_day = _far_day()
    last_day = first_day + timedelta(days=2)
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        created = await asyncio.gather(
            *(c.fetchval("SELECT fleet_ensure_telemetry_partitions($1, $2)", first_day, last_day) for c in conns)
        )
    finally:
        for conn in conns:
            await conn.close()
    assert sorted(created) == [0, 0, 3]


async def test_audit_rows_land_in_their_months_partition(db: asyncpg.Connection) -> None:
    entity = uuid.uuid4().hex
    part = await db.fetchval(
        "INSERT INTO audit_logs (actor, action, entity_type, entity_id, after)"
        " VALUES ('test', 'vehicle.created', 'vehicle', $1, '{}')"
        " RETURNING tableoid::regclass::text",
        entity,
    )
    assert part == f"audit_logs_p{datetime.now(timezone.utc):%Y%m}"


# --- indexes the seed asks for ----------------------------------------------------------


async def test_the_gin_index_serves_specs_containment(db: asyncpg.Connection) -> None:
    tag = uuid.uuid4().hex[:8].upper()
    transaction = db.transaction()
    await transaction.start()
    try:
        await db.execute(
            """
            INSERT INTO vehicles (vin, license_plate, make, model, year, type, status, specs)
            SELECT $1 || '-' || g, 'P-' || $1 || '-' || g, 'MAN', 'TGX', 2020,
                   CASE WHEN g % 2 = 0 THEN 'truck' ELSE 'van' END, 'active',
                   CASE WHEN g % 1000 = 0 THEN '{"fuel": "diesel", "axles": 3}'::jsonb
                        ELSE jsonb_build_object('fuel', 'electric', 'axles', g % 4) END
              FROM generate_series(1, 20000) AS g
            """,
            tag,
        )
        await db.execute("ANALYZE vehicles")
        plan = "\n".join(
            r[0]
            for r in await db.fetch(
                """EXPLAIN SELECT id FROM vehicles WHERE specs @> '{"fuel": "diesel"}'"""
            )
        )
    finally:
        await transaction.rollback()
    assert "idx_vehicles_specs" in plan, plan


# --- materialized view, alerts, geofences -------------------------------------------------


async def test_monthly_vehicle_stats_refreshes_concurrently(
    db: asyncpg.Connection, make_vehicles: MakeVehicles
) -> None:
    (vehicle,) = await make_vehicles(1)
    await db.executemany(
        "INSERT INTO maintenance_records (vehicle_id, type, cost, date, provider)"
        " VALUES ($1, $2, $3, $4, 'Garage')",
        [
            (vehicle, "oil", 120.50, date(2026, 3, 2)),
            (vehicle, "tyres", 800.00, date(2026, 3, 28)),
            (vehicle, "brakes", 300.00, date(2026, 4, 1)),
        ],
    )

    await db.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY monthly_vehicle_stats")

    rows = await db.fetch(
        "SELECT month, total_cost, records FROM monthly_vehicle_stats WHERE vehicle_id = $1 ORDER BY month",
        vehicle,
    )
    assert [(r["month"], float(r["total_cost"]), r["records"]) for r in rows] == [
        (date(2026, 3, 1), 920.5, 2),
        (date(2026, 4, 1), 300.0, 1),
    ]


async def test_only_one_open_alert_per_entity_type_and_geofence(db: asyncpg.Connection) -> None:
    vehicle = uuid.uuid4()
    raise_alert = (
        "INSERT INTO alerts (entity_id, type, severity) VALUES ($1, 'low_fuel', 'warning')"
        " ON CONFLICT (entity_id, type, coalesce(geofence_id, 0)) WHERE NOT is_resolved"
        " AND type <> 'document_expiring' DO NOTHING RETURNING id"
    )
    first = await db.fetchval(raise_alert, vehicle)
    assert first is not None
    assert await db.fetchval(raise_alert, vehicle) is None

    await db.execute(
        "UPDATE alerts SET is_resolved = true, resolved_at = now() WHERE id = $1", first
    )
    assert await db.fetchval(raise_alert, vehicle) not in (None, first)


async def test_expiry_alerts_are_one_open_per_document_not_per_owner(db: asyncpg.Connection) -> None:
    owner, licence, insurance = uuid.uuid4(), str(uuid.uuid4()), str(uuid.uuid4())
    raise_alert = (
        "INSERT INTO alerts (entity_type, entity_id, type, severity, details)"
        " VALUES ('driver', $1, 'document_expiring', 'warning', jsonb_build_object('document_id', $2::text))"
        " ON CONFLICT ((details ->> 'document_id')) WHERE NOT is_resolved AND type = 'document_expiring'"
        " DO NOTHING RETURNING id"
    )
    assert await db.fetchval(raise_alert, owner, licence) is not None
    assert await db.fetchval(raise_alert, owner, insurance) is not None  # the same owner, another document
    assert await db.fetchval(raise_alert, owner, licence) is None


async def test_geofences_need_their_shape_and_index_both_kinds(db: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await db.execute("INSERT INTO geofences (name, kind, radius_m) VALUES ('no centre', 'circle', 100)")
    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await db.execute("INSERT INTO geofences (name, kind) VALUES ('no area', 'polygon')")

    name = f"depot-{uuid.uuid4().hex[:8]}"
    await db.execute(
        "INSERT INTO geofences (name, kind, center, radius_m)"
        " VALUES ($1, 'circle', ST_SetSRID(ST_MakePoint(13.4, 52.5), 4326), 500)",
        name,
    )
    await db.execute(
        "INSERT INTO geofences (name, kind, area)"
        " VALUES ($1 || '-area', 'polygon', ST_MakeEnvelope(13.39, 52.49, 13.41, 52.51, 4326))",
        name,
    )
    inside = await db.fetch(
        "SELECT kind FROM geofences WHERE name LIKE $1 || '%' AND is_active AND deleted_at IS NULL"
        " AND shape && ST_SetSRID(ST_MakePoint(13.403, 52.501), 4326)"
        " AND CASE kind WHEN 'circle' THEN ST_DWithin(center::geography,"
        "   ST_SetSRID(ST_MakePoint(13.403, 52.501), 4326)::geography, radius_m)"
        " ELSE ST_Covers(area, ST_SetSRID(ST_MakePoint(13.403, 52.501), 4326)) END",
        name,
    )
    assert sorted(r["kind"] for r in inside) == ["circle", "polygon"]


async def test_overdue_maintenance_uses_an_immutable_partial_index(db: asyncpg.Connection) -> None:
    predicate = await db.fetchval(
        "SELECT pg_get_expr(indpred, indrelid) FROM pg_index"
        " WHERE indexrelid = 'idx_maintenance_overdue'::regclass"
    )
    assert predicate is not None and "now()" not in predicate.lower()
