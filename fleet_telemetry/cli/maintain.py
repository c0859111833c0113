"""``fleet maintain``: the time-series lifecycle pass."""

from __future__ import annotations

from fleet_telemetry.lifecycle.maintain import register

__all__ = ["register"]
