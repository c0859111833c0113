"""Each vehicle's side of each geofence: enters and exits confirmed after a minimum
dwell, and crossings of fences between two sparse readings.

Pure code: no I/O, no clock. :func:`advance` moves one vehicle's geofence state over
one reading and returns the transitions it confirmed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from fleet_telemetry.consumers.rules.geometry import M_PER_DEGREE, Geofence
from fleet_telemetry.consumers.rules.index import NOWHERE, GeofenceIndex
from fleet_telemetry.core.geodesy import sphere_distance_m

# Two readings closer than this are never tested for a crossing: GPS jitter, not travel.
CROSSING_MIN_SEGMENT_M = 50.0


@dataclass(slots=True)
class FenceState:
    """A vehicle's side of one fence; the default (outside, nothing pending) is not stored."""

    inside: bool = False
    """The confirmed side."""
    since: datetime | None = None
    """When the confirmed side began (the first reading on it)."""
    pending_since: datetime | None = None
    """The first reading on the other side, while its dwell has not passed yet."""
    pending_lat: float | None = None
    pending_lon: float | None = None
    speeding_since: datetime | None = None
    """Above the fence's own speed limit since then."""
    speeding_max: float | None = None
    speeding_open: bool = False
    """An overspeed alert for this fence is open."""

    def is_default(self) -> bool:
        return (not self.inside and self.pending_since is None and self.speeding_since is None
                and not self.speeding_open)


@dataclass(frozen=True, slots=True)
class Transition:
    """A confirmed enter or exit (a ``geofence_transitions`` row)."""

    vehicle_id: Any
    geofence_id: int
    kind: str
    """``enter`` or ``exit``."""
    time: datetime
    lat: float
    lon: float
    crossing: bool = False
    """Interpolated between two readings outside the fence."""


class Position(NamedTuple):
    """Where a vehicle was accepted to be, and what the fences made of that point."""

    time: datetime
    lat: float
    lon: float
    inside: frozenset[int] = NOWHERE
    """Fences that covered this point."""
    key: int = -1
    """Its grid cell."""
    settled: bool = False
    """No side change was pending after this reading."""


_new = tuple.__new__
"""``_new(Position, (time, lat, lon, inside, key, settled))`` is ``Position(...)`` without
the Python-level ``__new__`` of a NamedTuple: the hot path builds one per reading."""


def advance(
    vehicle_id: Any,
    fences: dict[int, FenceState],
    index: GeofenceIndex,
    previous: Position | None,
    time: datetime,
    lat: float,
    lon: float,
    default_dwell: float,
    transitions: list[Transition],
) -> Position:
    """Moves a vehicle's fence states over one reading (in event-time order).

    ``fences`` (fence id -> state) is updated in place and the confirmed transitions
    are appended to ``transitions``. A side change is confirmed once the new side has
    held for the fence's minimum dwell (its own ``dwell_seconds``, else
    ``default_dwell``); the transition is dated at the first reading on the new side. A
    flip back before then is jitter and leaves no trace. When the previous reading and
    this one are both outside a fence, at least :data:`CROSSING_MIN_SEGMENT_M` and the
    fence's minimum dwell apart, and the straight line between them passes through the
    fence, an enter and an exit are recorded at the interpolated times (sparse readings
    jumping across a small fence). Readings closer in time than the dwell are not tested:
    a visit between them would be shorter than the dwell, which does not count either.

    The common reading costs a few operations: one of a vehicle outside every fence, with
    no fence anywhere near it or the previous reading (:meth:`GeofenceIndex.apart`), is
    only placed.
    """
    cell = index.cell
    ix, iy = int(lon // cell), int(lat // cell)
    key = (ix << 20) + iy
    if not fences and (index.apart(ix, iy, lon, lat) if previous is None
                       else index.apart(ix, iy, previous.lon, previous.lat)):
        return _new(Position, (time, lat, lon, NOWHERE, key, True))  # no fence here, nor on the way
    inside_now, clear = index.locate(key, lon, lat)
    settled = True
    if (fences or inside_now) and not (
        previous is not None and previous.settled and inside_now == previous.inside
    ):
        settled = _sides(vehicle_id, fences, index, inside_now, time, lat, lon, default_dwell, transitions)
    if (previous is not None and not (clear and key == previous.key)
            and abs(lon - previous.lon) + abs(lat - previous.lat) >= CROSSING_MIN_SEGMENT_M / M_PER_DEGREE):
        gap = (time - previous.time).total_seconds()
        if gap >= min(default_dwell, index.shortest_dwell):
            near = index.near_segment(previous.lon, previous.lat, lon, lat)
            if near:
                _crossings(vehicle_id, fences, near, previous, time, lat, lon, inside_now, gap, default_dwell,
                           transitions)
    return _new(Position, (time, lat, lon, inside_now, key, settled))


def _sides(
    vehicle_id: Any, fences: dict[int, FenceState], index: GeofenceIndex, inside_now: frozenset[int],
    time: datetime, lat: float, lon: float, default_dwell: float, transitions: list[Transition],
) -> bool:
    """Each fence's side after a reading covered by ``inside_now``; returns whether no side
    change is left pending."""
    settled = True
    known = index.fences
    for fid in set(fences) | inside_now:
        if fid not in known:
            del fences[fid]  # the fence was removed or deactivated
            continue
        state = fences.get(fid)
        if state is None:
            state = fences[fid] = FenceState()
        now_inside = fid in inside_now
        if now_inside == state.inside:
            state.pending_since = state.pending_lat = state.pending_lon = None
        else:
            if state.pending_since is None:
                state.pending_since, state.pending_lat, state.pending_lon = time, lat, lon
            if (time - state.pending_since).total_seconds() >= _dwell(known[fid], default_dwell):
                state.inside = now_inside
                state.since = state.pending_since
                assert state.pending_lat is not None and state.pending_lon is not None
                transitions.append(Transition(vehicle_id, fid, "enter" if now_inside else "exit",
                                              state.pending_since, state.pending_lat, state.pending_lon))
                state.pending_since = state.pending_lat = state.pending_lon = None
            else:
                settled = False
        if state.is_default():
            del fences[fid]
    return settled


def _dwell(fence: Geofence, default_dwell: float) -> float:
    """A fence's minimum dwell: its own, else the default."""
    return fence.dwell_seconds if fence.dwell_seconds is not None else default_dwell


def _crossings(
    vehicle_id: Any, fences: dict[int, FenceState], near: Sequence[Geofence], previous: Position,
    time: datetime, lat2: float, lon2: float, inside_now: frozenset[int], seconds: float, default_dwell: float,
    out: list[Transition],
) -> None:
    """The fences of ``near`` the segment from ``previous`` passes through, both ends outside."""
    lon1, lat1 = previous.lon, previous.lat
    candidates = [f for f in near if f.id not in previous.inside and f.id not in inside_now]
    if not candidates or sphere_distance_m(lon1, lat1, lon2, lat2) < CROSSING_MIN_SEGMENT_M:
        return
    for fence in candidates:
        fid = fence.id
        state = fences.get(fid)
        if state is not None and (state.inside or state.pending_since is not None):
            continue
        if seconds < _dwell(fence, default_dwell):
            continue  # readings this close would have seen a visit long enough to count
        hit = fence.crossing(lon1, lat1, lon2, lat2)
        if hit is None:
            continue
        for kind, s in (("enter", hit[0]), ("exit", hit[1])):
            out.append(Transition(
                vehicle_id, fid, kind, previous.time + timedelta(seconds=seconds * s),
                lat1 + (lat2 - lat1) * s, lon1 + (lon2 - lon1) * s, crossing=True,
            ))
