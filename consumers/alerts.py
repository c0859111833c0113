"""The rules stage's former import path: :class:`RuleEngine` lives in
:mod:`fleet_telemetry.consumers.rules`."""

from __future__ import annotations

from fleet_telemetry.consumers.rules import RuleEngine

__all__ = ["RuleEngine"]
