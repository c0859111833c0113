"""Geofences in a worker's memory: the spatial index, exact containment, segment
crossings, and each vehicle's enter/exit state with a minimum dwell.

Pure code: no I/O, no clock. :class:`GeofenceIndex` is rebuilt from the ``geofences``
rows whenever they change (:mod:`fleet_telemetry.consumers.alerts` polls for that); :func:`advance`
moves one vehicle's geofence state over one reading and returns the transitions it
confirmed.

Containment agrees with PostGIS (the differential test checks it):

- polygons as ``ST_Covers(area, point)``: planar in degrees, the boundary counts as
  inside; orientation tests fall back to exact rational arithmetic when the floating
  point result is too close to zero to trust, so points on an edge are decided exactly;
- circles as ``ST_DWithin(center::geography, point::geography, radius_m)``: distance on
  the WGS 84 spheroid (Vincenty's inverse formula, where the spherical distance is too
  close to the radius to decide).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any, NamedTuple

# WGS 84, as PostGIS uses for SRID 4326 geography.
_A = 6378137.0
_F = 1 / 298.257223563
_B = _A * (1 - _F)
_MEAN_RADIUS = (2 * _A + _B) / 3
# The sphere and the spheroid disagree by less than 0.6 % on any distance.
_SPHERE_SLACK = 0.006
_M_PER_DEGREE = math.pi * _MEAN_RADIUS / 180
# Shewchuk's error bound for the floating-point orientation determinant.
_ORIENT_ERR = (3.0 + 16.0 * 2.0**-53) * 2.0**-53
# A fence whose bounding box spans more grid cells than this is tested by bounding box.
_MAX_CELLS_PER_FENCE = 4096
# Two readings closer than this are never tested for a crossing: GPS jitter, not travel.
CROSSING_MIN_SEGMENT_M = 50.0

_NOWHERE: frozenset[int] = frozenset()

Ring = tuple[tuple[float, ...], tuple[float, ...]]
"""A closed ring as (longitudes, latitudes), first point repeated last."""


class InvalidGeofence(ValueError):
    """A geofence row or document that cannot be turned into a fence."""


# --- exact predicates --------------------------------------------------------------


def _orientation(ax: float, ay: float, bx: float, by: float, cx: float, cy: float) -> int:
    """+1 if a, b, c turn counter-clockwise, -1 if clockwise, 0 if collinear (exact)."""
    left = (ax - cx) * (by - cy)
    right = (ay - cy) * (bx - cx)
    det = left - right
    if abs(det) > _ORIENT_ERR * (abs(left) + abs(right)):
        return 1 if det > 0 else -1
    fax, fay, fcx, fcy = Fraction(ax), Fraction(ay), Fraction(cx), Fraction(cy)
    exact = (fax - fcx) * (Fraction(by) - fcy) - (fay - fcy) * (Fraction(bx) - fcx)
    return (exact > 0) - (exact < 0)


def ring_locate(ring: Ring, x: float, y: float) -> int:
    """1 if (x, y) is strictly inside the closed ring, 0 on its boundary, -1 outside.

    Counts crossings of a ray cast towards +x, with half-open edges so a vertex on the
    ray is counted once.
    """
    xs, ys = ring
    crossings = 0
    x1, y1 = xs[0], ys[0]
    for i in range(1, len(xs)):
        x2, y2 = xs[i], ys[i]
        if x1 < x and x2 < x:
            x1, y1 = x2, y2
            continue
        if x == x2 and y == y2:
            return 0
        if y1 == y and y2 == y:
            if (x1 <= x <= x2) or (x2 <= x <= x1):
                return 0
        elif (y1 > y) != (y2 > y):
            orient = _orientation(x1, y1, x2, y2, x, y)
            if orient == 0:
                return 0
            if y2 < y1:
                orient = -orient
            if orient > 0:
                crossings += 1
        x1, y1 = x2, y2
    return 1 if crossings & 1 else -1


def polygons_cover(polygons: Sequence[Sequence[Ring]], x: float, y: float) -> bool:
    """``ST_Covers`` of a (multi)polygon: inside or on the boundary, holes excluded."""
    for rings in polygons:
        where = ring_locate(rings[0], x, y)
        if where < 0:
            continue
        if where == 0:
            return True
        for hole in rings[1:]:
            in_hole = ring_locate(hole, x, y)
            if in_hole == 0:
                return True
            if in_hole > 0:
                break
        else:
            return True
    return False


# --- distances -------------------------------------------------------------------


def sphere_distance_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Great-circle distance on the mean-radius sphere (haversine), in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * _MEAN_RADIUS * math.asin(min(1.0, math.sqrt(h)))


def spheroid_distance_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Geodesic distance on the WGS 84 spheroid (Vincenty's inverse formula), in metres.

    Accurate to well under a millimetre for the distances geofences use; falls back to
    the spherical distance for nearly antipodal points, where the iteration does not
    converge.
    """
    if lon1 == lon2 and lat1 == lat2:
        return 0.0
    u1 = math.atan((1 - _F) * math.tan(math.radians(lat1)))
    u2 = math.atan((1 - _F) * math.tan(math.radians(lat2)))
    big_l = math.radians(lon2 - lon1)
    lam = big_l
    sin_u1, cos_u1, sin_u2, cos_u2 = math.sin(u1), math.cos(u1), math.sin(u2), math.cos(u2)
    for _ in range(200):
        sin_lam, cos_lam = math.sin(lam), math.cos(lam)
        sin_sigma = math.hypot(cos_u2 * sin_lam, cos_u1 * sin_u2 - sin_u1 * cos_u2 * cos_lam)
        if sin_sigma == 0:
            return 0.0
        cos_sigma = sin_u1 * sin_u2 + cos_u1 * cos_u2 * cos_lam
        sigma = math.atan2(sin_sigma, cos_sigma)
        sin_alpha = cos_u1 * cos_u2 * sin_lam / sin_sigma
        cos2_alpha = 1 - sin_alpha * sin_alpha
        cos_2sm = cos_sigma - 2 * sin_u1 * sin_u2 / cos2_alpha if cos2_alpha else 0.0
        c = _F / 16 * cos2_alpha * (4 + _F * (4 - 3 * cos2_alpha))
        previous = lam
        lam = big_l + (1 - c) * _F * sin_alpha * (
            sigma + c * sin_sigma * (cos_2sm + c * cos_sigma * (-1 + 2 * cos_2sm * cos_2sm))
        )
        if abs(lam - previous) < 1e-13:
            break
    else:
        return sphere_distance_m(lon1, lat1, lon2, lat2)
    u_sq = cos2_alpha * (_A * _A - _B * _B) / (_B * _B)
    k_a = 1 + u_sq / 16384 * (4096 + u_sq * (-768 + u_sq * (320 - 175 * u_sq)))
    k_b = u_sq / 1024 * (256 + u_sq * (-128 + u_sq * (74 - 47 * u_sq)))
    delta_sigma = k_b * sin_sigma * (
        cos_2sm + k_b / 4 * (
            cos_sigma * (-1 + 2 * cos_2sm * cos_2sm)
            - k_b / 6 * cos_2sm * (-3 + 4 * sin_sigma * sin_sigma) * (-3 + 4 * cos_2sm * cos_2sm)
        )
    )
    return _B * k_a * (sigma - delta_sigma)


