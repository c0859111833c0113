"""Bytes to readings: the pure first stage of the pipeline.

:func:`decode_message` takes one Kafka record's value (plus where it came from and the
current time) and returns the readings it holds and the rejections, each with a reason
code and a one-sentence detail. It does no I/O and reads no clock, and no input bytes
can make it raise: whatever is not a valid reading becomes a :class:`Rejection`.

Rules that need the database (is the vehicle registered?) are applied later, by the sink.

Two paths, one verdict. The fast path decodes and checks a reading in one pass in C
(a ``msgspec`` struct whose fields carry the contract's ranges); anything it refuses,
and every message that is neither a reading object nor an array of them, goes through
the field-by-field checks below, which say which field broke which rule. A reading
is therefore accepted exactly when the field-by-field checks accept it, and every
rejection carries the same reason and detail whichever path saw it first
(``tests/unit/test_decode.py`` compares the two on generated input).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Union
from uuid import UUID

import msgspec
import orjson
from asyncpg.pgproto.pgproto import UUID as _PgUUID
from msgspec import Meta

from fleet_telemetry.core.reading import (
    FUTURE_TIME,
    INVALID_READING,
    MALFORMED_JSON,
    OUTSIDE_RETENTION,
    Reading,
    Rejection,
    Source,
)

_DTC = re.compile(r"^[PCBU][0-9A-F]{4}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_INF = math.inf

# (field, minimum, maximum, maximum is exclusive)
_OPTIONAL_NUMBERS: tuple[tuple[str, float, float | None, bool], ...] = (
    ("speed", 0.0, 400.0, False),
    ("fuel_level", 0.0, 100.0, False),
    ("heading", 0.0, 360.0, True),
    ("odometer_km", 0.0, None, False),
)


_FINITE = sys.float_info.max
_DTC_PATTERN = "^[PCBU][0-9A-F]{4}$"


class _Engine(msgspec.Struct):
    """The known keys of ``engine_status``, checked; other keys are kept as sent."""

    rpm: Union[Annotated[float, Meta(ge=0.0, le=_FINITE)], None] = None
    coolant_temp_c: Union[Annotated[float, Meta(ge=-_FINITE, le=_FINITE)], None] = None
    ignition: Union[bool, None] = None
    dtc: Union[list[Annotated[str, Meta(pattern=_DTC_PATTERN)]], None] = None


class _Wire(msgspec.Struct, forbid_unknown_fields=True):
    """A reading as the contract allows it; ``time`` is checked for its offset and the
    time rules afterwards, ``engine_status`` by :class:`_Engine`. A message with other
    top-level fields takes the field-by-field path, which ignores them after checking
    that they are JSON (skipping them here would not)."""

    vehicle_id: str
    time: Union[datetime, int]
    lat: Annotated[float, Meta(ge=-90.0, le=90.0)]
    lon: Annotated[float, Meta(ge=-180.0, le=180.0)]
    speed: Union[Annotated[float, Meta(ge=0.0, le=400.0)], None] = None
    fuel_level: Union[Annotated[float, Meta(ge=0.0, le=100.0)], None] = None
    heading: Union[Annotated[float, Meta(ge=0.0, lt=360.0)], None] = None
    odometer_km: Union[Annotated[float, Meta(ge=0.0, le=_FINITE)], None] = None
    engine_status: msgspec.Raw = msgspec.Raw()


_WIRE = msgspec.json.Decoder(_Wire)
_ENGINE = msgspec.json.Decoder(Union[_Engine, None])
_ELEMENTS = msgspec.json.Decoder(list[msgspec.Raw])
_MAX_ENGINE_DEPTH = 254  # what orjson writes, so what the sink can store as jsonb


@dataclass(frozen=True, slots=True)
class Rules:
    """The time rules of the contract, resolved against one ``now``."""

    now: datetime
    max_future: timedelta = timedelta(minutes=5)
    retention: timedelta = timedelta(days=30)
    latest: datetime = field(init=False)
    oldest: datetime = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "latest", self.now + self.max_future)
        object.__setattr__(self, "oldest", self.now - self.retention)


@dataclass(slots=True)
class Decoded:
    readings: list[Reading] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


class _Invalid(Exception):
    """Internal: a reading broke a rule; carries the reason and the detail sentence."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def decode_message(
    value: bytes | None,
    *,
    key: bytes | None,
    source: Source,
    rules: Rules,
) -> Decoded:
    """Decode one record: a reading object or an array of them. Never raises."""
    out = Decoded()
    decode_into(value, key, source, rules, out)
    return out


