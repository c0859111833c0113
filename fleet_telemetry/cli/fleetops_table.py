"""The table behind ``fleet vehicles|drivers|customers|assignments|jobs|maintenance|alerts``.

Every action of these groups is one :class:`Action` row: its options (flag, type, help)
and the writer or query it calls. An option's value goes either into the mapping the
writer checks (``data`` to create, ``changes`` to update; given options only) or, as a
keyword argument, straight to the function. Vehicles, drivers and customers share one
shape, add/update/delete/show/list, written once in :func:`entity_actions` from their
:class:`Entity` row. :mod:`fleet_telemetry.cli.fleetops` turns the table into parsers.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from fleet_telemetry.cli.parsing import count_arg, seconds_arg
from fleet_telemetry.consumers.rules.model import ALERT_TYPES
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.redis_client import connect_redis
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops import assignments, customers, drivers, jobs, maintenance, queries, vehicles
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.errors import InvalidInput
from fleet_telemetry.fleetops.validation import DRIVER_STATUSES, JOB_STATUSES, VEHICLE_STATUSES
from fleet_telemetry.fleetops.values import parse_date, parse_month, parse_number, parse_point, parse_time
from fleet_telemetry.views import alerts, driver_scores
from fleet_telemetry.views import trips as trip_views
from fleet_telemetry.views.vehicle_status import vehicle_status

# --- argument types: one readable line on bad input ---------------------------------------------


def uuid_arg(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r}") from None


def time_arg(text: str) -> datetime:
    if text == "now":
        return datetime.now(timezone.utc)
    try:
        return parse_time(text, "time")
    except InvalidInput:
        raise argparse.ArgumentTypeError(
            f"not an RFC 3339 time with offset (e.g. 2025-01-31T08:00:00Z) or 'now': {text!r}") from None


_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def since_arg(text: str) -> datetime:
    """``--since``: an RFC 3339 time with offset, or how long ago (``30s``, ``15m``, ``2h``, ``7d``)."""
    ago = _AGO.fullmatch(text.strip())
    if ago is not None:
        return datetime.now(timezone.utc) - timedelta(seconds=float(ago[1]) * _UNIT_SECONDS[ago[2]])
    try:
        return parse_time(text, "time")
    except InvalidInput:
        raise argparse.ArgumentTypeError(
            f"not an RFC 3339 time with offset (2025-01-31T08:00:00Z) or a time ago (30m, 2h, 7d): {text!r}") from None


def json_object_arg(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def date_arg(text: str) -> date:
    return _checked(parse_date, text)


def month_arg(text: str) -> date:
    try:
        return parse_month(text, "value")
    except InvalidInput:
        raise argparse.ArgumentTypeError(f"not a month (YYYY-MM, e.g. 2026-01): {text!r}") from None


def _checked(parse: Callable[[Any, str], date], text: str) -> date:
    try:
        return parse(text, "value")
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("field 'value' ", "")) from None


def _or_today(value: date | str | None) -> date | str:
    return value if value is not None else datetime.now(timezone.utc).date()


# --- the shape of a row -------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One argument of an action: ``name`` is a flag (``--vin``) or, without dashes, a
    positional argument; the argparse settings follow. Its value (after ``convert``,
    which runs when the command runs and may raise InvalidInput) goes into the gathered
    mapping under ``field`` when given and not None, else to the keyword ``to`` (default:
    the argparse destination)."""

    name: str
    field: str | None = None
    to: str | None = None
    convert: Callable[[Any], Any] | None = None
    dest: str | None = None
    type: Callable[[str], Any] | None = None
    required: bool = False
    default: Any = None
    action: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    help: str | None = None
    vehicle: bool = False

    @property
    def destination(self) -> str:
        return self.dest or self.name.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        settings: dict[str, Any] = {key: value for key, value in (
            ("dest", self.dest), ("type", self.type), ("default", self.default), ("action", self.action),
            ("choices", self.choices), ("metavar", self.metavar), ("help", self.help),
        ) if value is not None}
        if self.required:
            settings["required"] = True
        parser.add_argument(self.name, **settings)


