"""The small writers against the real PostgreSQL/PostGIS: given a request, then exactly
these rows, these audit rows, or this one clear refusal.

Every test registers vehicles, drivers and customers of its own (random VINs, plates,
licence numbers), so the suite runs twice in a row on the same session database.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest

from fleet_telemetry.fleetops import assignments, customers, drivers, jobs, maintenance, vehicles
from fleet_telemetry.fleetops.errors import Conflict, DoubleBooking, InvalidInput, NotFound
from fleet_telemetry.cli.main import main as cli_main
from tests.users import TEST_ADMIN, make_user

pytestmark = pytest.mark.integration

ACTOR = TEST_ADMIN


def tag() -> str:
    return uuid.uuid4().hex[:10].upper()


async def new_vehicle(conn: asyncpg.Connection, **extra: Any) -> dict[str, Any]:
    t = tag()
    return await vehicles.register_vehicle(
        conn, actor=ACTOR, data={"vin": f"VIN{t}", "license_plate": f"P-{t}", **extra})


async def new_driver(conn: asyncpg.Connection, **extra: Any) -> dict[str, Any]:
    t = tag()
    return await drivers.register_driver(conn, actor=ACTOR, data={"name": f"Driver {t}",
                                                                   "license_number": f"DL-{t}", **extra})


async def admin_id(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT id FROM users WHERE email = $1 AND deleted_at IS NULL", TEST_ADMIN))


async def audit_rows(conn: asyncpg.Connection, entity_type: str, entity_id: Any) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT actor, action, before, after FROM audit_logs WHERE entity_type = $1 AND entity_id = $2"
        " ORDER BY id", entity_type, str(entity_id),
    )
    return [dict(r) for r in rows]


def at(hours: float) -> datetime:
    """A fixed time far in the future plus ``hours``; bookings there never meet other tests'."""
    return datetime(2090, 6, 1, tzinfo=timezone.utc) + timedelta(hours=hours)


async def test_vehicle_register_update_delete_leave_rows_and_audit_rows(conn: asyncpg.Connection) -> None:
    t = tag()
    created = await vehicles.register_vehicle(conn, actor=ACTOR, data={
        "vin": f"vin{t}", "license_plate": f"b-{t}", "make": "Volvo", "model": "FH16", "year": 2022,
        "specs": {"fuel": "diesel"}})
    vid = uuid.UUID(created["id"])
    assert created["vin"] == f"VIN{t}" and created["license_plate"] == f"B-{t}"  # normalised
    assert created["type"] == "truck" and created["status"] == "active"

    alice, bob = await make_user(conn, role="fleet_manager"), await make_user(conn, role="fleet_manager")
    updated = await vehicles.update_vehicle(conn, actor=str(alice), vehicle_id=vid,
                                            changes={"status": "maintenance", "year": 2023})
    assert updated["status"] == "maintenance" and updated["year"] == 2023
    deleted = await vehicles.delete_vehicle(conn, actor=str(bob), vehicle_id=vid)
    assert deleted["deleted_at"] is not None

    row = await conn.fetchrow("SELECT status, year, deleted_at FROM vehicles WHERE id = $1", vid)
    assert row["status"] == "maintenance" and row["year"] == 2023 and row["deleted_at"] is not None
    log = await audit_rows(conn, "vehicle", vid)
    assert [(r["actor"], r["action"]) for r in log] == [
        (await admin_id(conn), "vehicle.register"), (str(alice), "vehicle.update"), (str(bob), "vehicle.delete")]
    assert log[0]["before"] is None and log[0]["after"]["specs"] == {"fuel": "diesel"}
    assert log[1]["before"]["status"] == "active" and log[1]["after"]["status"] == "maintenance"
    assert log[2]["before"]["deleted_at"] is None and log[2]["after"]["deleted_at"] is not None

    with pytest.raises(NotFound, match=str(vid)):
        await vehicles.update_vehicle(conn, actor=ACTOR, vehicle_id=vid, changes={"year": 2020})
    # The VIN of a deleted vehicle is free again.
    again = await vehicles.register_vehicle(conn, actor=ACTOR, data={"vin": f"VIN{t}", "license_plate": f"B-{t}"})
    assert again["id"] != created["id"]


