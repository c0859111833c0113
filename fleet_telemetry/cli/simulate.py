"""``fleet simulate``: a simulated fleet publishing telemetry."""

from __future__ import annotations

from fleet_telemetry.ingest.simulate import register

__all__ = ["register"]
