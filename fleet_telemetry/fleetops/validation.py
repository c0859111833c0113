"""Checking and normalising the writers' input records: pure functions, no I/O, no clock.

Each ``*_fields`` function takes a mapping as it comes from the command line or a
command event and returns the column values to write, or raises
:class:`~fleet_telemetry.fleetops.errors.InvalidInput` naming the field and the rule it broke.
With ``partial=True`` (updates) only the fields present are checked and returned. The
single values are checked by :mod:`~fleet_telemetry.fleetops.values`.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from fleet_telemetry.fleetops.errors import InvalidInput
from fleet_telemetry.fleetops.values import (
    Point,
    check_period,
    optional_text,
    parse_choice,
    parse_currency,
    parse_date,
    parse_int,
    parse_money,
    parse_number,
    parse_object,
    parse_point,
    parse_text,
    parse_time,
    parse_uuid,
    shown,
)

VEHICLE_STATUSES = ("active", "maintenance", "inactive", "retired")
DRIVER_STATUSES = ("active", "inactive", "suspended")
JOB_STATUSES = ("pending", "assigned", "in_transit", "delivered", "cancelled")
OPEN_JOB_STATUSES = ("pending", "assigned", "in_transit")
# Which job status may follow which; "cancelled" and "delivered" are final.
JOB_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "pending": ("assigned", "cancelled"),
    "assigned": ("pending", "in_transit", "cancelled"),
    "in_transit": ("delivered", "cancelled"),
    "delivered": (),
    "cancelled": (),
}

_VIN = re.compile(r"^[A-Z0-9]{1,17}$")


Rule = Callable[[Any, str], Any]


def _fields(data: Mapping[str, Any], rules: Mapping[str, Rule], *, required: tuple[str, ...] = (),
            not_null: tuple[str, ...] = (), partial: bool = False, what: str,
            prefix: str = "") -> dict[str, Any]:
    """Checks each present field with its rule; ``required`` must be present unless partial,
    ``not_null`` may not be given as null. Errors name fields as ``prefix + name``."""
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{what} must be a JSON object")
    unknown = sorted(set(data) - set(rules))
    if unknown:
        raise InvalidInput(f"unknown field(s) for {what}: {', '.join(unknown)}; known: {', '.join(rules)}")
    if not partial:
        missing = [name for name in required if data.get(name) is None]
        if missing:
            raise InvalidInput(f"{what} needs field(s): {', '.join(missing)}")
    out: dict[str, Any] = {}
    for name, rule in rules.items():
        if name in data:
            if data[name] is None and (name in not_null or name in required):
                raise InvalidInput(f"field '{prefix}{name}' of {what} cannot be null")
            out[name] = rule(data[name], prefix + name)
    if partial and not out:
        raise InvalidInput(f"nothing to change: give at least one of {', '.join(rules)}")
    return out


def _optional(rule: Rule) -> Rule:
    return lambda value, field: None if value is None else rule(value, field)


def _vin(value: Any, field: str) -> str:
    text = parse_text(value, field).upper().replace(" ", "")
    if not _VIN.match(text):
        raise InvalidInput(f"field '{field}' must be up to 17 letters and digits, got {shown(value)}")
    return text


def _lower_text(value: Any, field: str) -> str:
    return parse_text(value, field, max_length=50).lower()


VEHICLE_RULES: dict[str, Rule] = {
    "vin": _vin,
    "license_plate": lambda v, f: parse_text(v, f, max_length=20).upper(),
    "make": _optional(lambda v, f: optional_text(v, f, max_length=100)),
    "model": _optional(lambda v, f: optional_text(v, f, max_length=100)),
    "year": _optional(lambda v, f: parse_int(v, f, minimum=1900, maximum=2100)),
    "type": _lower_text,
    "status": lambda v, f: parse_choice(v, f, VEHICLE_STATUSES),
    "specs": parse_object,
}

DRIVER_RULES: dict[str, Rule] = {
    "name": parse_text,
    "license_number": _optional(lambda v, f: optional_text(v, f, max_length=50)),
    "status": lambda v, f: parse_choice(v, f, DRIVER_STATUSES),
    "user_id": _optional(parse_uuid),
}

CUSTOMER_RULES: dict[str, Rule] = {
    "name": parse_text,
    "contact_info": parse_object,
    "billing_address": _optional(lambda v, f: optional_text(v, f, max_length=500)),
}


def vehicle_fields(data: Mapping[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """Columns of ``vehicles`` from input; ``vin`` and ``license_plate`` required to register."""
    return _fields(data, VEHICLE_RULES, required=("vin", "license_plate"),
                   not_null=("type", "status", "specs"), partial=partial, what="a vehicle")


def driver_fields(data: Mapping[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """Columns of ``drivers`` from input; ``name`` required to register."""
    return _fields(data, DRIVER_RULES, required=("name",), not_null=("status",), partial=partial,
                   what="a driver")


def customer_fields(data: Mapping[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """Columns of ``customers`` from input; ``name`` required to register."""
    return _fields(data, CUSTOMER_RULES, required=("name",), not_null=("contact_info",),
                   partial=partial, what="a customer")



@dataclass(frozen=True)
class Shipment:
    type: str
    weight_kg: Decimal | None
    dimensions: dict[str, Any]
    description: str | None


@dataclass(frozen=True)
class Route:
    origin: Point
    destination: Point
    waypoints: tuple[Point, ...]
    distance_km: float | None

    def path(self) -> tuple[Point, ...]:
        """Origin, the stops, destination: the LineString stored as ``routes.waypoints``."""
        return (self.origin, *self.waypoints, self.destination)


def shipment(value: Any, field: str = "shipment") -> Shipment:
    data = _fields(value, {
        "type": _lower_text,
        "weight_kg": _optional(lambda v, f: parse_money(v, f)),
        "dimensions": parse_object,
        "description": _optional(lambda v, f: optional_text(v, f, max_length=500)),
    }, not_null=("type", "dimensions"), what=field, prefix=f"{field}.")
    return Shipment(data.get("type", "general"), data.get("weight_kg"), data.get("dimensions", {}),
                    data.get("description"))


def route(value: Any, field: str = "route") -> Route:
    data = _fields(value, {
        "origin": parse_point,
        "destination": parse_point,
        "waypoints": lambda v, f: tuple(parse_point(p, f"{f}[{i}]") for i, p in enumerate(_list(v, f))),
        "distance_km": _optional(lambda v, f: parse_number(v, f, minimum=0)),
    }, required=("origin", "destination"), not_null=("waypoints",), what=field, prefix=f"{field}.")
    return Route(data["origin"], data["destination"], data.get("waypoints", ()), data.get("distance_km"))


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise InvalidInput(f"field '{field}' must be a list, got {shown(value)}")
    return list(value)


JOB_RULES: dict[str, Rule] = {
    "customer_id": parse_uuid,
    "agreed_price": _optional(parse_money),
    "currency": parse_currency,
    "pickup_at": _optional(parse_time),
    "deliver_by": _optional(parse_time),
    "route": _optional(route),
    "shipments": lambda v, f: tuple(shipment(s, f"{f}[{i}]") for i, s in enumerate(_list(v, f))),
}


def job_fields(data: Mapping[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """A job's columns plus ``route`` (:class:`Route`) and ``shipments`` (tuple of :class:`Shipment`).

    Updates may change the price, currency and time window only.
    """
    if partial:
        allowed = {k: JOB_RULES[k] for k in ("agreed_price", "currency", "pickup_at", "deliver_by")}
        out = _fields(data, allowed, not_null=("currency",), partial=True, what="a job update")
    else:
        out = _fields(data, JOB_RULES, required=("customer_id",), not_null=("currency", "shipments"),
                      what="a job")
    pickup, deliver = out.get("pickup_at"), out.get("deliver_by")
    if pickup is not None and deliver is not None:
        check_period(pickup, deliver, start_field="pickup_at", end_field="deliver_by")
    return out


def check_job_transition(current: str, wanted: str) -> None:
    """Refuses a status change the job's life cycle does not allow."""
    if wanted not in JOB_TRANSITIONS.get(current, ()):
        allowed = ", ".join(JOB_TRANSITIONS.get(current, ())) or "nothing (it is final)"
        raise InvalidInput(f"a {current} job cannot become {wanted}; it can become: {allowed}")