async def test_a_taken_vin_is_refused_naming_the_holder(conn: asyncpg.Connection) -> None:
    first = await new_vehicle(conn)
    with pytest.raises(Conflict, match=f"vin {first['vin']} is already used by vehicle {first['id']}"):
        await vehicles.register_vehicle(conn, actor=ACTOR, data={"vin": first["vin"], "license_plate": f"Q-{tag()}"})
    other = await new_vehicle(conn)
    with pytest.raises(Conflict, match=f"license_plate {first['license_plate']} is already used"):
        await vehicles.update_vehicle(conn, actor=ACTOR, vehicle_id=uuid.UUID(other["id"]),
                                      changes={"license_plate": first["license_plate"]})
    # Nothing half-written: no audit row for the refused requests.
    assert len(await audit_rows(conn, "vehicle", other["id"])) == 1


async def test_driver_and_customer_life_cycles_are_audited(conn: asyncpg.Connection) -> None:
    driver = await new_driver(conn)
    did = uuid.UUID(driver["id"])
    await drivers.update_driver(conn, actor=ACTOR, driver_id=did, changes={"status": "suspended"})
    await drivers.delete_driver(conn, actor=ACTOR, driver_id=did)
    assert [r["action"] for r in await audit_rows(conn, "driver", did)] == [
        "driver.register", "driver.update", "driver.delete"]
    with pytest.raises(NotFound, match="no user with id"):
        await drivers.register_driver(conn, actor=ACTOR, data={"name": "X", "user_id": str(uuid.uuid4())})

    customer = await customers.register_customer(conn, actor=ACTOR, data={
        "name": f"ACME {tag()}", "contact_info": {"email": "ops@acme.test"}})
    cid = uuid.UUID(customer["id"])
    changed = await customers.update_customer(conn, actor=ACTOR, customer_id=cid,
                                              changes={"billing_address": "1 Main St"})
    assert changed["billing_address"] == "1 Main St" and changed["contact_info"] == {"email": "ops@acme.test"}
    await customers.delete_customer(conn, actor=ACTOR, customer_id=cid)
    log = await audit_rows(conn, "customer", cid)
    assert [r["action"] for r in log] == ["customer.register", "customer.update", "customer.delete"]
    assert log[1]["before"]["billing_address"] is None and log[1]["after"]["billing_address"] == "1 Main St"


async def test_double_booking_names_the_conflicting_assignment_and_its_period(conn: asyncpg.Connection) -> None:
    vehicle, other_vehicle = await new_vehicle(conn), await new_vehicle(conn)
    driver, other_driver = await new_driver(conn), await new_driver(conn)
    v, v2 = uuid.UUID(vehicle["id"]), uuid.UUID(other_vehicle["id"])
    d, d2 = uuid.UUID(driver["id"]), uuid.UUID(other_driver["id"])
    booked = await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=v, driver_id=d,
                                                 start_time=at(8), end_time=at(16))

    with pytest.raises(DoubleBooking) as vehicle_clash:
        await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=v, driver_id=d2,
                                            start_time=at(15), end_time=at(18))
    err = vehicle_clash.value
    assert (err.resource, err.resource_id, str(err.conflicting_id)) == ("vehicle", v, booked["id"])
    assert (err.start, err.end) == (at(8), at(16))
    assert str(err) == (f"vehicle {v} is already booked by assignment {booked['id']}"
                        f" from {at(8).isoformat()} to {at(16).isoformat()}")

    with pytest.raises(DoubleBooking) as driver_clash:
        await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=v2, driver_id=d,
                                            start_time=at(0), end_time=at(9))
    assert driver_clash.value.resource == "driver" and str(driver_clash.value.conflicting_id) == booked["id"]

    # Back-to-back is fine ([8, 16) then [16, 20)); an open end blocks everything after it.
    await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=v, driver_id=d2,
                                        start_time=at(16), end_time=at(20))
    open_ended = await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=v2, driver_id=d2,
                                                     start_time=at(100))
    with pytest.raises(DoubleBooking, match="to open end"):
        await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=v2, driver_id=d,
                                            start_time=at(5000), end_time=at(5001))
    # A cancelled booking blocks nothing any more.
    await assignments.cancel_assignment(conn, actor=ACTOR, assignment_id=uuid.UUID(open_ended["id"]))
    await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=v2, driver_id=d,
                                        start_time=at(5000), end_time=at(5001))
    rows = await conn.fetch("SELECT status FROM vehicle_assignments WHERE vehicle_id = ANY($1::uuid[])", [v, v2])
    assert sorted(r["status"] for r in rows) == ["ACTIVE", "ACTIVE", "ACTIVE", "CANCELLED"]
    assert [r["action"] for r in await audit_rows(conn, "assignment", open_ended["id"])] == [
        "assignment.create", "assignment.cancel"]


