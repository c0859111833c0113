"""``fleet replay``: backfills and dead-letter replays."""

from __future__ import annotations

from fleet_telemetry.replay.run import register

__all__ = ["register"]
