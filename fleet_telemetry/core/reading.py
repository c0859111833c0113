"""The telemetry reading, version 1, as every stage sees it after decoding.

The wire format (docs/interface.md, "Telemetry message, version 1") is decoded by
:func:`fleet_telemetry.consumers.decode.decode_message`; this module holds the typed result and the
rules that both the decoder and the producers share.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final
from uuid import UUID

import orjson

# Reasons a reading is dead-lettered; the values of the ``fleet.error.reason`` header.
MALFORMED_JSON: Final = "malformed_json"
INVALID_READING: Final = "invalid_reading"
UNKNOWN_VEHICLE: Final = "unknown_vehicle"
FUTURE_TIME: Final = "future_time"
OUTSIDE_RETENTION: Final = "outside_retention"
REASONS: Final = (MALFORMED_JSON, INVALID_READING, UNKNOWN_VEHICLE, FUTURE_TIME, OUTSIDE_RETENTION)

_EWKB_POINT: Final = struct.Struct("<BIIdd")
_EWKB_POINT_SRID: Final = 0x20000001  # wkbPoint with the SRID flag set


def ewkb_point(lon: float, lat: float, srid: int = 4326) -> bytes:
    """Little-endian EWKB of a 2-D point: what PostGIS's binary ``geometry`` input takes."""
    return _EWKB_POINT.pack(1, _EWKB_POINT_SRID, srid, lon, lat)


def status_time(moment: datetime) -> str:
    """Fixed-width UTC RFC 3339 text (``2026-11-25T08:00:00.000000Z``).

    Fixed width makes the text order equal to the time order, which the Redis status
    script relies on to never move a status backwards.
    """
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(slots=True, unsafe_hash=True)
class Source:
    """Where a reading came from: the Kafka record, and its index inside an array message.
    Treated as immutable; not ``frozen`` because one is built per message and a frozen
    dataclass costs four times as much to build (hashable all the same)."""

    topic: str
    partition: int
    offset: int
    index: int | None = None


@dataclass(slots=True)
class Reading:
    """One accepted reading. ``time`` is timezone-aware UTC. Treated as immutable
    (not ``frozen`` only because frozen dataclasses are slower to build, and the
    decoder builds one per reading)."""

    vehicle_id: UUID
    time: datetime
    lat: float
    lon: float
    speed: float | None
    fuel_level: float | None
    heading: float | None
    odometer_km: float | None
    engine_status: dict[str, Any] | None
    source: Source
    key: bytes | None
    raw: bytes | dict[str, Any]
    """What a dead letter of this reading carries: the message bytes for a single
    reading, the element's own JSON text for a reading inside an array."""
    engine_json: bytes | None = None
    """``engine_status`` as the JSON text the device sent, when the decoder kept it: what
    the sink stores as jsonb, so the object is not encoded again."""

    @property
    def identity(self) -> tuple[UUID, datetime]:
        return (self.vehicle_id, self.time)

    def dead_letter_value(self) -> bytes:
        return self.raw if isinstance(self.raw, bytes) else orjson.dumps(self.raw)

    def to_json(self) -> dict[str, Any]:
        """The reading in wire format (what a producer publishes)."""
        out: dict[str, Any] = {
            "vehicle_id": str(self.vehicle_id),
            "time": self.time.isoformat(),
            "lat": self.lat,
            "lon": self.lon,
        }
        for name in ("speed", "fuel_level", "heading", "odometer_km", "engine_status"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class Rejection:
    """A reading (or message) that will not be stored, and why."""

    reason: str
    detail: str
    source: Source
    key: bytes | None
    value: bytes
    """The dead letter's value: original bytes, or the array element as JSON."""


def by_vehicle(readings: Iterable[Reading]) -> dict[UUID, list[Reading]]:
    """A batch's readings grouped per vehicle, in arrival order."""
    groups: dict[UUID, list[Reading]] = {}
    for r in readings:
        group = groups.get(r.vehicle_id)
        if group is None:
            groups[r.vehicle_id] = [r]
        else:
            group.append(r)
    return groups
