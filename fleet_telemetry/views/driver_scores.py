"""Driver scores over a period, from the daily rows ``fleet maintain`` keeps
(``driver_daily_scores``, :mod:`fleet_telemetry.lifecycle.driver_scores`).

The score of a period is the daily formula over its sums: ``max(0, 100 - total penalty
points per 100 km of the total distance)``, None without distance. Days are UTC days,
``start`` and ``end`` both included.
"""

from __future__ import annotations

from datetime import date
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops.errors import InvalidInput, NotFound
from fleet_telemetry.lifecycle.driver_scores import score_of

# One driver's days come from the primary key, every driver's from driver_daily_scores_day_idx.
_PERIOD = """
SELECT s.driver_id, d.name, count(*)::int AS days, sum(s.distance_km) AS distance_km,
       sum(s.harsh_braking)::int AS harsh_braking, sum(s.harsh_acceleration)::int AS harsh_acceleration,
       sum(s.overspeed)::int AS overspeed, sum(s.penalty_points) AS penalty_points
FROM driver_daily_scores AS s
JOIN drivers AS d ON d.id = s.driver_id
WHERE s.day >= $1 AND s.day <= $2 AND ($3::uuid IS NULL OR s.driver_id = $3)
GROUP BY s.driver_id, d.name
ORDER BY d.name NULLS LAST, s.driver_id
"""

MAX_DAYS = 3660


async def driver_scores(conn: asyncpg.Connection, *, start: date, end: date,
                        driver_id: UUID | None = None) -> list[dict[str, Any]]:
    """Per driver with days in ``[start, end]``: days, distance, events, penalty and the
    period's score, by name. Raises InvalidInput for a reversed or overlong period and
    NotFound for an unknown driver."""
    if end < start:
        raise InvalidInput(f"--to ({end}) is before --from ({start})")
    if (end - start).days >= MAX_DAYS:
        raise InvalidInput(f"the period is longer than {MAX_DAYS} days")
    if driver_id is not None and await conn.fetchval("SELECT 1 FROM drivers WHERE id = $1", driver_id) is None:
        raise NotFound(f"no driver with id {driver_id} (see 'fleet drivers list')")
    rows = await conn.fetch(_PERIOD, start, end, driver_id)
    return [{
        "driver_id": str(r["driver_id"]), "name": r["name"], "days": r["days"],
        "distance_km": round(r["distance_km"], 3), "harsh_braking": r["harsh_braking"],
        "harsh_acceleration": r["harsh_acceleration"], "overspeed": r["overspeed"],
        "penalty_points": r["penalty_points"], "score": score_of(r["penalty_points"], r["distance_km"]),
    } for r in rows]


def render_scores(rows: list[dict[str, Any]]) -> str:
    """The rows as a table with a header line."""
    if not rows:
        return "(no scored days in this period)"
    header = ("driver", "days", "distance_km", "braking", "acceleration", "overspeed", "penalty", "score")
    lines = [(r["name"] or r["driver_id"], str(r["days"]), f"{r['distance_km']:.1f}", str(r["harsh_braking"]),
              str(r["harsh_acceleration"]), str(r["overspeed"]), f"{r['penalty_points']:g}",
              "-" if r["score"] is None else f"{r['score']:.1f}") for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out.extend("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
               for line in lines)
    return "\n".join(out)
