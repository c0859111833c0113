"""``fleet vehicles|drivers|customers|assignments|jobs|maintenance|dashboard|commands``.

Every command opens the database (writes on the primary, read-only queries on a replica
when ``FLEET_DATABASE_REPLICA_URLS`` names one that answers), prints the result as text
or, with ``--json``, as one JSON document, and exits 0. Bad input (an unknown id, an end
before its start, coordinates out of range, a double booking, ...) ends with one line
on stderr and exit status 2; an unreachable service with exit status 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import date, datetime, timezone
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import orjson
import redis.asyncio as aioredis

from fleet_telemetry.fleetops import (
    assignments,
    commands,
    customers,
    dashboard,
    drivers,
    jobs,
    maintenance,
    queries,
    vehicles,
)
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.errors import InvalidInput
from fleet_telemetry.fleetops.values import parse_date, parse_month, parse_number, parse_point, parse_time
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings

Work = Callable[[Database, argparse.Namespace], Awaitable[Any]]


# --- argument types: one readable line on bad input ---------------------------------------


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def _time(text: str) -> datetime:
    if text == "now":
        return datetime.now(timezone.utc)
    try:
        return parse_time(text, "time")
    except InvalidInput:
        raise argparse.ArgumentTypeError(
            f"not an RFC 3339 time with offset (e.g. 2025-01-31T08:00:00Z) or 'now': {text!r}") from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


# --- output ------------------------------------------------------------------------------------


def _print(result: Any, as_json: bool, columns: Sequence[str] = ()) -> None:
    if as_json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    if isinstance(result, list):
        if not result:
            print("(none)")
        for row in result:
            shown = columns or list(row)
            print("  ".join(f"{c}={_text(row.get(c))}" for c in shown))
        return
    if isinstance(result, Mapping):
        for key, value in result.items():
            print(f"{key}: {_text(value)}")
        return
    print(result)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


def _given(args: argparse.Namespace, mapping: Mapping[str, str]) -> dict[str, Any]:
    """The fields whose option was given: ``{field: value}`` for ``{option_dest: field}``."""
    return {field: getattr(args, dest) for dest, field in mapping.items() if getattr(args, dest) is not None}


# --- the runner --------------------------------------------------------------------------------


def _handler(work: Work, columns: Sequence[str] = ()) -> Callable[[argparse.Namespace, Settings], Awaitable[int]]:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        try:
            async with Database.from_settings(settings, max_size=2) as database:
                result = await work(database, args)
        except (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError) as exc:
            # SQLSTATE classes 22 and 23: input that broke a rule the writers do not check first.
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"refused by PostgreSQL: {message}") from None
        _print(result, args.json, columns)
        return 0

    return run


def _parser(sub: Any, name: str, help: str, work: Work, columns: Sequence[str] = (),
            description: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description or help)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_handler(work, columns))
    return parser


def _writer(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--actor", default="fleet-cli", help="who is doing this, for the audit log")
    return parser


def _group(sub: Any, name: str, help: str) -> Any:
    parser = sub.add_parser(name, help=help, description=help)
    inner = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", parser_class=type(parser))
    inner.required = True
    return inner


# --- vehicles ----------------------------------------------------------------------------------

_VEHICLE_OPTIONS = {"vin": "vin", "plate": "license_plate", "make": "make", "model": "model",
                    "year": "year", "type": "type", "status": "status", "specs": "specs"}
_VEHICLE_COLUMNS = ("id", "license_plate", "vin", "type", "status", "make", "model")


def _vehicle_options(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    parser.add_argument("--vin", required=creating, help="vehicle identification number (up to 17 letters/digits)")
    parser.add_argument("--plate", required=creating, help="licence plate")
    parser.add_argument("--make")
    parser.add_argument("--model")
    parser.add_argument("--year", type=int)
    parser.add_argument("--type", help="vehicle type, e.g. truck, van (maintenance schedules follow it)")
    parser.add_argument("--status", help="active, maintenance, inactive or retired")
    parser.add_argument("--specs", type=_json_object, help='JSON object, e.g. \'{"fuel": "diesel"}\'')


def _register_vehicles(sub: Any) -> None:
    group = _group(sub, "vehicles", "register, change and find vehicles")

    async def add(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await vehicles.register_vehicle(conn, actor=a.actor, data=_given(a, _VEHICLE_OPTIONS),
                                                   vehicle_id=a.id)

    p = _writer(_parser(group, "add", "register a vehicle", add))
    _vehicle_options(p, creating=True)
    p.add_argument("--id", type=_uuid, help="the new vehicle's id (default: generated)")

    async def update(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await vehicles.update_vehicle(conn, actor=a.actor, vehicle_id=a.vehicle_id,
                                                 changes=_given(a, _VEHICLE_OPTIONS))

    p = _writer(_parser(group, "update", "change a vehicle's fields", update))
    p.add_argument("vehicle_id", type=_uuid)
    _vehicle_options(p, creating=False)

    async def delete(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await vehicles.delete_vehicle(conn, actor=a.actor, vehicle_id=a.vehicle_id)

    p = _writer(_parser(group, "delete", "soft-delete a vehicle (refused while it has open bookings)", delete))
    p.add_argument("vehicle_id", type=_uuid)

    async def show(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await vehicles.get_vehicle(conn, a.vehicle_id)

    p = _parser(group, "show", "one vehicle", show)
    p.add_argument("vehicle_id", type=_uuid)

    async def listing(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await vehicles.list_vehicles(conn, status=a.status, type=a.type, limit=a.limit)

    p = _parser(group, "list", "live vehicles, newest first", listing, _VEHICLE_COLUMNS)
    p.add_argument("--status")
    p.add_argument("--type")
    p.add_argument("--limit", type=_count, default=100)

    async def available(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await queries.available_vehicles(conn, a.start, a.end, vehicle_type=a.type, limit=a.limit)

    p = _parser(group, "available", "active vehicles with no booking overlapping [--from, --to)", available,
                ("id", "license_plate", "type", "make", "model"))
    _period_options(p)
    p.add_argument("--type", help="only vehicles of this type")


def _period_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="start", type=_time, required=True, help="start (RFC 3339 or 'now')")
    parser.add_argument("--to", dest="end", type=_time, help="end, exclusive (default: open-ended)")
    parser.add_argument("--limit", type=_count, default=100)


# --- drivers -----------------------------------------------------------------------------------

_DRIVER_OPTIONS = {"name": "name", "license": "license_number", "status": "status", "user_id": "user_id"}


def _driver_options(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    parser.add_argument("--name", required=creating)
    parser.add_argument("--license", help="driving licence number")
    parser.add_argument("--status", help="active, inactive or suspended")
    parser.add_argument("--user-id", type=_uuid, help="the driver's login (users.id)")


def _register_drivers(sub: Any) -> None:
    group = _group(sub, "drivers", "register, change and find drivers")

    async def add(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await drivers.register_driver(conn, actor=a.actor, data=_given(a, _DRIVER_OPTIONS),
                                                 driver_id=a.id)

    p = _writer(_parser(group, "add", "register a driver", add))
    _driver_options(p, creating=True)
    p.add_argument("--id", type=_uuid, help="the new driver's id (default: generated)")

    async def update(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await drivers.update_driver(conn, actor=a.actor, driver_id=a.driver_id,
                                               changes=_given(a, _DRIVER_OPTIONS))

    p = _writer(_parser(group, "update", "change a driver's fields", update))
    p.add_argument("driver_id", type=_uuid)
    _driver_options(p, creating=False)

    async def delete(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await drivers.delete_driver(conn, actor=a.actor, driver_id=a.driver_id)

    p = _writer(_parser(group, "delete", "soft-delete a driver (refused while they have open bookings)", delete))
    p.add_argument("driver_id", type=_uuid)

    async def show(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await drivers.get_driver(conn, a.driver_id)

    p = _parser(group, "show", "one driver", show)
    p.add_argument("driver_id", type=_uuid)

    async def listing(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await drivers.list_drivers(conn, status=a.status, limit=a.limit)

    p = _parser(group, "list", "live drivers, newest first", listing, ("id", "name", "license_number", "status"))
    p.add_argument("--status")
    p.add_argument("--limit", type=_count, default=100)

    async def available(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await queries.available_drivers(conn, a.start, a.end, limit=a.limit)

    p = _parser(group, "available", "active drivers with no booking overlapping [--from, --to)", available,
                ("id", "name", "license_number"))
    _period_options(p)

    async def nearest(db: Database, a: argparse.Namespace) -> Any:
        pickup = parse_point(a.at, "--at")
        radius_km = parse_number(a.radius_km, "--radius-km", strictly_above=0, maximum=20_000)
        async with db.read() as conn:
            return await queries.nearest_available_drivers(conn, pickup, radius_km * 1000, limit=a.limit,
                                                           max_age_seconds=a.max_age)

    p = _parser(group, "nearest", "free drivers on duty nearest to a pickup point", nearest,
                ("driver_id", "name", "license_plate", "distance_m", "position_time", "assignment_id"),
                description="Drivers on duty (an ACTIVE assignment covering now) with no open job, whose"
                " vehicle's last position is within --radius-km of --at, nearest first.")
    p.add_argument("--at", required=True, help="pickup point as LAT,LON, e.g. 52.52,13.40")
    p.add_argument("--radius-km", type=float, default=50.0)
    p.add_argument("--limit", type=_count, default=5)
    p.add_argument("--max-age", type=_seconds, default=900.0, metavar="SECONDS",
                   help="ignore positions older than this (default 900)")


# --- customers ---------------------------------------------------------------------------------

_CUSTOMER_OPTIONS = {"name": "name", "contact": "contact_info", "billing_address": "billing_address"}


def _register_customers(sub: Any) -> None:
    group = _group(sub, "customers", "register and change customers")

    def options(parser: argparse.ArgumentParser, creating: bool) -> None:
        parser.add_argument("--name", required=creating)
        parser.add_argument("--contact", type=_json_object, help='JSON object, e.g. \'{"email": "a@b.c"}\'')
        parser.add_argument("--billing-address")

    async def add(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await customers.register_customer(conn, actor=a.actor, data=_given(a, _CUSTOMER_OPTIONS),
                                                     customer_id=a.id)

    p = _writer(_parser(group, "add", "register a customer", add))
    options(p, True)
    p.add_argument("--id", type=_uuid)

    async def update(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await customers.update_customer(conn, actor=a.actor, customer_id=a.customer_id,
                                                   changes=_given(a, _CUSTOMER_OPTIONS))

    p = _writer(_parser(group, "update", "change a customer's fields", update))
    p.add_argument("customer_id", type=_uuid)
    options(p, False)

    async def delete(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await customers.delete_customer(conn, actor=a.actor, customer_id=a.customer_id)

    p = _writer(_parser(group, "delete", "soft-delete a customer (refused while they have open jobs)", delete))
    p.add_argument("customer_id", type=_uuid)

    async def show(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await customers.get_customer(conn, a.customer_id)

    p = _parser(group, "show", "one customer", show)
    p.add_argument("customer_id", type=_uuid)

    async def listing(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await customers.list_customers(conn, limit=a.limit)

    p = _parser(group, "list", "live customers by name", listing, ("id", "name", "billing_address"))
    p.add_argument("--limit", type=_count, default=100)


# --- assignments -------------------------------------------------------------------------------

_ASSIGNMENT_COLUMNS = ("id", "vehicle_id", "driver_id", "start_time", "end_time", "status")


def _register_assignments(sub: Any) -> None:
    group = _group(sub, "assignments", "book drivers on vehicles; end or cancel bookings")

    async def create(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await assignments.create_assignment(
                conn, actor=a.actor, vehicle_id=a.vehicle, driver_id=a.driver, start_time=a.start,
                end_time=a.end, assignment_id=a.id)

    p = _writer(_parser(group, "create", "book a driver on a vehicle over [--from, --to)", create))
    p.add_argument("--vehicle", type=_uuid, required=True)
    p.add_argument("--driver", type=_uuid, required=True)
    p.add_argument("--from", dest="start", type=_time, required=True)
    p.add_argument("--to", dest="end", type=_time, help="exclusive end (default: open-ended)")
    p.add_argument("--id", type=_uuid)

    async def end(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await assignments.end_assignment(conn, actor=a.actor, assignment_id=a.assignment_id,
                                                    at=a.at)

    p = _writer(_parser(group, "end", "end an ACTIVE assignment (now, or at --at in the past)", end))
    p.add_argument("assignment_id", type=_uuid)
    p.add_argument("--at", type=_time)

    async def cancel(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await assignments.cancel_assignment(conn, actor=a.actor, assignment_id=a.assignment_id)

    p = _writer(_parser(group, "cancel", "cancel an ACTIVE assignment", cancel))
    p.add_argument("assignment_id", type=_uuid)

    async def show(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await assignments.get_assignment(conn, a.assignment_id)

    p = _parser(group, "show", "one assignment", show)
    p.add_argument("assignment_id", type=_uuid)

    async def listing(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await assignments.list_assignments(conn, vehicle_id=a.vehicle, driver_id=a.driver,
                                                      status=a.status, limit=a.limit)

    p = _parser(group, "list", "assignments, newest first", listing, _ASSIGNMENT_COLUMNS)
    p.add_argument("--vehicle", type=_uuid)
    p.add_argument("--driver", type=_uuid)
    p.add_argument("--status", choices=("ACTIVE", "COMPLETED", "CANCELLED"))
    p.add_argument("--limit", type=_count, default=100)


# --- jobs ----------------------------------------------------------------------------------------

_JOB_OPTIONS = {"customer": "customer_id", "price": "agreed_price", "currency": "currency",
                "pickup_at": "pickup_at", "deliver_by": "deliver_by"}
_JOB_COLUMNS = ("id", "customer_id", "status", "agreed_price", "currency", "assignment_id", "created_at")


def _register_jobs(sub: Any) -> None:
    group = _group(sub, "jobs", "transport jobs with their route and cargo")

    async def create(db: Database, a: argparse.Namespace) -> Any:
        data = _given(a, _JOB_OPTIONS)
        if a.origin is not None or a.destination is not None:
            if a.origin is None or a.destination is None:
                raise UsageError("a route needs both --origin and --destination")
            data["route"] = {"origin": a.origin, "destination": a.destination, "waypoints": a.via or [],
                             "distance_km": a.distance_km}
        if a.shipment:
            data["shipments"] = a.shipment
        async with db.write() as conn:
            return await jobs.create_job(conn, actor=a.actor, data=data, job_id=a.id)

    p = _writer(_parser(group, "create", "create a pending job", create))
    p.add_argument("--customer", type=_uuid, required=True)
    p.add_argument("--price", help="agreed price, e.g. 1250.00")
    p.add_argument("--currency", help="three-letter code (default EUR)")
    p.add_argument("--pickup-at", type=_time)
    p.add_argument("--deliver-by", type=_time)
    p.add_argument("--origin", help="LAT,LON")
    p.add_argument("--destination", help="LAT,LON")
    p.add_argument("--via", action="append", metavar="LAT,LON", help="a stop on the way (repeatable)")
    p.add_argument("--distance-km", type=float, help="planned distance (default: length of the path)")
    p.add_argument("--shipment", type=_json_object, action="append",
                   help='cargo as JSON, e.g. \'{"type": "pallet", "weight_kg": 400}\' (repeatable)')
    p.add_argument("--id", type=_uuid)

    async def update(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await jobs.update_job(conn, actor=a.actor, job_id=a.job_id,
                                         changes=_given(a, {k: v for k, v in _JOB_OPTIONS.items()
                                                            if k != "customer"}))

    p = _writer(_parser(group, "update", "change price, currency or window of an open job", update))
    p.add_argument("job_id", type=_uuid)
    p.add_argument("--price")
    p.add_argument("--currency")
    p.add_argument("--pickup-at", type=_time)
    p.add_argument("--deliver-by", type=_time)

    async def assign(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await jobs.assign_job(conn, actor=a.actor, job_id=a.job_id, assignment_id=a.assignment)

    p = _writer(_parser(group, "assign", "dispatch a job to an ACTIVE assignment (vehicle and driver)", assign))
    p.add_argument("job_id", type=_uuid)
    p.add_argument("--assignment", type=_uuid, required=True)

    async def status(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await jobs.set_job_status(conn, actor=a.actor, job_id=a.job_id, status=a.status, at=a.at)

    p = _writer(_parser(group, "status", "move a job to in_transit, delivered, cancelled or pending", status))
    p.add_argument("job_id", type=_uuid)
    p.add_argument("status")
    p.add_argument("--at", type=_time, help="delivery time (default now)")

    async def add_shipment(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await jobs.add_shipment(conn, actor=a.actor, job_id=a.job_id, data=a.shipment)

    p = _writer(_parser(group, "add-shipment", "add cargo to an open job", add_shipment))
    p.add_argument("job_id", type=_uuid)
    p.add_argument("shipment", type=_json_object, help='JSON, e.g. \'{"type": "pallet", "weight_kg": 400}\'')

    async def delete(db: Database, a: argparse.Namespace) -> Any:
        async with db.write() as conn:
            return await jobs.delete_job(conn, actor=a.actor, job_id=a.job_id)

    p = _writer(_parser(group, "delete", "soft-delete a pending or cancelled job", delete))
    p.add_argument("job_id", type=_uuid)

    async def show(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await jobs.job_view(conn, a.job_id)

    p = _parser(group, "show", "one job with route and cargo", show)
    p.add_argument("job_id", type=_uuid)

    async def listing(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return await jobs.list_jobs(conn, customer_id=a.customer, status=a.status, limit=a.limit)

    p = _parser(group, "list", "live jobs, newest first", listing, _JOB_COLUMNS)
    p.add_argument("--customer", type=_uuid)
    p.add_argument("--status")
    p.add_argument("--limit", type=_count, default=100)


# --- maintenance -------------------------------------------------------------------------------


def _register_maintenance(sub: Any) -> None:
    group = _group(sub, "maintenance", "service records, schedules, due dates, profitability")

    async def record(db: Database, a: argparse.Namespace) -> Any:
        data = _given(a, {"vehicle": "vehicle_id", "type": "type", "cost": "cost", "date": "date",
                          "odometer_km": "odometer_km", "provider": "provider", "notes": "notes"})
        data.setdefault("date", _today())
        async with db.write() as conn:
            return await maintenance.record_service(conn, actor=a.actor, data=data, record_id=a.id)

    p = _writer(_parser(group, "record", "record a service; the matching triggers move forward", record))
    p.add_argument("--vehicle", type=_uuid, required=True)
    p.add_argument("--type", required=True, help="service type; resets the schedule of the same name")
    p.add_argument("--cost", default="0")
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default today, UTC)")
    p.add_argument("--odometer-km", type=float)
    p.add_argument("--provider")
    p.add_argument("--notes")
    p.add_argument("--id", type=_uuid)

    async def schedule_add(db: Database, a: argparse.Namespace) -> Any:
        data = _given(a, {"name": "name", "vehicle_type": "vehicle_type", "interval_km": "interval_km",
                          "interval_months": "interval_months"})
        async with db.write() as conn:
            return await maintenance.create_schedule(conn, actor=a.actor, data=data, schedule_id=a.id)

    p = _writer(_parser(group, "schedule-add", "add a recurring rule for a vehicle type", schedule_add))
    p.add_argument("--name", required=True, help="matches the service type that satisfies it")
    p.add_argument("--vehicle-type", required=True)
    p.add_argument("--interval-km", type=float)
    p.add_argument("--interval-months", type=int)
    p.add_argument("--id", type=_uuid)

    async def schedule_update(db: Database, a: argparse.Namespace) -> Any:
        data = _given(a, {"interval_km": "interval_km", "interval_months": "interval_months"})
        async with db.write() as conn:
            return await maintenance.update_schedule(conn, actor=a.actor, schedule_id=a.schedule_id,
                                                     changes=data)

    p = _writer(_parser(group, "schedule-update", "change a rule's intervals; due dates follow",
                        schedule_update))
    p.add_argument("schedule_id", type=_uuid)
    p.add_argument("--interval-km", type=float)
    p.add_argument("--interval-months", type=int)

    async def due(db: Database, a: argparse.Namespace) -> Any:
        before = a.before or datetime.now(timezone.utc).date()
        async with db.read() as conn:
            return await maintenance.due_triggers(conn, before=before, limit=a.limit)

    p = _parser(group, "due", "triggers due before --before (default: overdue today)", due,
                ("vehicle_id", "license_plate", "schedule", "next_due_date", "next_due_km", "last_service_date"))
    p.add_argument("--before", type=lambda t: _arg(parse_date, t), help="YYYY-MM-DD")
    p.add_argument("--limit", type=_count, default=100)

    async def history(db: Database, a: argparse.Namespace) -> Any:
        async with db.read() as conn:
            return {"records": await maintenance.list_records(conn, a.vehicle_id, limit=a.limit),
                    "triggers": await maintenance.vehicle_triggers(conn, a.vehicle_id)}

    p = _parser(group, "history", "a vehicle's services and triggers", history)
    p.add_argument("vehicle_id", type=_uuid)
    p.add_argument("--limit", type=_count, default=100)

    async def profitability(db: Database, a: argparse.Namespace) -> Any:
        last = a.to or a.start
        if last < a.start:
            raise InvalidInput(f"--to ({last:%Y-%m}) is before --from ({a.start:%Y-%m})")
        if a.refresh:
            async with db.write() as conn:
                await queries.refresh_reports(conn)
        async with db.read() as conn:
            return await queries.monthly_profitability(conn, a.start, last, currency=a.currency.upper(),
                                                       vehicle_id=a.vehicle)

    p = _parser(group, "profitability", "revenue minus maintenance cost per vehicle and month", profitability,
                ("month", "vehicle_id", "license_plate", "revenue", "maintenance_cost", "profit", "jobs"))
    p.add_argument("--from", dest="start", type=lambda t: _arg(parse_month, t), required=True, help="YYYY-MM")
    p.add_argument("--to", type=lambda t: _arg(parse_month, t), help="YYYY-MM (default: --from)")
    p.add_argument("--currency", default="EUR", help="jobs priced in other currencies are counted apart")
    p.add_argument("--vehicle", type=_uuid)
    p.add_argument("--refresh", action="store_true", help="refresh the materialized views first (primary)")


def _arg(parse: Callable[[Any, str], Any], text: str) -> Any:
    try:
        return parse(text, "value")
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("field 'value' ", "")) from None


# --- dashboard and commands ---------------------------------------------------------------------


def _register_dashboard(sub: Any) -> None:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            async with Database.from_settings(settings, max_size=2) as database:
                cache = dashboard.DashboardCache(redis, dashboard.database_compute(database),
                                                 settings.dashboard_cache_seconds)
                if args.refresh:
                    stats, cached = await cache.refresh(), False
                else:
                    stats, cached = await cache.get()
        finally:
            await redis.aclose()
        if args.json:
            _print(stats, True)
        else:
            _print(stats, False)
            print(f"(from the cache {dashboard.DASHBOARD_KEY})" if cached else "(computed now)")
        return 0

    parser = sub.add_parser("dashboard", help="dashboard aggregates, cached in Redis",
                            description="Revenue, active vehicles, maintenance costs and open jobs, served from"
                            f" Redis key {dashboard.DASHBOARD_KEY} for FLEET_DASHBOARD_CACHE_SECONDS.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--refresh", action="store_true", help="recompute now and replace the cached value")
    parser.set_defaults(handler=run)


def _register_commands(sub: Any) -> None:
    group = _group(sub, "commands", "the command topic of the small writers (docs/commands.md)")
    p = group.add_parser("consume", help="apply commands from FLEET_COMMANDS_TOPIC",
                         description="Apply command events with the small writers, once per command_id;"
                         " rejected commands go to FLEET_COMMANDS_DLQ_TOPIC. SIGTERM or Ctrl-C stops cleanly.")
    p.add_argument("--stop-when-idle", type=float, metavar="SECONDS",
                   help="exit 0 once no command arrived for SECONDS")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics on this port (default off)")
    p.set_defaults(handler=commands.run_consumer)

    async def send(args: argparse.Namespace, settings: Settings) -> int:
        from fleet_telemetry.ingest.producer import start_producer

        command_id = args.id or uuid4()
        value = commands.command_value(args.type, args.data, command_id=command_id, actor=args.actor)
        producer = await start_producer(settings)
        try:
            await producer.send_and_wait(settings.commands_topic, value,
                                         key=args.key.encode() if args.key else None)
        finally:
            await producer.stop()
        _print({"command_id": str(command_id), "topic": settings.commands_topic}, args.json)
        return 0

    p = group.add_parser("send", help="publish one command", description="Publish one command to"
                         " FLEET_COMMANDS_TOPIC (the consumer applies it).")
    p.add_argument("type", choices=sorted(commands.HANDLERS))
    p.add_argument("--data", type=_json_object, required=True, help="the command's data as a JSON object")
    p.add_argument("--id", type=_uuid, help="command id (default: generated)")
    p.add_argument("--key", help="record key (default none; use the entity id to keep its commands ordered)")
    p.add_argument("--actor", default="fleet-cli")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=send)


def register(sub: Any) -> None:
    """Adds ``fleet vehicles|drivers|customers|assignments|jobs|maintenance|dashboard|commands``."""
    _register_vehicles(sub)
    _register_drivers(sub)
    _register_customers(sub)
    _register_assignments(sub)
    _register_jobs(sub)
    _register_maintenance(sub)
    _register_dashboard(sub)
    _register_commands(sub)


def _today() -> date:
    return datetime.now(timezone.utc).date()