def circle_covers(lon0: float, lat0: float, radius_m: float, lon: float, lat: float) -> bool:
    """``ST_DWithin(center::geography, point::geography, radius_m)``."""
    d = sphere_distance_m(lon0, lat0, lon, lat)
    if d <= radius_m * (1 - _SPHERE_SLACK):
        return True
    if d > radius_m * (1 + _SPHERE_SLACK):
        return False
    return spheroid_distance_m(lon0, lat0, lon, lat) <= radius_m


# --- fences ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Geofence:
    """One active geofence as the evaluator uses it."""

    id: int
    name: str
    kind: str
    """``polygon`` or ``circle``."""
    polygons: tuple[tuple[Ring, ...], ...] = ()
    center: tuple[float, float] | None = None
    """(lon, lat) of a circle."""
    radius_m: float | None = None
    speed_limit_kmh: float | None = None
    dwell_seconds: float | None = None
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """(min lon, min lat, max lon, max lat), for circles with a margin."""

    def covers(self, lon: float, lat: float) -> bool:
        x0, y0, x1, y1 = self.bbox
        if lon < x0 or lon > x1 or lat < y0 or lat > y1:
            return False
        if self.center is not None:
            assert self.radius_m is not None
            return circle_covers(self.center[0], self.center[1], self.radius_m, lon, lat)
        return polygons_cover(self.polygons, lon, lat)

    def crossing(self, lon1: float, lat1: float, lon2: float, lat2: float) -> tuple[float, float] | None:
        """Where a segment between two points outside the fence passes through it.

        Returns the fractions (0..1) of the segment at which it enters and leaves, or
        None if it misses. Planar in degrees for polygons; for circles, in a local
        metric projection around the centre (good for fences up to tens of km).
        """
        x0, y0, x1, y1 = self.bbox
        if max(lon1, lon2) < x0 or min(lon1, lon2) > x1 or max(lat1, lat2) < y0 or min(lat1, lat2) > y1:
            return None
        if self.center is not None:
            assert self.radius_m is not None
            return _segment_circle(self.center, self.radius_m, lon1, lat1, lon2, lat2)
        hits: list[float] = []
        for rings in self.polygons:
            for xs, ys in rings:
                for i in range(1, len(xs)):
                    s = _segment_intersection(lon1, lat1, lon2, lat2, xs[i - 1], ys[i - 1], xs[i], ys[i])
                    if s is not None:
                        hits.append(s)
        if not hits:
            return None
        return min(hits), max(hits)