@dataclass(frozen=True)
class Action:
    """One command, e.g. ``fleet vehicles add``: ``call`` gets a connection (the primary's
    when ``writes``, else a read-only one, a replica's when one answers) or, with
    ``takes_database``, the :class:`Database`; then the keyword arguments of
    :meth:`arguments`: writers get ``actor`` (option ``--actor``, else ``FLEET_ACTOR``), and the field options
    are passed as one mapping under the keyword ``gather``. ``columns`` are the columns a
    list prints as text; ``description`` is the longer help, if any. With
    ``with_settings`` ``call`` gets the :class:`Database` and the keyword ``settings``;
    ``render`` turns the result into the text shown without ``--json``."""

    name: str
    help: str
    call: Callable[..., Awaitable[Any]]
    options: tuple[Option, ...] = ()
    writes: bool = False
    gather: str | None = None
    columns: tuple[str, ...] = ()
    description: str | None = None
    takes_database: bool = False
    with_settings: bool = False
    render: Callable[[Any], str] | None = None

    def arguments(self, args: argparse.Namespace) -> dict[str, Any]:
        """The keyword arguments of ``call``; raises what an option's ``convert`` raises."""
        kwargs: dict[str, Any] = {"actor": args.actor} if self.writes else {}
        fields: dict[str, Any] = {}
        for option in self.options:
            value = getattr(args, option.destination)
            if option.convert is not None:
                value = option.convert(value)
            if option.field is None:
                kwargs[option.to or option.destination] = value
            elif value is not None:
                fields[option.field] = value
        if self.gather is not None:
            kwargs[self.gather] = fields
        return kwargs


@dataclass(frozen=True)
class Group:
    """``fleet <name> ACTION``."""

    name: str
    help: str
    actions: tuple[Action, ...]


@dataclass(frozen=True)
class Entity:
    """A soft-deletable kind with the add/update/delete/show/list shape. ``fields`` are its
    writable options (``required``: required to register); the writers take ``<name>_id``."""

    name: str
    fields: tuple[Option, ...]
    list_columns: tuple[str, ...]
    list_help: str
    delete_help: str
    register: Callable[..., Awaitable[Any]]
    update: Callable[..., Awaitable[Any]]
    delete: Callable[..., Awaitable[Any]]
    get: Callable[..., Awaitable[Any]]
    listing: Callable[..., Awaitable[Any]]
    list_options: tuple[Option, ...] = ()


LIMIT = Option("--limit", type=count_arg, default=100, help="at most this many rows (default 100)")


VEHICLE_HELP = "the vehicle's id, VIN or licence plate"


def row_id(name: str) -> Option:
    """The positional id of the row an action works on, e.g. ``vehicle_id`` (a vehicle
    also by its VIN or plate)."""
    if name == "vehicle":
        return Option("vehicle_id", vehicle=True, metavar="VEHICLE", help=VEHICLE_HELP)
    return Option(f"{name}_id", type=uuid_arg, help=f"the {name}'s id (a UUID)")


def vehicle_option(*, field: str | None = None, required: bool = False) -> Option:
    """``--vehicle VEHICLE``: id, VIN or plate, passed on as ``vehicle_id``."""
    return Option("--vehicle", field=field, to=None if field else "vehicle_id", vehicle=True, required=required,
                  metavar="VEHICLE", help=VEHICLE_HELP)


def new_id(noun: str, keyword: str) -> Option:
    return Option("--id", type=uuid_arg, to=keyword, help=f"the new {noun}'s id (default: generated)")


def entity_actions(entity: Entity) -> tuple[Action, ...]:
    """add, update, delete, show and list of one :class:`Entity`."""
    name = entity.name
    optional = tuple(replace(field, required=False) for field in entity.fields)
    return (
        Action("add", f"register a {name}", entity.register, (*entity.fields, new_id(name, f"{name}_id")),
               writes=True, gather="data"),
        Action("update", f"change a {name}'s fields", entity.update, (row_id(name), *optional), writes=True,
               gather="changes"),
        Action("delete", entity.delete_help, entity.delete, (row_id(name),), writes=True),
        Action("show", f"one {name}", entity.get, (row_id(name),)),
        Action("list", entity.list_help, entity.listing, (*entity.list_options, LIMIT),
               columns=entity.list_columns),
    )


# --- vehicles, drivers, customers ---------------------------------------------------------------

