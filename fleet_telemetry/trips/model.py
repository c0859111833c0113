"""What the trips state machine works with: its thresholds, one vehicle's motion state,
the trip and stop drafts it carries, and what one run of it changed.

Pure data: no I/O, no clock, no settings (:func:`thresholds_from_settings` reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid5

from fleet_telemetry.core.reading import status_time

if TYPE_CHECKING:
    from fleet_telemetry.core.settings import Settings

IDLING = "idling"
"""The alert type (``alerts.type``) raised while a vehicle idles."""
IDLING_SEVERITY = "info"

TRIPS_NAMESPACE = UUID("0b7d6c52-2f0e-4f1c-9d43-7a1e5c3b8f21")
"""The UUIDv5 namespace of trip and stop ids; never changes, or every id changes with it."""


def trip_id(vehicle_id: UUID, start: datetime) -> UUID:
    """A trip's stable id: the same vehicle and start time always give the same id."""
    return uuid5(TRIPS_NAMESPACE, f"trip|{vehicle_id}|{status_time(start)}")


def stop_id(vehicle_id: UUID, start: datetime) -> UUID:
    """A stop's stable id, like :func:`trip_id`."""
    return uuid5(TRIPS_NAMESPACE, f"stop|{vehicle_id}|{status_time(start)}")


@dataclass(frozen=True, slots=True)
class MotionThresholds:
    """The trips settings (``FLEET_TRIPS_*``), with Traccar-like defaults."""

    moving_kmh: float = 5.0
    """At or above this speed a vehicle is moving."""
    min_duration_s: float = 300.0
    min_distance_km: float = 0.5
    """A movement shorter than both is not a trip."""
    min_stop_s: float = 300.0
    """Halted this long ends the trip at the halt and starts a stop."""
    gap_s: float = 3600.0
    """No reading for this long ends the trip at the last reading before the gap."""
    use_ignition: bool = False
    """Trips run while the ignition is on (where the readings say)."""
    idle_min_s: float = 180.0
    """Ignition on and halted this long is idling (an ``idling`` alert, idle seconds)."""
    max_gps_speed_kmh: float = 300.0
    """A move implying more than this speed is a GPS jump: its distance is left out."""


def thresholds_from_settings(s: Settings) -> MotionThresholds:
    """The thresholds as configured (``FLEET_TRIPS_*``, ``FLEET_ALERT_MAX_GPS_SPEED_KMH``)."""
    return MotionThresholds(
        moving_kmh=s.trips_moving_kmh, min_duration_s=s.trips_min_duration_seconds,
        min_distance_km=s.trips_min_distance_km, min_stop_s=s.trips_min_stop_seconds, gap_s=s.trips_gap_seconds,
        use_ignition=s.trips_use_ignition, idle_min_s=s.trips_idle_min_seconds,
        max_gps_speed_kmh=s.alert_max_gps_speed_kmh,
    )


@dataclass(slots=True)
class TripDraft:
    """A trip being driven: a movement (``confirmed`` once long or far enough to be a trip)."""

    start: datetime
    lat: float
    lon: float
    odometer_km: float
    """The vehicle's accumulators before the start reading."""
    engine_s: float
    confirmed: bool = False
    distance_km: float = 0.0
    halt_distance_km: float = 0.0
    """``distance_km`` when the current halt began: the trip's distance if it ends there."""
    moved_until: datetime | None = None
    """The last reading it was moving at."""
    max_speed: float | None = None
    fuel_start: float | None = None
    fuel_last: float | None = None
    idle_s: float = 0.0


@dataclass(slots=True)
class StopDraft:
    """A stop not ended yet."""

    start: datetime
    lat: float
    lon: float
    idle_s: float = 0.0


@dataclass(slots=True)
class MotionState:
    """What the trips machine remembers about one vehicle (a ``vehicle_motion_state`` row)."""

    last_time: datetime | None = None
    """Newest processed reading; the row's version."""
    lat: float = 0.0
    lon: float = 0.0
    odometer_km: float = 0.0
    engine_s: float = 0.0
    ignition: bool | None = None
    """As last reported (``engine_status.ignition``, or ``rpm`` > 0)."""
    halt_since: datetime | None = None
    """First reading of the current halt (not moving); None while moving."""
    halt_lat: float = 0.0
    halt_lon: float = 0.0
    idle_since: datetime | None = None
    """First reading of the current idling (ignition on, halted)."""
    idle_alert: bool = False
    """An ``idling`` alert is open."""
    trip: TripDraft | None = None
    stop: StopDraft | None = None


@dataclass(frozen=True, slots=True)
class TripRow:
    """A ``trips`` row as the machine decided it (``end`` None: open)."""

    id: UUID
    vehicle_id: UUID
    start: datetime
    start_lat: float
    start_lon: float
    end: datetime | None
    end_lat: float | None
    end_lon: float | None
    distance_km: float | None
    duration_s: float | None
    max_speed_kmh: float | None
    avg_speed_kmh: float | None
    fuel_used_percent: float | None
    idle_s: float
    start_odometer_km: float
    end_odometer_km: float | None
    start_engine_s: float


@dataclass(frozen=True, slots=True)
class StopRow:
    """A ``stops`` row as the machine decided it (``end`` None: open)."""

    id: UUID
    vehicle_id: UUID
    start: datetime
    end: datetime | None
    lat: float
    lon: float
    duration_s: float | None
    idle_s: float


@dataclass(frozen=True, slots=True)
class IdleAction:
    """``raise`` opens the vehicle's ``idling`` alert, ``resolve`` closes it."""

    action: str
    vehicle_id: UUID
    reading_time: datetime
    details: dict[str, Any]


@dataclass
class Changes:
    """What one run of the machine changed, in event-time order per vehicle."""

    trips: list[TripRow] = field(default_factory=list)
    """Trips confirmed (open rows) or ended; a trip may come twice (started, then ended)."""
    stops: list[StopRow] = field(default_factory=list)
    idle: list[IdleAction] = field(default_factory=list)
    urgent: set[UUID] = field(default_factory=set)
    """Vehicles with rows or alerts to write: their state is written with them."""
    late: list[tuple[UUID, datetime]] = field(default_factory=list)
    """(vehicle, time) of readings older than the vehicle's newest processed one."""