def _segment_intersection(
    ax: float, ay: float, bx: float, by: float, cx: float, cy: float, dx: float, dy: float
) -> float | None:
    """Fraction along a->b where it meets c->d, or None."""
    rx, ry, sx, sy = bx - ax, by - ay, dx - cx, dy - cy
    denom = rx * sy - ry * sx
    if denom == 0:
        return None
    qx, qy = cx - ax, cy - ay
    t = (qx * sy - qy * sx) / denom
    u = (qx * ry - qy * rx) / denom
    if 0.0 <= t <= 1.0 and 0.0 <= u <= 1.0:
        return t
    return None


def _segment_circle(
    center: tuple[float, float], radius_m: float, lon1: float, lat1: float, lon2: float, lat2: float
) -> tuple[float, float] | None:
    kx = _M_PER_DEGREE * math.cos(math.radians(center[1]))
    ax, ay = (lon1 - center[0]) * kx, (lat1 - center[1]) * _M_PER_DEGREE
    bx, by = (lon2 - center[0]) * kx, (lat2 - center[1]) * _M_PER_DEGREE
    dx, dy = bx - ax, by - ay
    a = dx * dx + dy * dy
    if a == 0:
        return None
    b = 2 * (ax * dx + ay * dy)
    c = ax * ax + ay * ay - radius_m * radius_m
    disc = b * b - 4 * a * c
    if disc <= 0:
        return None
    root = math.sqrt(disc)
    t1, t2 = (-b - root) / (2 * a), (-b + root) / (2 * a)
    if t2 < 0 or t1 > 1:
        return None
    return max(0.0, t1), min(1.0, t2)