async def test_assignment_input_errors(conn: asyncpg.Connection) -> None:
    v, d = await new_vehicle(conn), await new_driver(conn, status="suspended")
    vid, did = uuid.UUID(v["id"]), uuid.UUID(d["id"])
    with pytest.raises(InvalidInput, match="must be after"):
        await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=vid, driver_id=did,
                                            start_time=at(5), end_time=at(4))
    with pytest.raises(NotFound, match="no vehicle"):
        await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=uuid.uuid4(), driver_id=did,
                                            start_time=at(1))
    with pytest.raises(Conflict, match="suspended"):
        await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=vid, driver_id=did, start_time=at(1))


async def test_ending_an_assignment_sets_its_end_and_frees_the_rest(conn: asyncpg.Connection) -> None:
    v, d = await new_vehicle(conn), await new_driver(conn)
    vid, did = uuid.UUID(v["id"]), uuid.UUID(d["id"])
    now = datetime.now(timezone.utc)
    running = await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=vid, driver_id=did,
                                                  start_time=now - timedelta(hours=2))
    with pytest.raises(Conflict, match="has ACTIVE assignment"):
        await vehicles.delete_vehicle(conn, actor=ACTOR, vehicle_id=vid)
    with pytest.raises(InvalidInput, match="in the future"):
        await assignments.end_assignment(conn, actor=ACTOR, assignment_id=uuid.UUID(running["id"]),
                                         at=now + timedelta(hours=1))
    ended_at = now - timedelta(minutes=30)
    ended = await assignments.end_assignment(conn, actor=ACTOR, assignment_id=uuid.UUID(running["id"]), at=ended_at)
    assert ended["status"] == "COMPLETED" and ended["end_time"] == ended_at.isoformat()
    with pytest.raises(Conflict, match="COMPLETED"):
        await assignments.cancel_assignment(conn, actor=ACTOR, assignment_id=uuid.UUID(running["id"]))
    # The vehicle is free from ended_at on, and can now be deleted.
    await vehicles.delete_vehicle(conn, actor=ACTOR, vehicle_id=vid)
    log = await audit_rows(conn, "assignment", running["id"])
    assert [r["action"] for r in log] == ["assignment.create", "assignment.end"]
    assert log[1]["before"]["end_time"] is None and log[1]["after"]["status"] == "COMPLETED"