SERVICE_RULES: dict[str, Rule] = {
    "vehicle_id": parse_uuid,
    "type": _lower_text,
    "cost": parse_money,
    "date": parse_date,
    "odometer_km": _optional(lambda v, f: parse_number(v, f, minimum=0)),
    "provider": _optional(lambda v, f: optional_text(v, f)),
    "notes": _optional(lambda v, f: optional_text(v, f, max_length=2000)),
}


def service_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """A ``maintenance_records`` row: ``vehicle_id``, ``type``, ``date`` required."""
    return _fields(data, SERVICE_RULES, required=("vehicle_id", "type", "date"), not_null=("cost",),
                   what="a service record")


SCHEDULE_RULES: dict[str, Rule] = {
    "name": _lower_text,
    "vehicle_type": _lower_text,
    "interval_km": _optional(lambda v, f: parse_number(v, f, strictly_above=0)),
    "interval_months": _optional(lambda v, f: parse_int(v, f, minimum=1, maximum=1200)),
}


def schedule_fields(data: Mapping[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """A ``maintenance_schedules`` row; at least one interval when creating."""
    if partial:
        allowed = {k: SCHEDULE_RULES[k] for k in ("interval_km", "interval_months")}
        return _fields(data, allowed, partial=True, what="a schedule update")
    out = _fields(data, SCHEDULE_RULES, required=("name", "vehicle_type"), what="a schedule")
    if out.get("interval_km") is None and out.get("interval_months") is None:
        raise InvalidInput("a schedule needs 'interval_km', 'interval_months' or both")
    return out


# --- maintenance arithmetic -------------------------------------------------------------


def add_months(day: date, months: int) -> date:
    """``day`` moved by ``months`` calendar months, clamped to the month's last day."""
    index = day.year * 12 + (day.month - 1) + months
    year, month = divmod(index, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return date(year, month + 1, min(day.day, last))


def next_due(last_date: date | None, last_km: float | None, interval_months: int | None,
             interval_km: float | None) -> tuple[date | None, float | None]:
    """When a schedule is next due after a service on ``last_date`` at ``last_km``.

    Each part is None when its interval or its starting point is unknown.
    """
    due_date = add_months(last_date, interval_months) if last_date and interval_months else None
    due_km = last_km + interval_km if last_km is not None and interval_km is not None else None
    return due_date, due_km
