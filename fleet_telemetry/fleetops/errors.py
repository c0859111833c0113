"""Domain errors of the small writers, sorted by what the caller does with them.

All are :class:`fleet_telemetry.core.errors.UsageError`: the command line prints the message on one
line and exits 2, the command consumer dead-letters the command with ``reason``. The
messages name the offending field or row and never contain secrets.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from fleet_telemetry.core.errors import UsageError


class FleetOpsError(UsageError):
    """Bad input for a writer or query; ``reason`` is the dead-letter reason."""

    reason = "invalid_input"


class InvalidInput(FleetOpsError):
    """A field breaks a rule (out of range, wrong type, end before start, ...)."""

    reason = "invalid_input"


class NotFound(FleetOpsError):
    """The id names no live row (unknown, or soft-deleted)."""

    reason = "not_found"


class Conflict(FleetOpsError):
    """The request contradicts what is stored (a VIN in use, a finished job, ...)."""

    reason = "conflict"


class DoubleBooking(Conflict):
    """The vehicle or driver already has an ACTIVE assignment overlapping the period."""

    reason = "double_booking"

    def __init__(
        self,
        resource: str,
        resource_id: UUID,
        conflicting_id: UUID,
        start: datetime,
        end: datetime | None,
    ) -> None:
        self.resource = resource
        self.resource_id = resource_id
        self.conflicting_id = conflicting_id
        self.start = start
        self.end = end
        until = end.isoformat() if end is not None else "open end"
        super().__init__(
            f"{resource} {resource_id} is already booked by assignment {conflicting_id}"
            f" from {start.isoformat()} to {until}"
        )