async def test_job_with_route_and_shipments_goes_through_its_life_cycle(conn: asyncpg.Connection) -> None:
    customer = await customers.register_customer(conn, actor=ACTOR, data={"name": f"Shipper {tag()}"})
    dispatcher = await make_user(conn, role="dispatcher")
    job = await jobs.create_job(conn, actor=str(dispatcher), data={
        "customer_id": customer["id"], "agreed_price": "1250.50", "currency": "eur",
        "pickup_at": "2090-01-01T08:00:00Z", "deliver_by": "2090-01-02T18:00:00+01:00",
        "route": {"origin": {"lat": 52.52, "lon": 13.405}, "destination": "48.137,11.575",
                  "waypoints": [[50.11, 8.682]]},
        "shipments": [{"type": "Pallet", "weight_kg": 400, "dimensions": {"length_cm": 120}},
                      {"description": "fragile"}],
    })
    jid = uuid.UUID(job["id"])
    assert job["status"] == "pending" and job["agreed_price"] == "1250.50" and job["currency"] == "EUR"
    route = job["route"]
    assert route["origin"] == {"lat": 52.52, "lon": 13.405}
    assert route["destination"] == {"lat": 48.137, "lon": 11.575}
    assert route["path"] == [{"lat": 52.52, "lon": 13.405}, {"lat": 50.11, "lon": 8.682},
                             {"lat": 48.137, "lon": 11.575}]
    assert 700 < route["distance_km"] < 760  # Berlin - Frankfurt - Munich along great circles
    assert [(s["type"], s["weight_kg"]) for s in job["shipments"]] == [("pallet", "400.00"), ("general", None)]
    stored = await conn.fetchrow(
        "SELECT ST_NPoints(waypoints) AS n, ST_SRID(origin) AS srid FROM routes WHERE job_id = $1", jid)
    assert (stored["n"], stored["srid"]) == (3, 4326)

    v, d = await new_vehicle(conn), await new_driver(conn)
    now = datetime.now(timezone.utc)
    booking = await assignments.create_assignment(conn, actor=ACTOR, vehicle_id=uuid.UUID(v["id"]),
                                                  driver_id=uuid.UUID(d["id"]), start_time=now - timedelta(hours=1),
                                                  end_time=now + timedelta(hours=8))
    aid = uuid.UUID(booking["id"])
    with pytest.raises(InvalidInput, match="cannot become delivered"):
        await jobs.set_job_status(conn, actor=ACTOR, job_id=jid, status="delivered")
    assigned = await jobs.assign_job(conn, actor=ACTOR, job_id=jid, assignment_id=aid)
    assert assigned["status"] == "assigned" and assigned["assignment_id"] == str(aid)
    with pytest.raises(Conflict, match="carries open job"):
        await assignments.cancel_assignment(conn, actor=ACTOR, assignment_id=aid)
    await jobs.set_job_status(conn, actor=ACTOR, job_id=jid, status="in_transit")
    delivered = await jobs.set_job_status(conn, actor=ACTOR, job_id=jid, status="delivered")
    assert delivered["delivered_at"] is not None

    log = await audit_rows(conn, "job", jid)
    assert [r["action"] for r in log] == ["job.create", "job.assign", "job.in_transit", "job.delivered"]
    assert log[0]["actor"] == str(dispatcher) and log[0]["after"]["route"]["path"][1] == {"lat": 50.11, "lon": 8.682}
    assert log[3]["before"]["status"] == "in_transit" and log[3]["after"]["status"] == "delivered"


async def test_job_input_errors(conn: asyncpg.Connection) -> None:
    customer = await customers.register_customer(conn, actor=ACTOR, data={"name": f"C {tag()}"})
    with pytest.raises(InvalidInput, match=r"'route.origin.lat' must be 90 or less, got 91"):
        await jobs.create_job(conn, actor=ACTOR, data={"customer_id": customer["id"], "route": {
            "origin": {"lat": 91, "lon": 0}, "destination": {"lat": 0, "lon": 0}}})
    with pytest.raises(InvalidInput, match="'deliver_by' .* must be after 'pickup_at'"):
        await jobs.create_job(conn, actor=ACTOR, data={"customer_id": customer["id"],
                                                       "pickup_at": "2090-01-02T00:00:00Z",
                                                       "deliver_by": "2090-01-01T00:00:00Z"})
    with pytest.raises(NotFound, match="no customer"):
        await jobs.create_job(conn, actor=ACTOR, data={"customer_id": str(uuid.uuid4())})
    job = await jobs.create_job(conn, actor=ACTOR, data={"customer_id": customer["id"],
                                                         "pickup_at": "2090-01-02T00:00:00Z"})
    with pytest.raises(InvalidInput, match="must be after 'pickup_at'"):  # against the stored half
        await jobs.update_job(conn, actor=ACTOR, job_id=uuid.UUID(job["id"]),
                              changes={"deliver_by": "2090-01-01T00:00:00Z"})
    with pytest.raises(Conflict, match="open job"):
        await customers.delete_customer(conn, actor=ACTOR, customer_id=uuid.UUID(customer["id"]))
    assert await conn.fetchval("SELECT count(*) FROM transport_jobs WHERE customer_id = $1", uuid.UUID(customer["id"])) == 1