def decode_into(value: bytes | None, key: bytes | None, source: Source, rules: Rules, out: Decoded) -> None:
    """:func:`decode_message` adding to ``out``: what a worker calls for each record of a
    fetch, gathering the whole fetch's readings in one :class:`Decoded`."""
    if value and value.isascii() and b"\\" not in value:
        # ASCII without escapes: text a JSON parser cannot find invalid, whether or not
        # it reads every field (the one-pass decoding skips fields it does not know).
        # (Looking for any backslash is a memchr; looking for "\\u" costs twice as much.)
        first = value[:1]
        if first == b"{":
            reading = _fast(value, key, source, rules)
            if reading is not None:
                out.readings.append(reading)
                return
        elif first == b"[":
            readings = _fast_array(value, key, source, rules)
            if readings is not None:
                out.readings += readings
                return
    checked = decode_checked(value, key=key, source=source, rules=rules)
    out.readings += checked.readings
    out.rejections += checked.rejections


def decode_checked(value: bytes | None, *, key: bytes | None, source: Source, rules: Rules) -> Decoded:
    """:func:`decode_message` field by field, naming what is wrong: the path every
    message the one-pass decoding refuses takes. Never raises."""
    out = Decoded()
    if not value:
        out.rejections.append(
            Rejection(MALFORMED_JSON, "the message value is empty", source, key, value or b"")
        )
        return out
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        out.rejections.append(
            Rejection(MALFORMED_JSON, f"the message is not valid UTF-8 JSON: {exc}", source, key, value)
        )
        return out
    if isinstance(document, dict):
        _decode_one(document, value, key, source, rules, out)
    elif isinstance(document, list):
        texts = array_elements(value)
        for index, (element, text) in enumerate(zip(document, texts)):
            element_source = Source(source.topic, source.partition, source.offset, index)
            if isinstance(element, dict):
                _decode_one(element, text, key, element_source, rules, out)
            else:
                out.rejections.append(
                    Rejection(
                        INVALID_READING,
                        f"array element {index} is {_kind(element)}, expected a reading object",
                        element_source,
                        key,
                        text,
                    )
                )
    else:
        out.rejections.append(
            Rejection(
                INVALID_READING,
                f"the message is {_kind(document)}, expected a reading object or an array of them",
                source,
                key,
                value,
            )
        )
    return out


def _fast(value: bytes, key: bytes | None, source: Source, rules: Rules) -> Reading | None:
    """The one-pass path for a reading that breaks no rule; ``None`` sends ``value`` to the
    field-by-field checks, which find and name what is wrong."""
    try:
        wire = _WIRE.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    vehicle_id = _UUIDS.get(wire.vehicle_id)
    if vehicle_id is None:
        try:
            vehicle_id = _vehicle_id(wire.vehicle_id)
        except _Invalid:
            return None
    sent = wire.time
    if isinstance(sent, int):
        try:
            moment = _EPOCH + timedelta(milliseconds=sent)
        except OverflowError:
            return None
    else:
        moment = sent
        zone = moment.tzinfo
        if zone is None:
            return None
        if zone is not timezone.utc:
            try:
                moment = moment.astimezone(timezone.utc)
            except OverflowError:
                return None
    if moment > rules.latest or moment < rules.oldest:
        return None
    engine: dict[str, Any] | None = None
    engine_json: bytes | None = None
    raw_engine = wire.engine_status
    if raw_engine:
        # No NUL character can be here (no escapes at all on this path), and an object
        # under _MAX_ENGINE_DEPTH bytes cannot nest that deep.
        if len(raw_engine) >= _MAX_ENGINE_DEPTH:
            text = bytes(raw_engine)
            if text.count(b"{") + text.count(b"[") >= _MAX_ENGINE_DEPTH:
                return None
        try:
            checked = _ENGINE.decode(raw_engine)  # an object with valid known keys, or null
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            return None
        if checked is not None:
            engine_json = bytes(raw_engine)
            try:
                engine = orjson.loads(engine_json)
            except orjson.JSONDecodeError:  # deeper than orjson's limit, for one
                return None
    return Reading(vehicle_id, moment, wire.lat, wire.lon, wire.speed, wire.fuel_level, wire.heading,
                   wire.odometer_km, engine, source, key, value, engine_json)


