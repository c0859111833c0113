"""``fleet migrate``: applies the schema migrations."""

from __future__ import annotations

from fleet_telemetry.schema.migrate import register

__all__ = ["register"]
