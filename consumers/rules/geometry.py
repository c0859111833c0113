"""Geofence shapes and exact containment: polygons and circles as PostGIS sees them.

Pure code: no I/O, no clock. Containment agrees with PostGIS (the differential test
checks it):

- polygons as ``ST_Covers(area, point)``: planar in degrees, the boundary counts as
  inside; orientation tests fall back to exact rational arithmetic when the floating
  point result is too close to zero to trust, so points on an edge are decided exactly;
- circles as ``ST_DWithin(center::geography, point::geography, radius_m)``: distance on
  the WGS 84 spheroid (Vincenty's inverse formula, where the spherical distance is too
  close to the radius to decide).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from fleet_telemetry.core.geodesy import sphere_distance_m

# WGS 84, as PostGIS uses for SRID 4326 geography.
_A = 6378137.0
_F = 1 / 298.257223563
_B = _A * (1 - _F)
_MEAN_RADIUS = (2 * _A + _B) / 3
# The sphere and the spheroid disagree by less than 0.6 % on any distance.
_SPHERE_SLACK = 0.006
M_PER_DEGREE = math.pi * _MEAN_RADIUS / 180
"""Metres per degree of latitude on the mean-radius sphere."""
# Shewchuk's error bound for the floating-point orientation determinant.
_ORIENT_ERR = (3.0 + 16.0 * 2.0**-53) * 2.0**-53

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
    kx = M_PER_DEGREE * math.cos(math.radians(center[1]))
    ax, ay = (lon1 - center[0]) * kx, (lat1 - center[1]) * M_PER_DEGREE
    bx, by = (lon2 - center[0]) * kx, (lat2 - center[1]) * M_PER_DEGREE
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


def closed_ring(coords: Sequence[Sequence[float]]) -> Ring:
    """A ring from (lon, lat) points; raises :class:`InvalidGeofence` unless closed and 4 points or more."""
    points = [(float(p[0]), float(p[1])) for p in coords]
    if len(points) < 4 or points[0] != points[-1]:
        raise InvalidGeofence("a polygon ring needs at least 4 points and must be closed")
    return tuple(p[0] for p in points), tuple(p[1] for p in points)


def circle_bbox(lon: float, lat: float, radius_m: float) -> tuple[float, float, float, float]:
    """A bounding box that surely contains the circle (1 % margin, plus the poles' case)."""
    dlat = radius_m * 1.01 / (M_PER_DEGREE * (1 - _SPHERE_SLACK))
    cos_lat = math.cos(math.radians(min(89.9, abs(lat) + dlat)))
    dlon = 180.0 if abs(lat) + dlat >= 89.9 else dlat / max(cos_lat, 1e-6)
    return (lon - dlon, lat - dlat, lon + dlon, lat + dlat)



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