PERIOD = (
    Option("--from", dest="start", type=time_arg, required=True, help="start (RFC 3339 or 'now')"),
    Option("--to", dest="end", type=time_arg, help="end, exclusive (default: open-ended)"),
    LIMIT,
)

VEHICLES = Entity(
    name="vehicle",
    fields=(
        Option("--vin", field="vin", required=True,
               help="vehicle identification number (up to 17 letters/digits)"),
        Option("--plate", field="license_plate", required=True, help="licence plate"),
        Option("--make", field="make", help="manufacturer, e.g. Volvo"),
        Option("--model", field="model", help="model, e.g. FH16"),
        Option("--year", field="year", type=int, help="model year"),
        Option("--type", field="type", help="vehicle type, e.g. truck, van (maintenance schedules follow it)"),
        Option("--status", field="status", type=str.lower, choices=VEHICLE_STATUSES,
               help="active, maintenance, inactive or retired"),
        Option("--specs", field="specs", type=json_object_arg, help='JSON object, e.g. \'{"fuel": "diesel"}\''),
    ),
    list_options=(Option("--status", type=str.lower, choices=VEHICLE_STATUSES, help="only vehicles in this status"),
                  Option("--type", help="only vehicles of this type")),
    list_columns=("id", "license_plate", "vin", "type", "status", "make", "model"),
    list_help="live vehicles, newest first",
    delete_help="soft-delete a vehicle (refused while it has open bookings)",
    register=vehicles.register_vehicle, update=vehicles.update_vehicle, delete=vehicles.delete_vehicle,
    get=trip_views.show_vehicle, listing=vehicles.list_vehicles,
)

async def vehicle_status_view(db: Database, *, settings: Settings, vehicle_id: UUID) -> dict[str, Any]:
    """``fleet vehicles status``: Redis for the live status, a read connection for the rest."""
    redis = connect_redis(settings.redis_url)
    try:
        async with db.read() as conn:
            return await vehicle_status(conn, redis, settings.redis_keys, vehicle_id)
    finally:
        await redis.aclose()


def _or_dash(value: Any, suffix: str = "") -> str:
    return "-" if value is None else f"{value:g}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


def render_vehicle_status(status: dict[str, Any]) -> str:
    """The text of ``fleet vehicles status``: one line per part."""
    v, live, position, duty = status["vehicle"], status["live"], status["position"], status["on_duty"]
    lines = [f"vehicle {v['id']}  plate {v.get('license_plate', '-')}  VIN {v.get('vin', '-')}  "
             f"{' '.join(str(v[k]) for k in ('make', 'model', 'type') if v.get(k))}  status {v.get('status', '-')}"
             + ("  (deleted)" if v.get("deleted_at") else "")]
    if live:
        lines.append(f"live (Redis):     {live.get('lat')},{live.get('lon')}  speed {_or_dash(live.get('speed'), ' km/h')}"
                     f"  fuel {_or_dash(live.get('fuel_level'), '%')}  heading {_or_dash(live.get('heading'))}"
                     f"  at {live.get('time')}  driver {live.get('driver_id', '-')}")
    else:
        lines.append(f"live (Redis):     {status['live_note']}")
    lines.append("position (stored): " + (
        f"{position['lat']},{position['lon']}  speed {_or_dash(position['speed'], ' km/h')}  at {position['time']}"
        if position else "none yet"))
    lines.append("on duty:          " + (
        f"driver {duty['driver']} ({duty['driver_id']}), assignment {duty['assignment_id']}"
        f" from {duty['start_time']} to {duty['end_time'] or 'open end'}" if duty else "no active assignment"))
    lines.append(f"last reading:     {status['last_reading_time'] or 'none'}")
    lines.append(f"odometer:         {_or_dash(status['odometer_km'], ' km')}")
    lines.append(f"open alerts:      {len(status['open_alerts']) or 'none'}")
    lines += [f"  {a['id']}  {a['type']}  {a['severity']}  raised {a['raised_at']}"
              + (f"  geofence {a['geofence']}" if a["geofence"] else "") for a in status["open_alerts"]]
    return "\n".join(lines)


VEHICLE_STATUS = Action(
    "status", "live status, last position, driver on duty, open alerts, last reading, odometer",
    vehicle_status_view, (row_id("vehicle"),), with_settings=True, render=render_vehicle_status,
    description="One vehicle (by id, VIN or plate): its live status from Redis, its last stored position,"
    " the assignment and driver on duty, its open alerts, its last reading time and odometer.",
)