def _fast_array(value: bytes, key: bytes | None, source: Source, rules: Rules) -> list[Reading] | None:
    """A gateway's array on the one-pass path when every element is a valid reading; an
    element's dead letter would carry its own JSON text."""
    try:
        elements = _ELEMENTS.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    readings: list[Reading] = []
    topic, partition, offset = source.topic, source.partition, source.offset
    for index, element in enumerate(elements):
        text = bytes(element)
        reading = _fast(text, key, Source(topic, partition, offset, index), rules) if text[:1] == b"{" else None
        if reading is None:
            return None
        readings.append(reading)
    return readings


def array_elements(text: bytes) -> list[bytes]:
    """The elements of the JSON array ``text`` (known to be valid JSON), each as its own
    text: what an element's dead letter carries, exactly as the gateway sent it, at any
    depth."""
    try:
        return [bytes(element) for element in _ELEMENTS.decode(text)]
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        pass
    # Nested deeper than the C decoder goes: split the outer array by hand.
    elements: list[bytes] = []
    depth, start = 0, -1
    in_string = escaped = False
    for position, byte in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
            continue
        if depth == 1 and start < 0 and byte not in _BLANKS and byte != _COMMA and byte not in _CLOSERS:
            start = position  # an element begins
        if byte == _QUOTE:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
        elif byte in _CLOSERS:
            depth -= 1
            if depth == 0:  # the end of the outer array
                if start >= 0:
                    elements.append(text[start:position].strip())
                break
        elif byte == _COMMA and depth == 1:
            elements.append(text[start:position].strip())
            start = -1
    return elements


_BACKSLASH, _QUOTE, _COMMA = 0x5C, 0x22, 0x2C
_OPENERS, _CLOSERS, _BLANKS = frozenset(b"[{"), frozenset(b"]}"), frozenset(b" \t\n\r")


def _decode_one(
    obj: dict[str, Any],
    raw: bytes,
    key: bytes | None,
    source: Source,
    rules: Rules,
    out: Decoded,
) -> None:
    try:
        out.readings.append(_reading(obj, raw, key, source, rules))
    except _Invalid as exc:
        out.rejections.append(Rejection(exc.reason, exc.detail, source, key, raw))


def _reading(
    obj: dict[str, Any], raw: bytes, key: bytes | None, source: Source, rules: Rules
) -> Reading:
    vehicle_id = _vehicle_id(obj.get("vehicle_id"))
    time = _time(obj.get("time"))
    lat = _number(obj, "lat", -90.0, 90.0, required=True)
    lon = _number(obj, "lon", -180.0, 180.0, required=True)
    optional = [_number(obj, name, lo, hi, exclusive=excl) for name, lo, hi, excl in _OPTIONAL_NUMBERS]
    engine_status = _engine_status(obj.get("engine_status"))
    if time > rules.latest:
        raise _Invalid(
            FUTURE_TIME,
            f"field 'time' is {time.isoformat()}, more than "
            f"{rules.max_future.total_seconds():g} seconds ahead of the consumer's clock",
        )
    if time < rules.oldest:
        raise _Invalid(
            OUTSIDE_RETENTION,
            f"field 'time' is {time.isoformat()}, older than the raw retention of "
            f"{rules.retention.days} days",
        )
    assert lat is not None and lon is not None
    return Reading(
        vehicle_id, time, lat, lon, optional[0], optional[1], optional[2], optional[3],
        engine_status, source, key, raw,
    )


_UUIDS: dict[str, UUID] = {}
_UUID_CACHE_LIMIT = 200_000


def _vehicle_id(value: Any) -> UUID:
    """The vehicle id as asyncpg's UUID (a :class:`uuid.UUID` whose hash is computed once
    and which asyncpg writes without converting it): every stage keys dictionaries and
    sets by it, several times per reading. A fleet repeats the same few thousand ids, so
    each is parsed once; the cache is bounded and only holds ids that parsed."""
    cached = _UUIDS.get(value) if type(value) is str else None
    if cached is not None:
        return cached
    if value is None:
        raise _Invalid(INVALID_READING, "field 'vehicle_id' is missing")
    if not isinstance(value, str):
        raise _Invalid(INVALID_READING, f"field 'vehicle_id' is {_kind(value)}, expected a UUID string")
    try:
        parsed = _PgUUID(UUID(value).bytes)
    except ValueError:
        raise _Invalid(INVALID_READING, f"field 'vehicle_id' is {_show(value)}, not a UUID") from None
    if len(_UUIDS) >= _UUID_CACHE_LIMIT:
        _UUIDS.clear()
    _UUIDS[value] = parsed
    return parsed


