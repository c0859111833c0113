"""``fleet services up|down|status``: the local stack on loopback."""

from __future__ import annotations

from fleet_telemetry.deploy.services import register

__all__ = ["register"]