VEHICLES_AVAILABLE = Action(
    "available", "active vehicles with no booking overlapping [--from, --to)", queries.available_vehicles,
    (*PERIOD, Option("--type", to="vehicle_type", help="only vehicles of this type")),
    columns=("id", "license_plate", "type", "make", "model"),
)

DRIVERS = Entity(
    name="driver",
    fields=(
        Option("--name", field="name", required=True, help="the driver's name"),
        Option("--license", field="license_number", help="driving licence number"),
        Option("--status", field="status", type=str.lower, choices=DRIVER_STATUSES,
               help="active, inactive or suspended"),
        Option("--user-id", field="user_id", type=uuid_arg, help="the driver's login (users.id)"),
    ),
    list_options=(Option("--status", type=str.lower, choices=DRIVER_STATUSES, help="only drivers in this status"),),
    list_columns=("id", "name", "license_number", "status"),
    list_help="live drivers, newest first",
    delete_help="soft-delete a driver (refused while they have open bookings)",
    register=drivers.register_driver, update=drivers.update_driver, delete=drivers.delete_driver,
    get=drivers.get_driver, listing=drivers.list_drivers,
)

DRIVERS_AVAILABLE = Action(
    "available", "active drivers with no booking overlapping [--from, --to)", queries.available_drivers,
    PERIOD, columns=("id", "name", "license_number"),
)

DRIVERS_NEAREST = Action(
    "nearest", "free drivers on duty nearest to a pickup point", queries.nearest_available_drivers,
    (
        Option("--at", to="pickup", convert=lambda text: parse_point(text, "--at"), required=True,
               help="pickup point as LAT,LON, e.g. 52.52,13.40"),
        Option("--radius-km", to="radius_m", type=float, default=50.0,
               convert=lambda km: parse_number(km, "--radius-km", strictly_above=0, maximum=20_000) * 1000,
               help="search radius around --at in km (default 50)"),
        Option("--limit", type=count_arg, default=5, help="at most this many drivers (default 5)"),
        Option("--max-age", to="max_age_seconds", type=seconds_arg, default=900.0, metavar="SECONDS",
               help="ignore positions older than this (default 900)"),
    ),
    columns=("driver_id", "name", "license_plate", "distance_m", "position_time", "assignment_id"),
    description="Drivers on duty (an ACTIVE assignment covering now) with no open job, whose vehicle's"
    " last position is within --radius-km of --at, nearest first.",
)

DRIVERS_SCORES = Action(
    "scores", "driving scores over a period of UTC days (fleet maintain computes them)", driver_scores.driver_scores,
    (
        Option("--from", dest="start", type=date_arg, required=True, metavar="DATE",
               help="first day, YYYY-MM-DD (UTC)"),
        Option("--to", dest="end", type=date_arg, required=True, metavar="DATE",
               help="last day, YYYY-MM-DD (UTC), included"),
        Option("--driver", to="driver_id", type=uuid_arg, metavar="ID", help="only this driver (their id)"),
    ),
    render=driver_scores.render_scores,
    description="Per driver: the days scored, the distance driven on their assignments, harsh braking, harsh"
    " acceleration and overspeed episodes, penalty points, and the period's score = max(0, 100 - penalty points"
    " per 100 km of the period's distance), from driver_daily_scores.",
)

CUSTOMERS = Entity(
    name="customer",
    fields=(
        Option("--name", field="name", required=True, help="the customer's name"),
        Option("--contact", field="contact_info", type=json_object_arg,
               help='JSON object, e.g. \'{"email": "a@b.c"}\''),
        Option("--billing-address", field="billing_address", help="postal address for invoices"),
    ),
    list_columns=("id", "name", "billing_address"),
    list_help="live customers by name",
    delete_help="soft-delete a customer (refused while they have open jobs)",
    register=customers.register_customer, update=customers.update_customer, delete=customers.delete_customer,
    get=customers.get_customer, listing=customers.list_customers,
)

# --- assignments --------------------------------------------------------------------------------

