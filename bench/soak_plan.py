"""When the fault soak causes which fault, and running that plan beside the stream.

The faults come one at a time, in a seeded random order, at seeded random moments
spread over the stream from a tenth of its length on; each must be over by nine tenths
of it, so every vehicle sends again after the last fault (Redis statuses are best
effort and catch up with a vehicle's next reading). A fault whose moment came too late
(the ones before it ran long) is left out and reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from random import Random
from typing import Any

KILL, POSTGRES, REDIS, BROKER = "worker kill", "PostgreSQL outage", "Redis outage", "broker restart"
RESTART_SECONDS = 4.0
"""About how long ``fleet consume`` takes to stop and start again, for planning."""


@dataclass(frozen=True)
class Planned:
    kind: str
    at_s: float
    """Seconds after the stream started."""
    seconds: float
    """How long the fault lasts (the outage; for a kill, the time the survivors run alone)."""

    def latest_start(self, stream_seconds: float) -> float:
        extra = RESTART_SECONDS if self.kind in (KILL, BROKER) else 1.0
        return 0.9 * stream_seconds - self.seconds - extra


def plan_faults(rng: Random, stream_seconds: float, kills: int, alone_seconds: float,
                outages: dict[str, float]) -> list[Planned]:
    """``kills`` worker kills and one of each outage of ``outages`` (kind -> seconds; 0
    leaves it out), shuffled, one per equal slot of [0.1, 0.75] of the stream, each at a
    random moment in the first half of its slot."""
    faults = [(KILL, alone_seconds)] * kills + [(kind, s) for kind, s in outages.items() if s > 0]
    rng.shuffle(faults)
    if not faults:
        return []
    start, end = 0.1 * stream_seconds, 0.75 * stream_seconds
    slot = (end - start) / len(faults)
    return [Planned(kind, round(start + i * slot + rng.uniform(0, slot / 2), 1), seconds)
            for i, (kind, seconds) in enumerate(faults)]


Action = Callable[[Planned], Awaitable[str]]
"""Causes one fault and waits until it is over; returns what it did, in words."""


async def run_plan(plan: list[Planned], act: Action, since_start: Callable[[], float], stream_seconds: float,
                   say: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Causes the planned faults in order; returns (the ones done, the ones left out)."""
    done: list[dict[str, Any]] = []
    left_out: list[dict[str, Any]] = []
    for fault in plan:
        wait = fault.at_s - since_start()
        if wait > 0:
            await asyncio.sleep(wait)
        began = since_start()
        if began > fault.latest_start(stream_seconds):
            left_out.append({"fault": fault.kind, "planned_at_s": fault.at_s, "why": "no time left in the stream"})
            say(f"faults: {fault.kind} left out, no time left in the stream ({began:.0f} s)")
            continue
        say(f"faults: {began:.1f} s: {fault.kind} ({fault.seconds:g} s)")
        what = await act(fault)
        done.append({"fault": fault.kind, "at_s": round(began, 1), "took_s": round(since_start() - began, 1),
                     "what": what})
        say(f"faults: {since_start():.1f} s: {fault.kind} over: {what}")
    return done, left_out