async def test_recording_a_service_recomputes_next_due_date_and_odometer(conn: asyncpg.Connection) -> None:
    vehicle_type = f"reefer-{tag().lower()}"
    early = await new_vehicle(conn, type=vehicle_type)
    vid = uuid.UUID(early["id"])
    oil = await maintenance.create_schedule(conn, actor=ACTOR, data={
        "name": "oil_change", "vehicle_type": vehicle_type, "interval_km": 30000, "interval_months": 12})
    brakes = await maintenance.create_schedule(conn, actor=ACTOR, data={
        "name": "brakes", "vehicle_type": vehicle_type, "interval_months": 24})
    late = await new_vehicle(conn, type=vehicle_type)  # registered after the schedules: triggers too
    registered = date.fromisoformat(early["created_at"][:10])
    triggers = await conn.fetch(
        "SELECT vehicle_id, schedule_id, next_due_date, next_due_km, last_service_date FROM maintenance_triggers"
        " WHERE vehicle_id = ANY($1::uuid[]) ORDER BY next_due_date", [vid, uuid.UUID(late["id"])])
    assert len(triggers) == 4
    assert {t["next_due_km"] for t in triggers} == {None} and {t["last_service_date"] for t in triggers} == {None}

    workshop = await make_user(conn, role="mechanic")
    result = await maintenance.record_service(conn, actor=str(workshop), data={
        "vehicle_id": str(vid), "type": "oil_change", "cost": "310.00", "date": "2031-01-31",
        "odometer_km": 120500, "provider": "Garage"})
    assert result["record"]["cost"] == "310.00"
    [moved] = result["triggers"]
    assert moved["schedule_id"] == oil["id"]
    assert (moved["last_service_date"], moved["last_service_km"]) == ("2031-01-31", 120500.0)
    assert (moved["next_due_date"], moved["next_due_km"]) == ("2032-01-31", 150500.0)
    brake_row = await conn.fetchrow("SELECT next_due_date FROM maintenance_triggers WHERE vehicle_id = $1"
                                    " AND schedule_id = $2", vid, uuid.UUID(brakes["id"]))
    assert brake_row["next_due_date"].year == registered.year + 2  # untouched by an oil change

    # An older service does not move the trigger back; a newer one without odometer
    # moves the date and leaves the odometer due unknown.
    old = await maintenance.record_service(conn, actor=ACTOR, data={
        "vehicle_id": str(vid), "type": "oil_change", "date": "2030-06-01", "odometer_km": 90000})
    assert old["triggers"] == []
    newer = await maintenance.record_service(conn, actor=ACTOR, data={
        "vehicle_id": str(vid), "type": "oil_change", "date": "2032-02-29"})
    assert (newer["triggers"][0]["next_due_date"], newer["triggers"][0]["next_due_km"]) == ("2033-02-28", None)

    # Changing the schedule moves the due dates of its triggers from their last service.
    await maintenance.update_schedule(conn, actor=ACTOR, schedule_id=uuid.UUID(oil["id"]),
                                      changes={"interval_months": 6})
    due = await conn.fetchval("SELECT next_due_date FROM maintenance_triggers WHERE vehicle_id = $1"
                              " AND schedule_id = $2", vid, uuid.UUID(oil["id"]))
    assert due == date(2032, 8, 29)

    trigger_log = await audit_rows(conn, "maintenance_trigger", moved["id"])
    assert [r["action"] for r in trigger_log] == [
        "maintenance_trigger.activate", "maintenance_trigger.service", "maintenance_trigger.service",
        "maintenance_trigger.reschedule"]
    assert trigger_log[1]["actor"] == str(workshop) and trigger_log[1]["before"]["next_due_km"] is None
    assert trigger_log[1]["after"]["next_due_km"] == 150500.0
    record_log = await audit_rows(conn, "maintenance_record", result["record"]["id"])
    assert record_log[0]["after"]["provider"] == "Garage"

    # Retiring the vehicle switches its triggers off.
    await vehicles.update_vehicle(conn, actor=ACTOR, vehicle_id=vid, changes={"status": "retired"})
    assert not await conn.fetchval("SELECT bool_or(is_active) FROM maintenance_triggers WHERE vehicle_id = $1", vid)
    with pytest.raises(NotFound):
        await maintenance.record_service(conn, actor=ACTOR, data={
            "vehicle_id": str(uuid.uuid4()), "type": "oil_change", "date": "2031-01-01"})
    assert Decimal(result["record"]["cost"]) == Decimal("310.00")


