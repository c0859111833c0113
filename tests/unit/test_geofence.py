"""Geofence geometry, the grid index and the enter/exit state machine (pure, no services)."""

from __future__ import annotations

import random
import struct
from datetime import datetime, timedelta, timezone

import pytest

from fleet_telemetry.consumers.rules.geometry import (
    circle_covers,
    make_geofence,
    polygons_cover,
    ring_locate,
    spheroid_distance_m,
)
from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.transitions import FenceState, Position, Transition, advance
from fleet_telemetry.consumers.rules.wkb import polygons_from_wkb

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)
SQUARE = ((0.0, 1.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 1.0, 0.0))
HOLE = ((0.4, 0.6, 0.6, 0.4, 0.4), (0.4, 0.4, 0.6, 0.6, 0.4))


@pytest.mark.parametrize(("x", "y", "where"), [
    (0.5, 0.5, 1), (0.0, 0.0, 0), (1.0, 0.5, 0), (0.5, 1.0, 0), (0.3, 0.0, 0),
    (1.0000001, 0.5, -1), (-0.1, 0.5, -1), (0.5, -1e-12, -1), (2.0, 0.0, -1),
])
def test_ring_locate_counts_the_boundary_as_its_own_place(x: float, y: float, where: int) -> None:
    assert ring_locate(SQUARE, x, y) == where


def test_a_point_a_hair_off_a_slanted_edge_is_decided_exactly() -> None:
    triangle = ((0.0, 3.0, 0.0, 0.0), (0.0, 1.0, 1.0, 0.0))  # hypotenuse from (0,0) to (3,1)
    assert ring_locate(triangle, 1.5, 0.5) == 0
    assert ring_locate(triangle, 1.5, 0.5 + 1e-15) == 1
    assert ring_locate(triangle, 1.5, 0.5 - 1e-15) == -1


def test_holes_are_outside_but_their_edges_are_covered() -> None:
    polygon = ((SQUARE, HOLE),)
    assert polygons_cover(polygon, 0.2, 0.2)
    assert not polygons_cover(polygon, 0.5, 0.5)
    assert polygons_cover(polygon, 0.4, 0.5)
    other = ((((5.0, 6.0, 6.0, 5.0), (5.0, 5.0, 6.0, 5.0)),),)
    assert polygons_cover(polygon + other, 5.9, 5.1)


def test_spheroid_distances_match_known_wgs84_values() -> None:
    assert spheroid_distance_m(0, 0, 1, 0) == pytest.approx(111319.491, abs=0.001)
    assert spheroid_distance_m(0, 0, 0, 1) == pytest.approx(110574.389, abs=0.001)
    assert spheroid_distance_m(13.4, 52.5, 13.4, 52.5) == 0.0


def test_circles_use_the_spheroid_near_their_edge() -> None:
    # 1 degree of longitude on the equator is 111319.49 m on WGS 84 (111194.9 m on the sphere).
    assert circle_covers(0.0, 0.0, 111_319.6, 1.0, 0.0)
    assert not circle_covers(0.0, 0.0, 111_319.4, 1.0, 0.0)
    assert circle_covers(0.0, 0.0, 10.0, 0.0, 0.0)


def test_wkb_polygons_and_multipolygons_are_read_exactly() -> None:
    def polygon_wkb(rings: list[list[tuple[float, float]]], kind: int = 3) -> bytes:
        out = struct.pack("<BII", 1, kind, len(rings))
        for ring in rings:
            out += struct.pack("<I", len(ring)) + b"".join(struct.pack("<dd", *p) for p in ring)
        return out

    ring = [(0.1, 0.2), (0.30000000000000004, 0.2), (0.3, 0.4), (0.1, 0.2)]
    assert polygons_from_wkb(polygon_wkb([ring])) == (((tuple(p[0] for p in ring), tuple(p[1] for p in ring)),),)
    multi = struct.pack("<BII", 1, 6, 2) + polygon_wkb([ring]) + polygon_wkb([ring])
    assert len(polygons_from_wkb(multi)) == 2
    ewkb_with_srid = struct.pack("<BII", 1, 3 | 0x20000000, 4326) + polygon_wkb([ring])[5:]
    assert polygons_from_wkb(ewkb_with_srid) == polygons_from_wkb(polygon_wkb([ring]))


