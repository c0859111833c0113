"""The outbound event stream, version 1: what the pipeline tells subscribers happened.

Every alert raised and resolved, geofence entered and exited, trip started and ended and
stop started and ended becomes one :class:`FleetEvent`, published to ``FLEET_EVENTS_TOPIC``
keyed by vehicle id with the JSON value of :meth:`FleetEvent.to_json`::

    {"id": "…uuid…", "type": "trip.ended", "vehicle_id": "…", "driver_id": "…" | null,
     "time": "2026-11-25T08:00:00.000000Z", "data": {…}}

``id`` is derived from the fact alone (:func:`event_id`): the same fact, published again by
a replay, a redelivery or a recomputation, has the same id, so subscribers drop repeats.
``time`` is the reading time the fact happened at. The stages that find facts insert them
into the ``fleet_events`` outbox (:func:`record_events`) in the transaction that writes the
rows they describe; the events step publishes them before the batch's offsets are committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from uuid import UUID, uuid5

import asyncpg
import orjson

from fleet_telemetry.core.reading import status_time

ALERT_RAISED: Final = "alert.raised"
ALERT_RESOLVED: Final = "alert.resolved"
GEOFENCE_ENTERED: Final = "geofence.entered"
GEOFENCE_EXITED: Final = "geofence.exited"
TRIP_STARTED: Final = "trip.started"
TRIP_ENDED: Final = "trip.ended"
STOP_STARTED: Final = "stop.started"
STOP_ENDED: Final = "stop.ended"
EVENT_TYPES: Final = (ALERT_RAISED, ALERT_RESOLVED, GEOFENCE_ENTERED, GEOFENCE_EXITED,
                      TRIP_STARTED, TRIP_ENDED, STOP_STARTED, STOP_ENDED)

EVENT_NAMESPACE: Final = UUID("6f3c2b1e-9a51-4c1b-8d0e-5b7f2a4c9e10")
"""The UUIDv5 namespace of event ids; never changes, or every id changes with it."""


def event_id(type_: str, vehicle_id: UUID, time: datetime, *fact: object) -> UUID:
    """The stable id of one fact: UUIDv5 of its type, vehicle, reading time (fixed-width UTC
    text) and whatever else tells it apart (an alert's type, a geofence id, a trip's start).
    The same arguments always give the same id, on any machine."""
    parts = [type_, str(vehicle_id), status_time(time), *(str(p) for p in fact)]
    return uuid5(EVENT_NAMESPACE, "|".join(parts))


@dataclass(frozen=True, slots=True)
class FleetEvent:
    """One fact for subscribers. ``driver_id`` None means no ACTIVE assignment covered
    ``time`` (or it is not known yet: :func:`record_events` fills it from the assignments)."""

    id: UUID
    type: str
    vehicle_id: UUID
    time: datetime
    data: dict[str, Any] = field(default_factory=dict)
    driver_id: UUID | None = None

    @classmethod
    def of(cls, type_: str, vehicle_id: UUID, time: datetime, data: dict[str, Any] | None = None,
           *fact: object, driver_id: UUID | None = None) -> FleetEvent:
        """The event of a fact, its id from ``type_``, ``vehicle_id``, ``time`` and ``fact``."""
        return cls(event_id(type_, vehicle_id, time, *fact), type_, vehicle_id, time, data or {}, driver_id)

    def key(self) -> bytes:
        """The Kafka key: the vehicle id as text, so a vehicle's events keep their order."""
        return str(self.vehicle_id).encode()

    def to_json(self) -> bytes:
        """The Kafka value (the format above)."""
        return orjson.dumps({
            "id": str(self.id), "type": self.type, "vehicle_id": str(self.vehicle_id),
            "driver_id": None if self.driver_id is None else str(self.driver_id),
            "time": status_time(self.time), "data": self.data,
        })


_RECORD = """
INSERT INTO fleet_events (id, type, vehicle_id, driver_id, time, data)
SELECT u.id, u.type, u.v, coalesce(u.driver, fleet_driver_at(u.v, u.t)), u.t, u.data
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::timestamptz[], $6::jsonb[])
     AS u(id, type, v, driver, t, data)
ON CONFLICT (id) DO NOTHING
RETURNING id, driver_id
"""


async def record_events(conn: asyncpg.Connection, events: Sequence[FleetEvent]) -> list[FleetEvent]:
    """Inserts ``events`` into the ``fleet_events`` outbox inside the caller's transaction;
    returns those that were new (a fact recorded before inserts nothing), with ``driver_id``
    filled from the vehicle's ACTIVE assignment at the event's time where it was None.
    The caller hands the returned events on to be published once its transaction commits."""
    if not events:
        return []
    rows = await conn.fetch(
        _RECORD, [e.id for e in events], [e.type for e in events], [e.vehicle_id for e in events],
        [e.driver_id for e in events], [e.time for e in events], [e.data for e in events],
    )
    drivers = {r["id"]: r["driver_id"] for r in rows}
    return [FleetEvent(e.id, e.type, e.vehicle_id, e.time, e.data, drivers[e.id])
            for e in events if e.id in drivers]
