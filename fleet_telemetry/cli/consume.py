"""``fleet consume``: the telemetry consumer workers."""

from __future__ import annotations

from fleet_telemetry.consumers.worker import register

__all__ = ["register"]