ASSIGNMENTS = (
    Action("create", "book a driver on a vehicle over [--from, --to)", assignments.create_assignment, (
        vehicle_option(required=True),
        Option("--driver", to="driver_id", type=uuid_arg, required=True, help="the driver's id"),
        Option("--from", dest="start", to="start_time", type=time_arg, required=True,
               help="start (RFC 3339 or 'now')"),
        Option("--to", dest="end", to="end_time", type=time_arg, help="exclusive end (default: open-ended)"),
        new_id("assignment", "assignment_id"),
    ), writes=True),
    Action("end", "end an ACTIVE assignment (now, or at --at in the past)", assignments.end_assignment,
           (row_id("assignment"), Option("--at", type=time_arg, help="end time in the past (default now)")),
           writes=True),
    Action("cancel", "cancel an ACTIVE assignment", assignments.cancel_assignment, (row_id("assignment"),),
           writes=True),
    Action("show", "one assignment", assignments.get_assignment, (row_id("assignment"),)),
    Action("list", "assignments, newest first", assignments.list_assignments, (
        vehicle_option(),
        Option("--driver", to="driver_id", type=uuid_arg, help="only this driver's"),
        Option("--status", type=str.upper, choices=("ACTIVE", "COMPLETED", "CANCELLED"),
               help="only assignments in this status"),
        LIMIT,
    ), columns=("id", "vehicle_id", "driver_id", "start_time", "end_time", "status")),
)

# --- jobs ---------------------------------------------------------------------------------------


async def create_job(db: Database, *, actor: str, data: dict[str, Any], origin: str | None,
                     destination: str | None, via: list[str] | None, distance_km: float | None,
                     shipment: list[dict[str, Any]] | None, job_id: UUID | None) -> dict[str, Any]:
    """``fleet jobs create``: the route and cargo options joined into the job's data."""
    if origin is not None or destination is not None:
        if origin is None or destination is None:
            raise UsageError("a route needs both --origin and --destination")
        data["route"] = {"origin": origin, "destination": destination, "waypoints": via or [],
                         "distance_km": distance_km}
    if shipment:
        data["shipments"] = shipment
    async with db.write() as conn:
        return await jobs.create_job(conn, actor=actor, data=data, job_id=job_id)


JOB_TERMS = (
    Option("--price", field="agreed_price", help="agreed price, e.g. 1250.00"),
    Option("--currency", field="currency", help="three-letter code (default EUR)"),
    Option("--pickup-at", field="pickup_at", type=time_arg, help="pickup time (RFC 3339)"),
    Option("--deliver-by", field="deliver_by", type=time_arg, help="delivery deadline (RFC 3339)"),
)

JOBS = (
    Action("create", "create a pending job", create_job, (
        Option("--customer", field="customer_id", type=uuid_arg, required=True, help="the customer's id"),
        *JOB_TERMS,
        Option("--origin", help="LAT,LON"),
        Option("--destination", help="LAT,LON"),
        Option("--via", action="append", metavar="LAT,LON", help="a stop on the way (repeatable)"),
        Option("--distance-km", type=float, help="planned distance (default: length of the path)"),
        Option("--shipment", type=json_object_arg, action="append",
               help='cargo as JSON, e.g. \'{"type": "pallet", "weight_kg": 400}\' (repeatable)'),
        new_id("job", "job_id"),
    ), writes=True, gather="data", takes_database=True),
    Action("update", "change price, currency or window of an open job", jobs.update_job,
           (row_id("job"), *JOB_TERMS), writes=True, gather="changes"),
    Action("assign", "dispatch a job to an ACTIVE assignment (vehicle and driver)", jobs.assign_job,
           (row_id("job"), Option("--assignment", to="assignment_id", type=uuid_arg, required=True,
                                  help="the ACTIVE assignment's id")),
           writes=True),
    Action("status", "move a job to in_transit, delivered, cancelled or pending", jobs.set_job_status,
           (row_id("job"), Option("status", type=str.lower, choices=JOB_STATUSES, help="the new status"),
            Option("--at", type=time_arg, help="delivery time (default now)")),
           writes=True),
    Action("add-shipment", "add cargo to an open job", jobs.add_shipment, (
        row_id("job"),
        Option("shipment", to="data", type=json_object_arg,
               help='JSON, e.g. \'{"type": "pallet", "weight_kg": 400}\''),
    ), writes=True),
    Action("delete", "soft-delete a pending or cancelled job", jobs.delete_job, (row_id("job"),), writes=True),
    Action("show", "one job with route and cargo", jobs.job_view, (row_id("job"),)),
    Action("list", "live jobs, newest first", jobs.list_jobs, (
        Option("--customer", to="customer_id", type=uuid_arg, help="only this customer's"),
        Option("--status", type=str.lower, choices=JOB_STATUSES, help="only jobs in this status"), LIMIT,
    ), columns=("id", "customer_id", "status", "agreed_price", "currency", "assignment_id", "created_at")),
)

