"""``fleet vehicles|drivers|...``: the fleet-operations writers and queries."""

from __future__ import annotations

from fleet_telemetry.fleetops.cli import register

__all__ = ["register"]
