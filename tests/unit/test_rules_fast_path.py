"""The rules' shortcuts change nothing: on random fences and random tracks, the grid index
(block candidates, readings far from every fence skipped) decides exactly what testing
every fence for every point and every segment decides, and a stream evaluated in batches
of any size ends where the same stream evaluated in one batch ends (pure, no services)."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import astuple
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from fleet_telemetry.consumers.rules.evaluate import evaluate
from fleet_telemetry.core.reading import by_vehicle
from fleet_telemetry.consumers.rules.geometry import M_PER_DEGREE, Geofence, Ring, make_geofence
from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.model import AlertAction, Evaluation, Thresholds, VehicleState
from fleet_telemetry.core.reading import Reading, Source

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
NOW = T0 + timedelta(days=1)
SOURCE = Source("t", 0, 0)


class EveryFence(GeofenceIndex):
    """The straightforward index: every fence tested exactly for every point, every fence a
    candidate for every segment (its own bounding box test decides), nothing skipped."""

    def locate(self, key: int, lon: float, lat: float) -> tuple[frozenset[int], bool]:
        return frozenset(f.id for f in self.fences.values() if f.covers(lon, lat)), False

    def apart(self, ix: int, iy: int, lon: float, lat: float) -> bool:
        return False

    def near_segment(self, lon1: float, lat1: float, lon2: float, lat2: float) -> Sequence[Geofence]:
        return list(self.fences.values())


def star(rng: random.Random, cx: float, cy: float, r_min: float, r_max: float, n: int) -> Ring:
    """A closed ring, star-shaped around (cx, cy), as (longitudes, latitudes)."""
    angles = [(i + rng.uniform(0.1, 0.9)) * 2 * math.pi / n for i in range(n)]
    points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in ((rng.uniform(r_min, r_max), a) for a in angles)]
    points.append(points[0])
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def random_fences(rng: random.Random, lon0: float, lat0: float, count: int, spread: float = 0.3) -> list[Geofence]:
    """Circles (some larger than the grid takes), rectangles, stars with holes, multipolygons."""
    fences: list[Geofence] = []
    for i in range(1, count + 1):
        lon, lat = lon0 + rng.uniform(-spread, spread), lat0 + rng.uniform(-spread, spread) * 0.7
        limit = rng.choice((None, None, 30.0, 60.0))
        dwell = rng.choice((None, None, 0.0, 45.0, 600.0))
        kind = rng.random()
        if kind < 0.35:
            radius = rng.choice((40.0, 300.0, 1500.0, 4000.0)) if rng.random() < 0.95 else rng.uniform(60_000, 90_000)
            fences.append(make_geofence(i, "c", "circle", center=(lon, lat), radius_m=radius,
                                        speed_limit_kmh=limit, dwell_seconds=dwell))
            continue
        size = rng.choice((0.0005, 0.003, 0.01, 0.04))
        if kind < 0.6:
            w, h = size * rng.uniform(0.3, 1.5), size * rng.uniform(0.3, 1.5)
            rings: tuple[Ring, ...] = (((lon, lon + w, lon + w, lon, lon), (lat, lat, lat + h, lat + h, lat)),)
        else:
            outer = star(rng, lon, lat, size * 0.5, size, rng.randint(5, 12))
            rings = (outer, star(rng, lon, lat, size * 0.1, size * 0.3, 5)) if rng.random() < 0.4 else (outer,)
        polygons: tuple[tuple[Ring, ...], ...] = (rings,)
        if rng.random() < 0.2:
            polygons += ((star(rng, lon + 3 * size, lat, size * 0.4, size * 0.8, 6),),)
        fences.append(make_geofence(i, "p", "polygon", polygons=polygons, speed_limit_kmh=limit, dwell_seconds=dwell))
    return fences


def interesting_points(rng: random.Random, fences: list[Geofence], cell: float) -> list[tuple[float, float]]:
    """Fence vertices and edge points (and a hair off them), grid lines and corners."""
    points: list[tuple[float, float]] = []
    for f in fences:
        if f.center is not None:
            assert f.radius_m is not None
            a = rng.uniform(0, 2 * math.pi)
            k = M_PER_DEGREE * math.cos(math.radians(f.center[1]))
            for scale in (1.0, 1 - 1e-9, 1 + 1e-9, 1.02, 0.98):
                points.append((f.center[0] + f.radius_m * scale * math.cos(a) / k,
                               f.center[1] + f.radius_m * scale * math.sin(a) / M_PER_DEGREE))
            continue
        for rings in f.polygons:
            for xs, ys in rings:
                i = rng.randrange(1, len(xs))
                t = rng.random()
                x, y = xs[i - 1] + t * (xs[i] - xs[i - 1]), ys[i - 1] + t * (ys[i] - ys[i - 1])
                points += [(xs[i], ys[i]), (x, y), (x + 1e-12, y), (x, y - 1e-9)]
    for _ in range(len(fences)):
        x, y = rng.choice(points)
        gx, gy = math.floor(x / cell) * cell, math.floor(y / cell) * cell
        points += [(gx, y), (x, gy), (gx, gy), (math.floor(x / (8 * cell)) * 8 * cell, gy)]
    return points


Pass = tuple[tuple[float, float], tuple[float, float]]


def passes(rng: random.Random, fences: list[Geofence], cell: float) -> list[Pass]:
    """Pairs of points on either side of a fence, up to a few blocks of cells away from it:
    one reading, then the next, across it (or just past it)."""
    out = []
    for f in fences:
        x0, y0, x1, y1 = f.bbox
        cx, cy, reach = (x0 + x1) / 2, (y0 + y1) / 2, math.hypot(x1 - x0, y1 - y0) / 2
        for _ in range(3):
            a = rng.uniform(0, 2 * math.pi)
            d1, d2 = (reach + rng.uniform(0, 24) * cell for _ in range(2))
            off = rng.uniform(-1.2, 1.2) * reach
            ux, uy = math.cos(a), math.sin(a)
            out.append(((cx - ux * d1 - uy * off, cy - uy * d1 + ux * off),
                        (cx + ux * d2 - uy * off, cy + uy * d2 + ux * off)))
    return out


def reading(vid: uuid.UUID, seconds: float, lon: float, lat: float, rng: random.Random) -> Reading:
    speed = rng.choice((None, 0.0, 2.0, 25.0, 45.0, 70.0, 95.0, 130.0, 140.0))
    fuel = rng.choice((None, 60.0, 59.0, 58.5, 50.0, 9.0, 7.0, 80.0))
    engine = rng.choice((None, {}, {"coolant_temp_c": 90.0, "dtc": []}, {"coolant_temp_c": 108.0},
                         {"coolant_temp_c": 99.0, "dtc": ["P0301"]}, {"dtc": ["P0420", "P0301"]}))
    return Reading(vid, T0 + timedelta(seconds=seconds), lat, lon, speed, fuel, None, None, engine, SOURCE, None, b"")


def random_track(rng: random.Random, vid: uuid.UUID, lon0: float, lat0: float, points: list[tuple[float, float]],
                 pairs: list[Pass], n: int) -> list[Reading]:
    """Drives, jitters, stops, jumps to fence edges and grid lines, passes by fences between
    two readings, and the odd GPS jump."""
    out: list[Reading] = []
    seconds = 0.0
    lon, lat = lon0 + rng.uniform(-0.3, 0.3), lat0 + rng.uniform(-0.2, 0.2)
    for _ in range(n):
        seconds += rng.choice((1.0, 5.0, 15.0, 30.0, 60.0, 144.0, 300.0, 900.0))
        move = rng.random()
        if move < 0.15:
            (lon, lat), after = rng.choice(pairs)
            out.append(reading(vid, seconds, lon, lat, rng))
            seconds += rng.choice((60.0, 144.0, 600.0))
            lon, lat = after
        elif move < 0.4:
            lon, lat = rng.choice(points)
        elif move < 0.7:
            km = rng.uniform(0.0, 4.0)
            heading = rng.uniform(0, 2 * math.pi)
            lon += km * math.sin(heading) / 111.32 / math.cos(math.radians(lat))
            lat += km * math.cos(heading) / 111.32
        elif move < 0.85:
            lon, lat = lon + rng.uniform(-2e-5, 2e-5), lat + rng.uniform(-2e-5, 2e-5)
        elif move < 0.97:
            pass  # parked
        else:
            lon, lat = lon + rng.uniform(-1, 1), lat + rng.uniform(-1, 1)  # a jump
        out.append(reading(vid, seconds, lon, lat, rng))
    return out


def evaluate_in_batches(index: GeofenceIndex, th: Thresholds, readings: list[Reading],
                        sizes: Sequence[int]) -> tuple[dict[uuid.UUID, VehicleState], list[Evaluation]]:
    states: dict[uuid.UUID, VehicleState] = {}
    results = []
    start = 0
    for size in sizes:
        groups = by_vehicle(readings[start:start + size])
        start += size
        for vid in groups:
            states.setdefault(vid, VehicleState())
        results.append(evaluate(states, groups, index, th, NOW))
    return states, results


def decided(results: list[Evaluation]) -> tuple[list[Any], dict[tuple[uuid.UUID, str, int], list[AlertAction]]]:
    """The transitions, and the actions of each alert (vehicle, type, geofence) in order: what
    is written (the order between fences, or between vehicles, is no decision)."""
    transitions = sorted(astuple(t) for r in results for t in r.transitions)
    actions: dict[tuple[uuid.UUID, str, int], list[AlertAction]] = {}
    for r in results:
        for a in r.actions:
            actions.setdefault(a.key, []).append(a)
    return transitions, actions


def remembered(states: dict[uuid.UUID, VehicleState]) -> dict[uuid.UUID, Any]:
    """Everything a state holds but the grid cell and the settled flag of its position."""
    out = {}
    for vid, vs in states.items():
        p = vs.position
        out[vid] = (None if p is None else (p.time, p.lat, p.lon, p.inside), vs.last_time, vs.odometer_km,
                    vs.speeding_since, vs.speeding_max, vs.rest_fuel, vs.rest_time, vs.last_fuel, vs.dtc,
                    vs.suspect, vs.open, vs.fences, vs.last_speed, vs.harsh_since, vs.harsh_from_kmh,
                    vs.harsh_peak_mps2)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_the_grid_index_decides_what_testing_every_fence_decides(seed: int) -> None:
    rng = random.Random(seed)
    lon0, lat0 = rng.uniform(-170, 170), rng.uniform(-60, 60)
    # Dense fences (most cells near one), or few and far apart (most blocks empty).
    fences = random_fences(rng, lon0, lat0, 60) if seed % 2 else random_fences(rng, lon0, lat0, 12, spread=1.5)
    index, everything = GeofenceIndex(fences), EveryFence(fences)
    points = interesting_points(rng, fences, index.cell)
    pairs = passes(rng, fences, index.cell)
    vehicles = [uuid.UUID(int=seed * 1000 + v) for v in range(12)]
    readings = [r for vid in vehicles for r in random_track(rng, vid, lon0, lat0, points, pairs, 80)]
    rng.shuffle(readings)  # arrival order is not event-time order
    th = Thresholds(dwell_seconds=rng.choice((0.0, 20.0, 60.0)), overspeed_min_seconds=rng.choice((0.0, 20.0)))

    fast_states, fast = evaluate_in_batches(index, th, readings, [len(readings)])
    slow_states, slow = evaluate_in_batches(everything, th, readings, [len(readings)])
    assert decided(fast) == decided(slow)
    assert remembered(fast_states) == remembered(slow_states)
    assert sum(len(r.transitions) for r in fast) > 20  # the tracks do meet the fences

    # The same stream in time order, in one batch, in batches of any size, one reading at a
    # time: the same decisions, the same states.
    in_order = sorted(readings, key=lambda r: r.time)
    sizes: list[int] = []
    while sum(sizes) < len(in_order):
        sizes.append(rng.choice((1, 2, 7, 50, 300)))
    whole_states, whole = evaluate_in_batches(index, th, in_order, [len(in_order)])
    for split in (sizes, [1] * len(in_order)):
        states, results = evaluate_in_batches(index, th, in_order, split)
        assert sum(r.late for r in results) == 0
        assert decided(results) == decided(whole)
        assert remembered(states) == remembered(whole_states)


def test_every_segment_that_meets_a_fence_finds_it_among_the_candidates() -> None:
    rng = random.Random(99)
    for case in range(6):
        lon0, lat0 = rng.uniform(-170, 170), rng.uniform(-70, 70)
        fences = random_fences(rng, lon0, lat0, 80) if case % 2 else random_fences(rng, lon0, lat0, 12, spread=1.5)
        index = GeofenceIndex(fences)
        points = interesting_points(rng, fences, index.cell)
        pairs = passes(rng, fences, index.cell)
        met = 0
        for _ in range(4000):
            a, b = rng.choice(points), rng.choice(points)
            if rng.random() < 0.3:
                a, b = rng.choice(pairs)
            elif rng.random() < 0.8:  # up to a few cells long, some along a grid line
                d, heading = rng.uniform(0, 8) * index.cell, rng.uniform(0, 2 * math.pi)
                b = (a[0] + d * math.cos(heading), a[1] if rng.random() < 0.2 else a[1] + d * math.sin(heading))
            candidates = {f.id for f in index.near_segment(a[0], a[1], b[0], b[1])}
            for f in fences:
                if f.covers(*a) or f.covers(*b) or f.crossing(a[0], a[1], b[0], b[1]) is None:
                    continue
                met += 1
                assert f.id in candidates, (case, f.id, a, b)
        assert met > 200
