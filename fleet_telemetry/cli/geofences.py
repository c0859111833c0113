"""``fleet geofences ...``: add, list, remove and import geofences."""

from __future__ import annotations

from fleet_telemetry.consumers.geofence_cli import register

__all__ = ["register"]