def _time(value: Any) -> datetime:
    if value is None:
        raise _Invalid(INVALID_READING, "field 'time' is missing")
    if isinstance(value, bool):
        raise _Invalid(INVALID_READING, "field 'time' is a boolean, expected RFC 3339 text or epoch milliseconds")
    if isinstance(value, int):
        try:
            return _EPOCH + timedelta(milliseconds=value)
        except OverflowError:
            raise _Invalid(INVALID_READING, f"field 'time' is {value}, out of range for epoch milliseconds") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise _Invalid(INVALID_READING, f"field 'time' is {_show(value)}, not an RFC 3339 timestamp") from None
        if parsed.tzinfo is None:
            raise _Invalid(INVALID_READING, f"field 'time' is {_show(value)}, which has no UTC offset")
        try:
            return parsed.astimezone(timezone.utc)
        except OverflowError:
            raise _Invalid(INVALID_READING, f"field 'time' is {_show(value)}, out of range") from None
    raise _Invalid(
        INVALID_READING, f"field 'time' is {_kind(value)}, expected RFC 3339 text or integer epoch milliseconds"
    )


def _number(
    obj: dict[str, Any], name: str, low: float, high: float | None,
    *, required: bool = False, exclusive: bool = False,
) -> float | None:
    value: Any = obj.get(name)
    kind = type(value)
    if kind is float or kind is int:  # the common case, checked without isinstance chains
        number = float(value)
        if low <= number < _INF and (high is None or (number < high if exclusive else number <= high)):
            return number
    if value is None:
        if required:
            raise _Invalid(INVALID_READING, f"field '{name}' is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(INVALID_READING, f"field '{name}' is {_kind(value)}, expected a number")
    number = float(value)
    if not math.isfinite(number):
        raise _Invalid(INVALID_READING, f"field '{name}' is {value}, expected a finite number")
    if number < low or (high is not None and (number >= high if exclusive else number > high)):
        if high is None:
            rule = f"must be {low:g} or more"
        elif exclusive:
            rule = f"must be from {low:g} to below {high:g}"
        else:
            rule = f"must be between {low:g} and {high:g}"
        raise _Invalid(INVALID_READING, f"field '{name}' is {value}, {rule}")
    return number


def _engine_status(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid(INVALID_READING, f"field 'engine_status' is {_kind(value)}, expected an object")
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise _Invalid(INVALID_READING, f"field 'engine_status' nests deeper than {_MAX_ENGINE_DEPTH} levels") from None
    if b"\\u0000" in text:
        raise _Invalid(INVALID_READING, "field 'engine_status' holds a NUL character (\\u0000), which jsonb cannot store")
    rpm = value.get("rpm")
    if rpm is not None and (isinstance(rpm, bool) or not isinstance(rpm, (int, float)) or not rpm >= 0):
        raise _Invalid(INVALID_READING, f"field 'engine_status.rpm' is {_show(rpm)}, expected a number of 0 or more")
    coolant = value.get("coolant_temp_c")
    if coolant is not None and (isinstance(coolant, bool) or not isinstance(coolant, (int, float))):
        raise _Invalid(INVALID_READING, f"field 'engine_status.coolant_temp_c' is {_show(coolant)}, expected a number")
    ignition = value.get("ignition")
    if ignition is not None and not isinstance(ignition, bool):
        raise _Invalid(INVALID_READING, f"field 'engine_status.ignition' is {_show(ignition)}, expected true or false")
    dtc = value.get("dtc")
    if dtc is not None:
        if not isinstance(dtc, list):
            raise _Invalid(INVALID_READING, f"field 'engine_status.dtc' is {_kind(dtc)}, expected an array of OBD-II codes")
        for code in dtc:
            if not isinstance(code, str) or not _DTC.match(code):
                raise _Invalid(
                    INVALID_READING,
                    f"field 'engine_status.dtc' holds {_show(code)}, not an OBD-II code such as \"P0301\"",
                )
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: Any) -> str:
    text = _dumps(value).decode("utf-8", "replace")
    return text if len(text) <= 60 else text[:57] + "..."


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):  # nested deeper than orjson writes
        return b"(a value nested too deeply to show)"