# --- maintenance --------------------------------------------------------------------------------


async def vehicle_history(conn: asyncpg.Connection, *, vehicle_id: UUID, limit: int) -> dict[str, Any]:
    """``fleet maintenance history``: a vehicle's services and its triggers."""
    return {"records": await maintenance.list_records(conn, vehicle_id, limit=limit),
            "triggers": await maintenance.vehicle_triggers(conn, vehicle_id)}


async def profitability(db: Database, *, start: date, to: date | None, currency: str, vehicle_id: UUID | None,
                        refresh: bool) -> list[dict[str, Any]]:
    """``fleet maintenance profitability``: refreshes the views on the primary when asked,
    then reads them (a replica's when one answers)."""
    last = to or start
    if last < start:
        raise InvalidInput(f"--to ({last:%Y-%m}) is before --from ({start:%Y-%m})")
    if refresh:
        async with db.write() as conn:
            await queries.refresh_reports(conn)
    async with db.read() as conn:
        return await queries.monthly_profitability(conn, start, last, currency=currency.upper(),
                                                   vehicle_id=vehicle_id)


INTERVALS = (
    Option("--interval-km", field="interval_km", type=float, help="service every this many km"),
    Option("--interval-months", field="interval_months", type=int, help="service every this many months"),
)

MAINTENANCE = (
    Action("record", "record a service; the matching triggers move forward", maintenance.record_service, (
        vehicle_option(field="vehicle_id", required=True),
        Option("--type", field="type", required=True, help="service type; resets the schedule of the same name"),
        Option("--cost", field="cost", default="0", help="what the service cost, e.g. 320.50 (default 0)"),
        Option("--date", field="date", convert=_or_today, help="YYYY-MM-DD (default today, UTC)"),
        Option("--odometer-km", field="odometer_km", type=float, help="odometer reading at the service"),
        Option("--provider", field="provider", help="who did the service"),
        Option("--notes", field="notes", help="free text"),
        new_id("service record", "record_id"),
    ), writes=True, gather="data"),
    Action("schedule-add", "add a recurring rule for a vehicle type", maintenance.create_schedule, (
        Option("--name", field="name", required=True, help="matches the service type that satisfies it"),
        Option("--vehicle-type", field="vehicle_type", required=True, help="vehicles of this type follow the rule"),
        *INTERVALS,
        new_id("schedule", "schedule_id"),
    ), writes=True, gather="data"),
    Action("schedule-update", "change a rule's intervals; due dates follow", maintenance.update_schedule,
           (row_id("schedule"), *INTERVALS), writes=True, gather="changes"),
    Action("due", "triggers due before --before (default: overdue today)", maintenance.due_triggers, (
        Option("--before", type=date_arg, convert=_or_today, help="YYYY-MM-DD"), LIMIT,
    ), columns=("vehicle_id", "license_plate", "schedule", "next_due_date", "next_due_km",
                "last_service_date")),
    Action("history", "a vehicle's services and triggers", vehicle_history, (row_id("vehicle"), LIMIT)),
    Action("profitability", "revenue minus maintenance cost per vehicle and month", profitability, (
        Option("--from", dest="start", type=month_arg, required=True, help="YYYY-MM"),
        Option("--to", type=month_arg, help="YYYY-MM (default: --from)"),
        Option("--currency", default="EUR", help="jobs priced in other currencies are counted apart"),
        vehicle_option(),
        Option("--refresh", action="store_true", help="refresh the materialized views first (primary)"),
    ), columns=("month", "vehicle_id", "license_plate", "revenue", "maintenance_cost", "profit", "jobs"),
        takes_database=True),
)

# --- alerts -------------------------------------------------------------------------------------