def test_the_grid_index_agrees_with_testing_every_fence() -> None:
    rng = random.Random(11)
    fences = []
    for i in range(60):
        lon, lat = rng.uniform(10, 11), rng.uniform(50, 51)
        if i % 2:
            fences.append(make_geofence(i, "c", "circle", center=(lon, lat), radius_m=rng.uniform(50, 3000)))
        else:
            h = rng.uniform(0.001, 0.05)
            ring = ((lon - h, lon + h, lon + h, lon - h, lon - h), (lat - h, lat - h, lat + h, lat + h, lat - h))
            fences.append(make_geofence(i, "p", "polygon", polygons=((ring,),)))
    fences.append(make_geofence(99, "big", "circle", center=(10.5, 50.5), radius_m=120_000))
    index = GeofenceIndex(fences)
    for _ in range(5000):
        lon, lat = rng.uniform(9.9, 11.1), rng.uniform(49.9, 51.1)
        assert index.containing(lon, lat) == {f.id for f in fences if f.covers(lon, lat)}


def _square_index(dwell: float | None = None) -> GeofenceIndex:
    ring = ((0.0, 0.01, 0.01, 0.0, 0.0), (0.0, 0.0, 0.01, 0.01, 0.0))
    return GeofenceIndex([make_geofence(1, "sq", "polygon", polygons=((ring,),), dwell_seconds=dwell),
                          make_geofence(2, "dot", "circle", center=(0.05, 0.005), radius_m=100.0)])


def _drive(index: GeofenceIndex, points: list[tuple[float, float, float]], dwell: float = 20.0,
           fences: dict[int, FenceState] | None = None) -> tuple[list[Transition], dict[int, FenceState]]:
    """Feeds (seconds, lat, lon) readings of one vehicle; returns the transitions."""
    fences = {} if fences is None else fences
    out: list[Transition] = []
    previous: Position | None = None
    for seconds, lat, lon in points:
        previous = advance("v", fences, index, previous, T0 + timedelta(seconds=seconds), lat, lon, dwell, out)
    return out, fences


def test_an_enter_counts_once_the_dwell_has_passed_and_is_dated_at_the_first_reading_inside() -> None:
    index = _square_index()
    track = [(0, 0.005, -0.001), (10, 0.005, 0.001), (20, 0.005, 0.002), (30, 0.005, 0.003)]
    transitions, fences = _drive(index, track)
    assert [(t.kind, t.time) for t in transitions] == [("enter", T0 + timedelta(seconds=10))]
    assert fences[1].inside and fences[1].since == T0 + timedelta(seconds=10)


def test_jitter_across_the_boundary_within_the_dwell_leaves_no_transition() -> None:
    index = _square_index()
    track = [(5 * i, 0.005, 0.0001 if i % 2 else -0.0001) for i in range(40)]
    transitions, fences = _drive(index, track)
    assert transitions == []
    assert 1 not in fences or not fences[1].inside


def test_a_fence_of_its_own_dwell_overrides_the_global_one() -> None:
    index = _square_index(dwell=0.0)
    transitions, _ = _drive(index, [(0, 0.005, -0.001), (5, 0.005, 0.001), (10, 0.005, -0.001)])
    assert [t.kind for t in transitions] == ["enter", "exit"]


def test_sparse_readings_jumping_across_a_small_circle_count_as_a_crossing() -> None:
    index = _square_index()
    transitions, fences = _drive(index, [(0, 0.005, 0.045), (120, 0.005, 0.055)])
    assert [(t.geofence_id, t.kind, t.crossing) for t in transitions] == [(2, "enter", True), (2, "exit", True)]
    enter, leave = transitions
    assert T0 < enter.time < leave.time < T0 + timedelta(seconds=120)
    assert 0.0489 < enter.lon < 0.0492 and 0.0508 < leave.lon < 0.0511
    assert fences == {}


def test_readings_closer_than_the_dwell_do_not_make_a_crossing() -> None:
    transitions, _ = _drive(_square_index(), [(0, 0.005, 0.045), (10, 0.005, 0.055)])
    assert transitions == []


def test_a_removed_fence_is_forgotten_without_an_exit() -> None:
    transitions, fences = _drive(_square_index(), [(0, 0.005, 0.005), (30, 0.005, 0.005)])
    assert [t.kind for t in transitions] == ["enter"]
    only_circle = GeofenceIndex([f for f in _square_index().fences.values() if f.id == 2])
    later, fences = _drive(only_circle, [(60, 0.005, 0.005)], fences=fences)
    assert later == [] and fences == {}
