"""The rules of the lifecycle, pure: retentions, schedules, partition names, durations.

No I/O and no clock: every function takes the moment it reasons about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING

from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.trips.model import MotionThresholds, thresholds_from_settings

if TYPE_CHECKING:
    from fleet_telemetry.core.settings import Settings

DAY = timedelta(days=1)

DEFAULT_LOCK_TIMEOUT_SECONDS = 0.5
LOCK_PATIENCE_SECONDS = 5.0

STATS_VIEW = "monthly_vehicle_stats"
REVENUE_VIEW = "monthly_vehicle_revenue"
REPORT_VIEWS = (STATS_VIEW, REVENUE_VIEW)
"""The reporting views the nightly refresh brings up to date (costs and revenue per vehicle
and month); its last run is kept in ``maintenance_runs`` under :data:`STATS_VIEW`."""
TELEMETRY_PREFIX = "vehicle_telemetry_p"
AUDIT_PREFIX = "audit_logs_p"

_TELEMETRY_NAME = re.compile(r"^vehicle_telemetry_p(\d{4})(\d{2})(\d{2})$")
_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class ScoreRules:
    """How a day is scored (``FLEET_BEHAVIOUR_PENALTY_*``, ``FLEET_ALERT_MAX_GPS_SPEED_KMH``)."""

    penalty_harsh_braking: float = 5.0
    penalty_harsh_acceleration: float = 3.0
    penalty_overspeed: float = 5.0
    max_gps_speed_kmh: float = 300.0

    @classmethod
    def from_settings(cls, settings: "Settings") -> "ScoreRules":
        return cls(
            penalty_harsh_braking=settings.behaviour_penalty_harsh_braking,
            penalty_harsh_acceleration=settings.behaviour_penalty_harsh_acceleration,
            penalty_overspeed=settings.behaviour_penalty_overspeed,
            max_gps_speed_kmh=settings.alert_max_gps_speed_kmh,
        )


@dataclass(frozen=True)
class LifecyclePolicy:
    """The retention and upkeep rules of a pass, resolved from the settings."""

    raw_retention_days: int = 30
    hourly_retention_days: int = 365
    daily_retention_days: int = 0
    """0 keeps daily rollups forever."""
    events_retention_days: int = 90
    """Published outbound events older than this are removed; 0 keeps them."""
    partitions_ahead_days: int = 7
    audit_partitions_ahead_months: int = 2
    stats_refresh_hour: int = 3
    lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS
    lock_patience_seconds: float = LOCK_PATIENCE_SECONDS
    """How long lock-taking steps first retry with 20 ms waits
    (see :func:`fleet_telemetry.lifecycle.locks.in_lock_timeout`)."""
    scores: ScoreRules = ScoreRules()
    """How the daily driver scores are computed."""
    motion: MotionThresholds = MotionThresholds()
    """The trips machine's thresholds, for recomputing what late readings touched."""

    @classmethod
    def from_settings(cls, settings: "Settings") -> "LifecyclePolicy":
        """Raises :class:`UsageError` when the retentions do not nest (raw <= hourly <= daily)."""
        policy = cls(
            raw_retention_days=settings.raw_retention_days,
            hourly_retention_days=settings.hourly_retention_days,
            daily_retention_days=settings.daily_retention_days,
            events_retention_days=settings.events_retention_days,
            partitions_ahead_days=settings.partitions_ahead_days,
            audit_partitions_ahead_months=settings.audit_partitions_ahead_months,
            stats_refresh_hour=settings.stats_refresh_hour,
            lock_timeout_seconds=settings.maintain_lock_timeout_seconds,
            scores=ScoreRules.from_settings(settings),
            motion=thresholds_from_settings(settings),
        )
        if policy.hourly_retention_days < policy.raw_retention_days:
            raise UsageError(
                f"FLEET_HOURLY_RETENTION_DAYS ({policy.hourly_retention_days}) must be at least"
                f" FLEET_RAW_RETENTION_DAYS ({policy.raw_retention_days}): hours are rolled up from raw rows"
            )
        if 0 < policy.daily_retention_days < policy.hourly_retention_days:
            raise UsageError(
                f"FLEET_DAILY_RETENTION_DAYS ({policy.daily_retention_days}) must be 0 (forever) or at"
                f" least FLEET_HOURLY_RETENTION_DAYS ({policy.hourly_retention_days})"
            )
        return policy


def parse_every(text: str) -> float:
    """``"5m"`` -> 300.0 seconds; units ``s``, ``m``, ``h`` (plain numbers are seconds).

    Raises :class:`UsageError` for anything else or for zero.
    """
    match = _EVERY.match(text)
    if match is None:
        raise UsageError(f"--every {text!r} is not a duration: use e.g. 30s, 5m or 1h")
    seconds = float(match[1]) * _UNIT_SECONDS[match[2] or "s"]
    if seconds <= 0:
        raise UsageError("--every must be longer than 0 seconds")
    return seconds


# --- days ------------------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def utc_day(moment: datetime) -> datetime:
    """Start of the UTC day of ``moment`` (aware)."""
    moment = moment.astimezone(timezone.utc)
    return datetime(moment.year, moment.month, moment.day, tzinfo=timezone.utc)


def day_start(day: date) -> datetime:
    """Start of ``day`` as a UTC moment."""
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def add_months(day: date, months: int) -> date:
    """The first day of the month ``months`` after ``day``'s month."""
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


# --- retention -------------------------------------------------------------------------


def raw_cutoff(now: datetime, retention_days: int) -> datetime:
    """Raw readings older than this are past retention (the consumer's rule too)."""
    return now - timedelta(days=retention_days)


def expired_raw_days(days: list[date], now: datetime, retention_days: int) -> list[date]:
    """The partition days, oldest first, whose whole UTC day is older than the retention."""
    cutoff = raw_cutoff(now, retention_days)
    return sorted(d for d in days if day_start(d) + DAY <= cutoff)


def rollup_cutoff(now: datetime, retention_days: int) -> datetime:
    """Rollups of UTC days before this one are past a retention of ``retention_days``."""
    return utc_day(now - timedelta(days=retention_days))


# --- the nightly refresh ---------------------------------------------------------------


def last_stats_refresh_slot(now: datetime, hour: int) -> datetime:
    """The latest moment at or before ``now`` at which the nightly refresh was scheduled."""
    slot = utc_day(now) + timedelta(hours=hour)
    return slot if slot <= now else slot - DAY


def stats_refresh_due(last: datetime | None, now: datetime, hour: int) -> bool:
    """True when no refresh happened since the latest scheduled slot (or never)."""
    return last is None or last < last_stats_refresh_slot(now, hour)


# --- partition names -------------------------------------------------------------------


def telemetry_partition_day(name: str) -> date | None:
    """The day of a ``vehicle_telemetry_pYYYYMMDD`` partition name, else None."""
    match = _TELEMETRY_NAME.match(name)
    if match is None:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def telemetry_partition_name(day: date) -> str:
    return f"{TELEMETRY_PREFIX}{day:%Y%m%d}"


def audit_partition_name(month: date) -> str:
    return f"{AUDIT_PREFIX}{month:%Y%m}"
