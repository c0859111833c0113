"""Every Redis key the project writes or reads, named in one place (docs/interface.md, "Redis keys").

Each name starts with ``FLEET_REDIS_KEY_PREFIX`` (empty by default), so deployments that
share one Redis (two databases, staging beside production) keep apart: give each its own
prefix, e.g. ``fleet-a:``. The prefix is used as written; end it with ``:`` to keep the
usual ``a:b:c`` look.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class RedisKeys:
    """The key names of one deployment."""

    prefix: str = ""

    def vehicle_status(self, vehicle_id: UUID | str) -> str:
        """Hash: a vehicle's live status."""
        return f"{self.prefix}vehicle:{vehicle_id}:status"

    def vehicle_newest(self, vehicle_id: UUID | str) -> str:
        """String: the time of the newest status ever written for the vehicle."""
        return f"{self.prefix}vehicle:{vehicle_id}:status:newest"

    def geofence(self, geofence_id: int) -> str:
        """GEO set: the vehicles inside an active geofence."""
        return f"{self.prefix}geofence:{geofence_id}"

    @property
    def dashboard(self) -> str:
        """String: the cached dashboard aggregates (its ``:lock`` and ``:version`` beside it)."""
        return f"{self.prefix}dashboard:stats:daily"


NO_PREFIX = RedisKeys()
"""The key names with an empty prefix (the default)."""
