"""What the rules work with: the alert types, the thresholds, what the rules remember
about each vehicle, and what one batch changed.

Pure data: no I/O, no clock, no settings (the engine builds :class:`Thresholds` from
them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from fleet_telemetry.consumers.rules.transitions import FenceState, Position, Transition

# Alert types (alerts.type) and their severities.
OVERSPEED = "overspeed"
LOW_FUEL = "low_fuel"
FUEL_DROP = "fuel_drop"
ENGINE_DTC = "engine_dtc"
OVERHEATING = "overheating"
OFFLINE = "offline"
MAINTENANCE_DUE = "maintenance_due"
GPS_JUMP = "gps_jump"
HARSH_BRAKING = "harsh_braking"
HARSH_ACCELERATION = "harsh_acceleration"
IDLING = "idling"
"""Raised by the trips stage (:mod:`fleet_telemetry.trips`), listed here with the others."""
SEVERITY = {
    OVERSPEED: "warning", LOW_FUEL: "warning", FUEL_DROP: "critical", ENGINE_DTC: "warning",
    OVERHEATING: "critical", OFFLINE: "warning", MAINTENANCE_DUE: "info", GPS_JUMP: "warning",
    HARSH_BRAKING: "warning", HARSH_ACCELERATION: "warning", IDLING: "info",
}
ALERT_TYPES = tuple(SEVERITY)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The rules' settings (``FLEET_ALERT_*``, ``FLEET_GEOFENCE_DWELL_SECONDS``, ``FLEET_BEHAVIOUR_*``)."""

    dwell_seconds: float = 20.0
    """Default minimum dwell before an enter or exit counts."""
    overspeed_kmh: float = 120.0
    overspeed_min_seconds: float = 20.0
    """How long above a limit before ``overspeed`` is raised."""
    low_fuel_percent: float = 10.0
    fuel_hysteresis_percent: float = 5.0
    """Above the low-fuel level by this much resolves ``low_fuel``; a rise this large is a refuel."""
    fuel_drop_percent: float = 8.0
    fuel_drop_seconds: float = 900.0
    """A drop of ``fuel_drop_percent`` while stationary within this window raises ``fuel_drop``."""
    stationary_kmh: float = 3.0
    overheat_c: float = 105.0
    overheat_hysteresis_c: float = 5.0
    offline_seconds: float = 900.0
    """Silent this long raises ``offline``; 0 turns the rule off."""
    max_gps_speed_kmh: float = 300.0
    """A move faster than this is a GPS jump."""
    harsh_braking_mps2: float = 3.5
    """A deceleration at least this strong (m/s², a magnitude) between two readings is harsh braking."""
    harsh_acceleration_mps2: float = 3.0
    """An acceleration at least this strong (m/s²) between two readings is harsh acceleration."""
    behaviour_max_gap_seconds: float = 5.0
    """Two readings further apart than this are never compared for harsh braking or acceleration."""


@dataclass(frozen=True, slots=True)
class AlertAction:
    """``raise`` opens an alert, ``resolve`` closes the open one, ``update`` merges details."""

    action: str
    type: str
    vehicle_id: UUID
    reading_time: datetime
    details: dict[str, Any]
    geofence_id: int | None = None

    @property
    def key(self) -> tuple[UUID, str, int]:
        return (self.vehicle_id, self.type, self.geofence_id or 0)


@dataclass(slots=True)
class VehicleState:
    """What the rules remember about one vehicle (a ``vehicle_rule_state`` row and its
    ``vehicle_geofence_state`` rows)."""

    last_time: datetime | None = None
    """Newest evaluated reading; the row's version."""
    position: Position | None = None
    """Last accepted position (a GPS jump does not move it)."""
    odometer_km: float | None = None
    speeding_since: datetime | None = None
    """Above the global speed limit since then."""
    speeding_max: float | None = None
    rest_fuel: float | None = None
    """Highest fuel level of the current stop, and when it was seen."""
    rest_time: datetime | None = None
    last_fuel: float | None = None
    dtc: tuple[str, ...] | None = None
    """The engine's trouble codes as last reported."""
    suspect: tuple[datetime, float, float] | None = None
    """(time, lat, lon) of the last reading rejected as a GPS jump."""
    last_speed: float | None = None
    """Speed of the newest evaluated reading (at ``last_time``), None when it had none."""
    harsh_since: datetime | None = None
    """A harsh braking or acceleration episode is running since this reading (its type is in
    ``open``); None: none is."""
    harsh_from_kmh: float | None = None
    """The speed the running episode started from."""
    harsh_peak_mps2: float = 0.0
    """The strongest acceleration (negative: deceleration) of the running episode."""
    open: set[str] = field(default_factory=set)
    """Vehicle-level alert types this evaluator raised and has not resolved."""
    episodes: bool = True
    """An overspeed episode (global or in a fence) may be running; not stored."""
    fences: dict[int, FenceState] = field(default_factory=dict)


@dataclass
class Evaluation:
    """What one batch changed."""

    states: dict[UUID, VehicleState] = field(default_factory=dict)
    """The vehicles that had readings to evaluate (their states, changed in place)."""
    urgent: set[UUID] = field(default_factory=set)
    """Vehicles with transitions or alert actions: their state is written with them."""
    fences_changed: set[UUID] = field(default_factory=set)
    transitions: list[Transition] = field(default_factory=list)
    actions: list[AlertAction] = field(default_factory=list)
    back_online: list[UUID] = field(default_factory=list)
    """Vehicles that may have an open offline alert for this batch to resolve."""
    late: int = 0
