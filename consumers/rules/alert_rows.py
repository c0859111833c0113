"""A batch's alert actions reduced to rows: what to insert, resolve and update.

Pure code. Every open alert is one row per (vehicle, type, geofence); the actions of a
batch are planned so that three set-based statements write them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

from fleet_telemetry.consumers.rules.model import AlertAction


@dataclass
class AlertRows:
    """A batch's alert actions reduced to three set-based statements."""

    resolves: list[AlertAction] = field(default_factory=list)
    """Close the alert opened by an earlier batch."""
    updates: list[AlertAction] = field(default_factory=list)
    """Merge details into the alert opened by an earlier batch."""
    inserts: list[tuple[AlertAction, AlertAction | None]] = field(default_factory=list)
    """(raise, its resolve in this same batch or None)."""


def plan_alert_rows(actions: Sequence[AlertAction]) -> AlertRows:
    """Orders a batch's actions per (vehicle, type, geofence) into rows to write.

    The actions of one key alternate raise/resolve (the rules only raise what is not
    open); an alert raised and resolved inside the batch becomes one resolved row.
    """
    rows = AlertRows()
    raised: dict[tuple[UUID, str, int], int] = {}  # key -> its open row in rows.inserts
    for action in actions:
        key = action.key
        if action.action == "raise":
            raised[key] = len(rows.inserts)
            rows.inserts.append((action, None))
        elif key in raised:
            i = raised[key]
            opened, closing = rows.inserts[i]
            if action.action == "resolve":
                rows.inserts[i] = (opened, action)
                del raised[key]
            else:
                rows.inserts[i] = (replace(opened, details={**opened.details, **action.details}), closing)
        elif action.action == "resolve":
            rows.resolves.append(action)
        else:
            rows.updates.append(action)
    return rows


def resolved_details(closing: AlertAction) -> dict[str, Any]:
    """The details a resolve merges into its alert: its own and the reading that closed it."""
    return {**closing.details, "resolved_reading_time": closing.reading_time.isoformat()}


def inserted_details(opened: AlertAction, closing: AlertAction | None) -> dict[str, Any]:
    """The details of an inserted row: the raise's, and its resolve's when closed in the same batch."""
    return opened.details if closing is None else {**opened.details, **resolved_details(closing)}
