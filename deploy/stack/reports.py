"""What ``fleet services`` tells its user: the status table (or JSON), the one-line
summary of what is unusable, and the progress lines of ``up`` and ``down`` on stderr.

The sentences that recur (a service answers, is not answering, is waited for) are built
here, once.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from fleet_telemetry.deploy.stack.addresses import LABELS, POSTGRESQL

TANSU_MEMORY_NOTE = "Tansu keeps topics and messages in memory only: they are gone when it stops"


# --- lines on stderr ------------------------------------------------------------------


def say(message: str) -> None:
    """One progress line of ``fleet services`` on stderr."""
    sys.stderr.write(f"services: {message}\n")
    sys.stderr.flush()


def not_answering_at(label: str, address: str) -> str:
    return f"{label} is not answering at {address}"


def answers_at(label: str, address: str, note: str = "") -> str:
    return f"{label} answers at {address}" + (f"; {note}" if note else "")


def waiting_for(label: str, address: str, timeout: float) -> str:
    return f"waiting for {label} at {address} (up to {timeout:g} s)"


def using_as_is(label: str, address: str) -> str:
    return answers_at(label, address, "using it as is")


# --- the status of each service ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Report:
    """One row of ``fleet services status``."""

    service: str
    address: str
    answers: bool
    ok: bool
    detail: str
    started_by_fleet: bool = False
    postgis: str | None = None

    @property
    def label(self) -> str:
        return LABELS[self.service]

    def as_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "service": self.service,
            "address": self.address,
            "answers": self.answers,
            "ok": self.ok,
            "detail": self.detail,
            "started_by_fleet": self.started_by_fleet,
        }
        if self.service == POSTGRESQL:
            row["postgis"] = self.postgis
        return row


def format_table(reports: Sequence[Report]) -> str:
    rows = [("SERVICE", "ADDRESS", "STATE")]
    rows += [(r.label, r.address, r.detail) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(
        f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}" for row in rows
    )


def problem_summary(reports: Sequence[Report]) -> str:
    """One line naming every service that is not usable, for stderr."""
    parts = []
    for r in reports:
        if not r.answers:
            parts.append(not_answering_at(r.label, r.address))
        elif not r.ok:
            parts.append(f"{r.label} at {r.address}: {r.detail}")
    return "; ".join(parts) + "; run 'fleet services up' to start what is missing"


def print_reports(reports: Sequence[Report], as_json: bool) -> None:
    """The table, or with ``as_json`` one JSON document, on stdout."""
    if as_json:
        payload = {"ok": all(r.ok for r in reports), "services": [r.as_json() for r in reports]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        sys.stdout.write(format_table(reports) + "\n")
    sys.stdout.flush()