def _ring(coords: Sequence[Sequence[float]]) -> Ring:
    points = [(float(p[0]), float(p[1])) for p in coords]
    if len(points) < 4 or points[0] != points[-1]:
        raise InvalidGeofence("a polygon ring needs at least 4 points and must be closed")
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def circle_bbox(lon: float, lat: float, radius_m: float) -> tuple[float, float, float, float]:
    """A bounding box that surely contains the circle (1 % margin, plus the poles' case)."""
    dlat = radius_m * 1.01 / (_M_PER_DEGREE * (1 - _SPHERE_SLACK))
    cos_lat = math.cos(math.radians(min(89.9, abs(lat) + dlat)))
    dlon = 180.0 if abs(lat) + dlat >= 89.9 else dlat / max(cos_lat, 1e-6)
    return (lon - dlon, lat - dlat, lon + dlon, lat + dlat)


def polygons_from_wkb(data: bytes) -> tuple[tuple[Ring, ...], ...]:
    """Rings of a WKB (or EWKB) Polygon or MultiPolygon, coordinates exactly as stored."""
    polygons, _ = _wkb_geometry(memoryview(data), 0)
    return tuple(polygons)


def _wkb_geometry(data: memoryview, at: int) -> tuple[list[tuple[Ring, ...]], int]:
    little = data[at] == 1
    endian = "<" if little else ">"
    (kind,) = struct.unpack_from(endian + "I", data, at + 1)
    at += 5
    if kind & 0x20000000:  # EWKB SRID
        at += 4
    code = kind & 0x0FFFFFFF
    has_z = bool(kind & 0x80000000) or code // 1000 in (1, 3)
    has_m = bool(kind & 0x40000000) or code // 1000 in (2, 3)
    dims = 2 + has_z + has_m
    base = code % 1000
    if base == 3:
        rings, at = _wkb_rings(data, at, endian, dims)
        return [rings], at
    if base == 6:
        (count,) = struct.unpack_from(endian + "I", data, at)
        at += 4
        out: list[tuple[Ring, ...]] = []
        for _ in range(count):
            part, at = _wkb_geometry(data, at)
            out.extend(part)
        return out, at
    raise InvalidGeofence(f"WKB geometry type {base} is not a Polygon or MultiPolygon")


def _wkb_rings(data: memoryview, at: int, endian: str, dims: int) -> tuple[tuple[Ring, ...], int]:
    (count,) = struct.unpack_from(endian + "I", data, at)
    at += 4
    rings = []
    for _ in range(count):
        (n,) = struct.unpack_from(endian + "I", data, at)
        at += 4
        values = struct.unpack_from(f"{endian}{n * dims}d", data, at)
        at += 8 * n * dims
        rings.append(_ring([values[i:i + 2] for i in range(0, n * dims, dims)]))
    return tuple(rings), at


def make_geofence(
    id: int,
    name: str,
    kind: str,
    *,
    polygons: tuple[tuple[Ring, ...], ...] | None = None,
    center: tuple[float, float] | None = None,
    radius_m: float | None = None,
    speed_limit_kmh: float | None = None,
    dwell_seconds: float | None = None,
) -> Geofence:
    """A :class:`Geofence` from the columns of a ``geofences`` row; raises :class:`InvalidGeofence`."""
    if kind == "circle":
        if center is None or radius_m is None or radius_m <= 0:
            raise InvalidGeofence("a circle needs a centre and a positive radius")
        return Geofence(id, name, kind, center=center, radius_m=radius_m, speed_limit_kmh=speed_limit_kmh,
                        dwell_seconds=dwell_seconds, bbox=circle_bbox(center[0], center[1], radius_m))
    if kind != "polygon" or not polygons:
        raise InvalidGeofence(f"kind {kind!r} without a polygon")
    xs = [x for rings in polygons for x in rings[0][0]]
    ys = [y for rings in polygons for y in rings[0][1]]
    return Geofence(id, name, kind, polygons=polygons, speed_limit_kmh=speed_limit_kmh,
                    dwell_seconds=dwell_seconds, bbox=(min(xs), min(ys), max(xs), max(ys)))