# --- the command line ---------------------------------------------------------------------------


async def fleet(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], database_url: str,
                *argv: str) -> tuple[int, str, str]:
    """Runs ``fleet argv...`` in a thread (it owns its event loop) against the session database."""
    monkeypatch.setenv("FLEET_DATABASE_URL", database_url)
    monkeypatch.setenv("FLEET_LOG_FORMAT", "console")
    monkeypatch.setenv("FLEET_LOG_LEVEL", "error")
    monkeypatch.setenv("FLEET_ACTOR", TEST_ADMIN)
    try:
        code = await asyncio.to_thread(cli_main, list(argv))
    except SystemExit as exc:  # argparse refuses the usage before any work
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_writes_with_json_output_and_answers_bad_input_with_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], database_url: str
) -> None:
    t = tag()
    setup = await asyncpg.connect(database_url)
    try:
        clerk = f"clerk-{t.lower()}@fleet.test"
        clerk_id, admin = await make_user(setup, clerk, "fleet_manager"), await admin_id(setup)
    finally:
        await setup.close()
    code, out, err = await fleet(monkeypatch, capsys, database_url, "vehicles", "add", "--vin", f"V{t}",
                                 "--plate", f"CLI-{t}", "--specs", '{"fuel": "diesel"}', "--json")
    assert (code, err) == (0, "")
    vehicle = orjson.loads(out)
    assert vehicle["vin"] == f"V{t}" and vehicle["specs"] == {"fuel": "diesel"}
    code, out, _ = await fleet(monkeypatch, capsys, database_url, "drivers", "add", "--name", f"CLI {t}",
                               "--actor", clerk.upper(), "--json")
    driver = orjson.loads(out)

    booking = ["assignments", "create", "--vehicle", vehicle["id"], "--driver", driver["id"],
               "--from", "2091-03-01T08:00:00Z", "--to", "2091-03-01T16:00:00Z", "--json"]
    code, out, _ = await fleet(monkeypatch, capsys, database_url, *booking)
    assert code == 0
    first = orjson.loads(out)

    cases = [
        (booking, f"fleet assignments: vehicle {vehicle['id']} is already booked by assignment {first['id']}"
                  " from 2091-03-01T08:00:00+00:00 to 2091-03-01T16:00:00+00:00"),
        (["assignments", "create", "--vehicle", vehicle["id"], "--driver", driver["id"],
          "--from", "2091-04-01T08:00:00Z", "--to", "2091-04-01T07:00:00Z"],
         "fleet assignments: field 'end_time' (2091-04-01T07:00:00+00:00) must be after 'start_time'"
         " (2091-04-01T08:00:00+00:00)"),
        (["vehicles", "update", str(uuid.uuid4()), "--year", "2020"], "fleet vehicles: no vehicle with id"),
        (["drivers", "nearest", "--at", "52.5,190"], "fleet drivers: field '--at.lon' must be 180 or less, got 190"),
        (["vehicles", "available", "--from", "yesterday"], "fleet vehicles available: error: argument --from"),
    ]
    for argv, expected in cases:
        code, out, err = await fleet(monkeypatch, capsys, database_url, *argv)
        assert code == 2, argv
        assert err.startswith(expected), err
        assert err.count("\n") == 1 and out == ""

    code, out, _ = await fleet(monkeypatch, capsys, database_url, "assignments", "list", "--vehicle",
                               vehicle["id"], "--json")
    assert [a["id"] for a in orjson.loads(out)] == [first["id"]]
    audit = await asyncpg.connect(database_url)
    try:
        actors = await audit.fetch("SELECT actor, action FROM audit_logs WHERE entity_id = ANY($1::text[]) ORDER BY id",
                                   [vehicle["id"], driver["id"], first["id"]])
    finally:
        await audit.close()
    assert [(r["actor"], r["action"]) for r in actors] == [
        (admin, "vehicle.register"), (str(clerk_id), "driver.register"), (admin, "assignment.create")]
