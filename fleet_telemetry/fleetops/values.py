"""Checking and normalising one input value: pure functions, no I/O, no clock.

Each ``parse_*`` function takes a value as it comes from the command line or a command
event and the name of its field, and returns the value to store, or raises
:class:`~fleet_telemetry.fleetops.errors.InvalidInput` naming the field and the rule it
broke. Whole records are checked field by field in
:mod:`~fleet_telemetry.fleetops.validation`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any
from uuid import UUID

from fleet_telemetry.fleetops.errors import InvalidInput

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_MAX_MONEY = Decimal("9999999999.99")  # numeric(12, 2)
_MAX_TEXT = 200


@dataclass(frozen=True)
class Point:
    """A WGS 84 position; ``lon`` first where PostGIS wants x, y."""

    lat: float
    lon: float

    def as_json(self) -> dict[str, float]:
        return {"lat": self.lat, "lon": self.lon}


def parse_uuid(value: Any, field: str) -> UUID:
    """A UUID from a UUID or its text."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value.strip())
        except ValueError:
            pass
    raise InvalidInput(f"field '{field}' must be a UUID, got {shown(value)}")


def parse_time(value: Any, field: str) -> datetime:
    """An aware datetime from RFC 3339 text with an offset, epoch milliseconds, or a datetime."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, bool):
        raise InvalidInput(f"field '{field}' must be a time, got {shown(value)}")
    elif isinstance(value, int):
        try:
            parsed = datetime.fromtimestamp(value / 1000, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise InvalidInput(f"field '{field}' is out of range: {value}") from None
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidInput(
                f"field '{field}' must be an RFC 3339 time such as 2025-01-31T08:00:00+00:00,"
                f" got {shown(value)}"
            ) from None
    else:
        raise InvalidInput(f"field '{field}' must be a time, got {shown(value)}")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidInput(f"field '{field}' needs a UTC offset (e.g. +00:00 or Z), got {shown(value)}")
    return parsed


def parse_date(value: Any, field: str) -> date:
    """A calendar date from YYYY-MM-DD text or a date."""
    if isinstance(value, datetime):
        raise InvalidInput(f"field '{field}' must be a date (YYYY-MM-DD), got a time")
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise InvalidInput(f"field '{field}' must be a date (YYYY-MM-DD), got {shown(value)}")


def parse_month(value: Any, field: str) -> date:
    """The first day of a month given as YYYY-MM (or any date in it)."""
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}", value.strip()):
        value = value.strip() + "-01"
    return parse_date(value, field).replace(day=1)


def parse_number(value: Any, field: str, *, minimum: float | None = None,
                 maximum: float | None = None, strictly_above: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise InvalidInput(f"field '{field}' must be a number, got {shown(value)}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidInput(f"field '{field}' must be a number, got {shown(value)}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise InvalidInput(f"field '{field}' must be a finite number, got {shown(value)}")
    if minimum is not None and number < minimum:
        raise InvalidInput(f"field '{field}' must be {minimum:g} or more, got {number:g}")
    if strictly_above is not None and number <= strictly_above:
        raise InvalidInput(f"field '{field}' must be more than {strictly_above:g}, got {number:g}")
    if maximum is not None and number > maximum:
        raise InvalidInput(f"field '{field}' must be {maximum:g} or less, got {number:g}")
    return number


def parse_int(value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"field '{field}' must be a whole number, got {shown(value)}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InvalidInput(f"field '{field}' must be a whole number, got {shown(value)}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise InvalidInput(f"field '{field}' must be a whole number, got {shown(value)}")
    if minimum is not None and value < minimum:
        raise InvalidInput(f"field '{field}' must be {minimum} or more, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidInput(f"field '{field}' must be {maximum} or less, got {value}")
    return value


def parse_money(value: Any, field: str) -> Decimal:
    """A non-negative amount with at most two decimals that fits numeric(12, 2)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise InvalidInput(f"field '{field}' must be an amount such as 1250.50, got {shown(value)}")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidInput(f"field '{field}' must be an amount such as 1250.50, got {shown(value)}") from None
    if not amount.is_finite():
        raise InvalidInput(f"field '{field}' must be a finite amount, got {shown(value)}")
    if amount < 0:
        raise InvalidInput(f"field '{field}' must be 0 or more, got {amount}")
    if amount > _MAX_MONEY:
        raise InvalidInput(f"field '{field}' must be at most {_MAX_MONEY}, got {amount}")
    if amount != amount.quantize(Decimal("0.01")):
        raise InvalidInput(f"field '{field}' has more than two decimals: {amount}")
    return amount.quantize(Decimal("0.01"))


def parse_text(value: Any, field: str, *, max_length: int = _MAX_TEXT) -> str:
    """Non-empty text without surrounding blanks."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"field '{field}' must be non-empty text, got {shown(value)}")
    text = value.strip()
    if len(text) > max_length:
        raise InvalidInput(f"field '{field}' is longer than {max_length} characters")
    return text


def optional_text(value: Any, field: str, *, max_length: int = _MAX_TEXT) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return parse_text(value, field, max_length=max_length)


def parse_choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise InvalidInput(f"field '{field}' must be one of {', '.join(choices)}, got {shown(value)}")


def parse_object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"field '{field}' must be a JSON object, got {shown(value)}")
    return value


def parse_point(value: Any, field: str) -> Point:
    """A position from ``{"lat": .., "lon": ..}``, ``[lat, lon]`` or ``"lat,lon"``."""
    if isinstance(value, Point):
        return value
    lat: Any
    lon: Any
    if isinstance(value, Mapping) and "lat" in value and "lon" in value:
        lat, lon = value["lat"], value["lon"]
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        lat, lon = value
    elif isinstance(value, str) and value.count(",") == 1:
        lat, lon = value.split(",")
    else:
        raise InvalidInput(
            f"field '{field}' must be a position as lat,lon (e.g. 52.52,13.40), got {shown(value)}"
        )
    return Point(
        parse_number(lat, f"{field}.lat", minimum=-90, maximum=90),
        parse_number(lon, f"{field}.lon", minimum=-180, maximum=180),
    )


def check_period(start: datetime, end: datetime | None, *, start_field: str = "start_time",
                 end_field: str = "end_time") -> None:
    """Refuses an end that is not after the start (an empty or reversed period)."""
    if end is not None and end <= start:
        raise InvalidInput(
            f"field '{end_field}' ({end.isoformat()}) must be after '{start_field}' ({start.isoformat()})"
        )


def parse_currency(value: Any, field: str) -> str:
    """A three-letter currency code, upper case."""
    text = parse_text(value, field, max_length=3).upper()
    if not _CURRENCY.match(text):
        raise InvalidInput(f"field '{field}' must be a three-letter currency code such as EUR, got {shown(value)}")
    return text


def shown(value: Any) -> str:
    """``value`` as an error message quotes it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