class Cell(NamedTuple):
    """What one grid cell knows: fences that cover all of it, and fences whose boundary
    may cross it (those need the exact test)."""

    inside: frozenset[int]
    boundary: tuple[Geofence, ...]


_EMPTY_CELL = Cell(_NOWHERE, ())


class GeofenceIndex:
    """A uniform grid over longitude/latitude, built once per set of fences.

    Each cell lists the fences that surely cover the whole cell and the fences whose
    boundary may pass through it. A point in a cell without boundary fences is decided
    by one dictionary look-up; only points in boundary cells get the exact test. Fences
    too large for the grid are tested by bounding box, then exactly.
    """

    def __init__(self, fences: Iterable[Geofence]) -> None:
        self.fences: dict[int, Geofence] = {f.id: f for f in fences}
        spans = sorted(max(f.bbox[2] - f.bbox[0], f.bbox[3] - f.bbox[1]) for f in self.fences.values())
        median = spans[len(spans) // 2] if spans else 0.01
        # About six cells across a typical fence, so most cells are wholly in or out.
        self.cell = min(1.0, max(0.0005, median / 6))
        inside: dict[int, set[int]] = {}
        boundary: dict[int, list[Geofence]] = {}
        large: list[Geofence] = []
        for fence in self.fences.values():
            x0, y0, x1, y1 = (int(v // self.cell) for v in fence.bbox)
            if (x1 - x0 + 1) * (y1 - y0 + 1) > _MAX_CELLS_PER_FENCE:
                large.append(fence)
                continue
            for key, full in _classify(fence, self.cell, x0, y0, x1, y1):
                if full:
                    inside.setdefault(key, set()).add(fence.id)
                else:
                    boundary.setdefault(key, []).append(fence)
        self.large: tuple[Geofence, ...] = tuple(large)
        limits = [f.speed_limit_kmh for f in self.fences.values() if f.speed_limit_kmh is not None]
        self.lowest_speed_limit = min(limits, default=math.inf)
        dwells = [f.dwell_seconds for f in self.fences.values() if f.dwell_seconds is not None]
        self.shortest_dwell = min(dwells, default=math.inf)
        shared: dict[frozenset[int], frozenset[int]] = {}
        self._cells: dict[int, Cell] = {}
        for key in inside.keys() | boundary.keys():
            ids = frozenset(inside.get(key, ()))
            self._cells[key] = Cell(shared.setdefault(ids, ids), tuple(boundary.get(key, ())))

    def __len__(self) -> int:
        return len(self.fences)

    def key(self, lon: float, lat: float) -> int:
        cell = self.cell
        return (int(lon // cell) << 20) + int(lat // cell)

    def containing(self, lon: float, lat: float) -> frozenset[int]:
        """Ids of the fences that cover the point."""
        return self.locate(self.key(lon, lat), lon, lat)[0]

    def locate(self, key: int, lon: float, lat: float) -> tuple[frozenset[int], bool]:
        """(fences covering the point, whether its cell is free of fence boundaries)."""
        cell = self._cells.get(key, _EMPTY_CELL)
        found = cell.inside
        clear = not cell.boundary and not self.large
        if cell.boundary:
            hits = [f.id for f in cell.boundary if f.covers(lon, lat)]
            if hits:
                found = found.union(hits)
        if self.large:
            hits = [f.id for f in self.large if f.covers(lon, lat)]
            if hits:
                found = found.union(hits)
        return found, clear

    def near_segment(self, lon1: float, lat1: float, lon2: float, lat2: float) -> Collection[Geofence]:
        """Fences whose boundary may meet the segment's bounding box."""
        cell = self.cell
        x0, x1 = int(lon1 // cell), int(lon2 // cell)
        y0, y1 = int(lat1 // cell), int(lat2 // cell)
        if x0 > x1:
            x0, x1 = x1, x0
        if y0 > y1:
            y0, y1 = y1, y0
        if (x1 - x0 + 1) * (y1 - y0 + 1) > 4 * _MAX_CELLS_PER_FENCE:
            bx0, bx1 = sorted((lon1, lon2))
            by0, by1 = sorted((lat1, lat2))
            return [f for f in self.fences.values()
                    if f.bbox[0] <= bx1 and f.bbox[2] >= bx0 and f.bbox[1] <= by1 and f.bbox[3] >= by0]
        get = self._cells.get
        found: set[Geofence] = set(self.large)
        for ix in range(x0, x1 + 1):
            for iy in range(y0, y1 + 1):
                hit = get((ix << 20) + iy)
                if hit is not None and hit.boundary:
                    found.update(hit.boundary)
        return found


def _classify(fence: Geofence, cell: float, x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, bool]]:
    """The cells of a fence's bounding box that it touches: (key, covers the whole cell).

    Conservative: a cell is "whole" only when no boundary can pass through it; a cell the
    fence may touch but not surely cover is a boundary cell (exact test per point).
    """
    out: list[tuple[int, bool]] = []
    if fence.center is not None:
        assert fence.radius_m is not None
        lon0, lat0 = fence.center
        r = fence.radius_m
        if r > 50_000:  # far from flat: every cell is a boundary cell
            return [((ix << 20) + iy, False) for ix in range(x0, x1 + 1) for iy in range(y0, y1 + 1)]
        kx = _M_PER_DEGREE * math.cos(math.radians(lat0))
        for ix in range(x0, x1 + 1):
            cx0, cx1 = (ix * cell - lon0) * kx, ((ix + 1) * cell - lon0) * kx
            for iy in range(y0, y1 + 1):
                cy0, cy1 = (iy * cell - lat0) * _M_PER_DEGREE, ((iy + 1) * cell - lat0) * _M_PER_DEGREE
                near_x = 0.0 if cx0 <= 0 <= cx1 else min(abs(cx0), abs(cx1))
                near_y = 0.0 if cy0 <= 0 <= cy1 else min(abs(cy0), abs(cy1))
                if math.hypot(near_x, near_y) > r * 1.02:
                    continue
                far = math.hypot(max(abs(cx0), abs(cx1)), max(abs(cy0), abs(cy1)))
                out.append(((ix << 20) + iy, far < r * 0.98))
        return out
    crossed: set[int] = set()
    for rings in fence.polygons:
        for xs, ys in rings:
            for i in range(1, len(xs)):
                ax, ay, bx, by = xs[i - 1], ys[i - 1], xs[i], ys[i]
                for ix in range(int(min(ax, bx) // cell), int(max(ax, bx) // cell) + 1):
                    for iy in range(int(min(ay, by) // cell), int(max(ay, by) // cell) + 1):
                        key = (ix << 20) + iy
                        if key not in crossed and _edge_meets_cell(ax, ay, bx, by, ix * cell, iy * cell, cell):
                            crossed.add(key)
    for ix in range(x0, x1 + 1):
        for iy in range(y0, y1 + 1):
            key = (ix << 20) + iy
            if key in crossed:
                out.append((key, False))
            elif polygons_cover(fence.polygons, (ix + 0.5) * cell, (iy + 0.5) * cell):
                out.append((key, True))
    return out


def _edge_meets_cell(ax: float, ay: float, bx: float, by: float, x0: float, y0: float, size: float) -> bool:
    """Whether a segment may touch a cell (conservative: true when in doubt)."""
    pad = size * 1e-6
    x0, y0, x1, y1 = x0 - pad, y0 - pad, x0 + size + pad, y0 + size + pad
    if max(ax, bx) < x0 or min(ax, bx) > x1 or max(ay, by) < y0 or min(ay, by) > y1:
        return False
    dx, dy = bx - ax, by - ay
    sides = [dx * (cy - ay) - dy * (cx - ax) for cx, cy in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
    return not (all(v > 0 for v in sides) or all(v < 0 for v in sides))


# --- one vehicle's side of each fence --------------------------------------------------


@dataclass(slots=True)
class FenceState:
    """A vehicle's side of one fence; the default (outside, nothing pending) is not stored."""

    inside: bool = False
    since: datetime | None = None
    pending_since: datetime | None = None
    pending_lat: float | None = None
    pending_lon: float | None = None
    speeding_since: datetime | None = None
    speeding_max: float | None = None
    speeding_open: bool = False

    def copy(self) -> "FenceState":
        return FenceState(self.inside, self.since, self.pending_since, self.pending_lat, self.pending_lon,
                          self.speeding_since, self.speeding_max, self.speeding_open)

    def is_default(self) -> bool:
        return (not self.inside and self.pending_since is None and self.speeding_since is None
                and not self.speeding_open)


@dataclass(frozen=True, slots=True)
class Transition:
    vehicle_id: Any
    geofence_id: int
    kind: str
    """``enter`` or ``exit``."""
    time: datetime
    lat: float
    lon: float
    crossing: bool = False


class Position(NamedTuple):
    """Where a vehicle was accepted to be, and what the fences made of that point."""

    time: datetime
    lat: float
    lon: float
    inside: frozenset[int] = _NOWHERE
    """Fences that covered this point."""
    key: int = -1
    """Its grid cell."""
    settled: bool = False
    """No side change was pending after this reading."""


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
    """
    key = index.key(lon, lat)
    inside_now, clear = index.locate(key, lon, lat)
    settled = True
    if (fences or inside_now) and not (
        previous is not None and previous.settled and inside_now == previous.inside
    ):
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
                fence = known[fid]
                dwell = fence.dwell_seconds if fence.dwell_seconds is not None else default_dwell
                if (time - state.pending_since).total_seconds() >= dwell:
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
    if (previous is not None and not (clear and key == previous.key)
            and abs(lon - previous.lon) + abs(lat - previous.lat) >= CROSSING_MIN_SEGMENT_M / _M_PER_DEGREE):
        gap = (time - previous.time).total_seconds()
        if gap >= min(default_dwell, index.shortest_dwell):
            _crossings(vehicle_id, fences, index, previous, time, lat, lon, inside_now, gap, default_dwell,
                       transitions)
    return Position(time, lat, lon, inside_now, key, settled)


def _crossings(
    vehicle_id: Any, fences: dict[int, FenceState], index: GeofenceIndex, previous: Position,
    time: datetime, lat2: float, lon2: float, inside_now: frozenset[int], seconds: float, default_dwell: float,
    out: list[Transition],
) -> None:
    lon1, lat1 = previous.lon, previous.lat
    x0, x1 = (lon1, lon2) if lon1 <= lon2 else (lon2, lon1)
    y0, y1 = (lat1, lat2) if lat1 <= lat2 else (lat2, lat1)
    candidates = [f for f in index.near_segment(lon1, lat1, lon2, lat2)
                  if f.bbox[0] <= x1 and f.bbox[2] >= x0 and f.bbox[1] <= y1 and f.bbox[3] >= y0
                  and f.id not in previous.inside and f.id not in inside_now]
    if not candidates or sphere_distance_m(lon1, lat1, lon2, lat2) < CROSSING_MIN_SEGMENT_M:
        return
    for fence in candidates:
        fid = fence.id
        state = fences.get(fid)
        if state is not None and (state.inside or state.pending_since is not None):
            continue
        if seconds < (fence.dwell_seconds if fence.dwell_seconds is not None else default_dwell):
            continue  # readings this close would have seen a visit long enough to count
        hit = fence.crossing(lon1, lat1, lon2, lat2)
        if hit is None:
            continue
        for kind, s in (("enter", hit[0]), ("exit", hit[1])):
            out.append(Transition(
                vehicle_id, fid, kind, previous.time + timedelta(seconds=seconds * s),
                lat1 + (lat2 - lat1) * s, lon1 + (lon2 - lon1) * s, crossing=True,
            ))