ALERT_ID = Option("alert_id", type=count_arg, metavar="ID", help="the alert's id (fleet alerts list shows it)")

ALERTS = (
    Action("list", "alerts, newest first", alerts.list_alerts, (
        Option("--open", dest="open_only", action="store_true", help="only the open ones"),
        vehicle_option(),
        Option("--type", to="alert_type", choices=ALERT_TYPES, help="only alerts of this type"),
        Option("--since", type=since_arg, metavar="TIME", help="raised since: RFC 3339, or a time ago (30m, 2h, 7d)"),
        Option("--driver", to="driver_id", type=uuid_arg, metavar="ID",
               help="only alerts with this driver on duty (their id)"),
        LIMIT,
    ), columns=("id", "raised_at", "type", "severity", "license_plate", "driver", "geofence", "is_resolved",
                "resolved_at")),
    Action("show", "one alert: vehicle, geofence, details, what operators did", alerts.get_alert, (ALERT_ID,)),
    Action("resolve", "resolve an open alert by hand (audited)", alerts.resolve_alert,
           (ALERT_ID, Option("--note", help="why, kept in the alert's details and the audit log")), writes=True,
           description="Resolve an open alert: resolved_at is now, details get resolved_by (the --actor's user id), the note and"
           " resolved_because; an audit_logs row 'alert.resolve' records it. The rules raise it again only once"
           " its condition has cleared and come back."),
)

WINDOW = (
    vehicle_option(required=True),
    Option("--from", dest="start", type=time_arg, required=True, help="start (RFC 3339 or 'now')"),
    Option("--to", dest="end", type=time_arg, help="end, exclusive (default: open-ended)"),
    LIMIT,
)

TRIPS = (
    Action("list", "a vehicle's trips overlapping [--from, --to), oldest first", trip_views.list_trips, WINDOW,
           columns=("id", "start_time", "end_time", "distance_km", "duration_s", "max_speed_kmh", "idle_s",
                    "start_geofence_id", "end_geofence_id", "driver_id"),
           description="A vehicle's trips (by id, VIN or plate) that overlap the period; an open trip has no"
           " end_time yet. Distances in km from the positions (GPS jumps left out), durations in seconds."),
    Action("rebuild", "recompute trips, stops, odometer and engine hours from the stored readings",
           trip_views.rebuild_trips, (
               Option("--since", type=since_arg, required=True, metavar="TIME",
                      help="recompute from each vehicle's last trip started at or before TIME:"
                      " RFC 3339, or a time ago (30m, 2h, 7d)"),
               vehicle_option(),
           ), with_settings=True,
           description="Recompute trips, stops and the odometer and engine-hours accumulators from"
           " vehicle_telemetry, for every vehicle (or --vehicle), from its last trip that started at or before"
           " --since, with the FLEET_TRIPS_* settings. Prints a progress line per vehicle on stderr. Idempotent:"
           " unchanged trips keep their rows and publish no new event ids."),
)

STOPS = (
    Action("list", "a vehicle's stops overlapping [--from, --to), oldest first", trip_views.list_stops, WINDOW,
           columns=("id", "start_time", "end_time", "duration_s", "lat", "lon", "geofence_id", "idle_s"),
           description="A vehicle's stops (by id, VIN or plate) that overlap the period; an open stop has no"
           " end_time yet."),
)

GROUPS = (
    Group("vehicles", "register, change and find vehicles",
          (*entity_actions(VEHICLES), VEHICLES_AVAILABLE, VEHICLE_STATUS)),
    Group("drivers", "register, change and find drivers",
          (*entity_actions(DRIVERS), DRIVERS_AVAILABLE, DRIVERS_NEAREST, DRIVERS_SCORES)),
    Group("customers", "register and change customers", entity_actions(CUSTOMERS)),
    Group("assignments", "book drivers on vehicles; end or cancel bookings", ASSIGNMENTS),
    Group("jobs", "transport jobs with their route and cargo", JOBS),
    Group("maintenance", "service records, schedules, due dates, profitability", MAINTENANCE),
    Group("alerts", "the alerts the rules raised: list, show, resolve", ALERTS),
    Group("trips", "trips the workers detected: list, rebuild", TRIPS),
    Group("stops", "stops between trips: list", STOPS),
)
