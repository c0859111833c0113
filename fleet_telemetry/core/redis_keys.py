"""Every Redis key the project writes or reads, named in one place (docs/interface.md, "Redis keys").

Each name starts with ``FLEET_REDIS_KEY_PREFIX`` (empty by default), so deployments that
share one Redis (two databases, staging beside production) keep apart: give each its own
prefix, e.g. ``fleet-a:``. The prefix is used as written; end it with ``:`` to keep the
usual ``a:b:c`` look.

On a Redis Cluster (``hash_tags``) the keys that one script or transaction touches
together carry a hash tag, so they live in one slot: a vehicle's status and newest time
(``vehicle:{<id>}:status``, ``vehicle:{<id>}:status:newest``) and the dashboard cache with
its lock and version (``{dashboard:stats:daily}``, ``...:lock``, ``...:version``). The
geofence sets are used one key per command and keep their names; the session keys
(``user:{<id>}:session``, ``driver:{<id>}:session``) are tagged like the vehicle keys, so
a user's and their driver's key live in different slots and are read with a GET each.
A prefix holding braces would put every key of the deployment in one slot: leave braces
out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class RedisKeys:
    """The key names of one deployment."""

    prefix: str = ""
    hash_tags: bool = False
    """Redis Cluster: keys used together share a hash tag (module docstring)."""

    def vehicle_status(self, vehicle_id: UUID | str) -> str:
        """Hash: a vehicle's live status."""
        if self.hash_tags:
            return f"{self.prefix}vehicle:{{{vehicle_id}}}:status"
        return f"{self.prefix}vehicle:{vehicle_id}:status"

    def vehicle_newest(self, vehicle_id: UUID | str) -> str:
        """String: the time of the newest status ever written for the vehicle."""
        if self.hash_tags:
            return f"{self.prefix}vehicle:{{{vehicle_id}}}:status:newest"
        return f"{self.prefix}vehicle:{vehicle_id}:status:newest"

    def geofence(self, geofence_id: int) -> str:
        """GEO set: the vehicles inside an active geofence."""
        return f"{self.prefix}geofence:{geofence_id}"

    def user_session(self, user_id: UUID | str) -> str:
        """String: when the user's command tokens were last revoked (epoch seconds)."""
        if self.hash_tags:
            return f"{self.prefix}user:{{{user_id}}}:session"
        return f"{self.prefix}user:{user_id}:session"

    def driver_session(self, driver_id: UUID | str) -> str:
        """String: the same for a user who is a driver, under the driver's id."""
        if self.hash_tags:
            return f"{self.prefix}driver:{{{driver_id}}}:session"
        return f"{self.prefix}driver:{driver_id}:session"

    @property
    def dashboard(self) -> str:
        """String: the cached dashboard aggregates (its ``:lock`` and ``:version`` beside it)."""
        if self.hash_tags:
            return f"{self.prefix}{{dashboard:stats:daily}}"
        return f"{self.prefix}dashboard:stats:daily"

    def notify_delivered(self, group: str, event_id: UUID | str) -> str:
        """String with a TTL: ``fleet notify`` of consumer group ``group`` delivered this event."""
        return f"{self.prefix}notify:{group}:delivered:{event_id}"


NO_PREFIX = RedisKeys()
"""The key names with an empty prefix (the default)."""
