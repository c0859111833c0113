"""Distances between positions, and the GPS-jump test the rules and the trips share.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

import math
from datetime import datetime

_A = 6_378_137.0  # WGS 84 semi-major axis
_B = _A * (1 - 1 / 298.257223563)  # and semi-minor axis
MEAN_RADIUS_M = (2 * _A + _B) / 3
"""The mean radius of the WGS 84 ellipsoid, in metres."""

# A move shorter than this is never a GPS jump, whatever the time between the readings.
JUMP_MIN_DISTANCE_M = 250.0
JUMP_MIN_DEGREES = JUMP_MIN_DISTANCE_M / 111_320 / 1.5
"""Moves of fewer degrees (latitude plus longitude) are shorter than the distance above."""
DEGREE_KMH = 111_320 * 3.6
"""A degree (latitude plus longitude) per second, in km/h: an upper bound of the speed of such a move."""


def sphere_distance_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Great-circle distance on the mean-radius sphere (haversine), in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * MEAN_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def plausible_move(t0: datetime, lat0: float, lon0: float, t: datetime, lat: float, lon: float,
                   max_speed_kmh: float) -> bool:
    """Whether moving from (lat0, lon0) at ``t0`` to (lat, lon) at ``t`` is physically
    plausible: shorter than :data:`JUMP_MIN_DISTANCE_M`, or no faster than
    ``max_speed_kmh``. A move that is not is a GPS jump."""
    degrees = abs(lat - lat0) + abs(lon - lon0)
    if degrees <= JUMP_MIN_DEGREES:
        return True  # closer than JUMP_MIN_DISTANCE_M whatever the latitude
    seconds = (t - t0).total_seconds()
    if seconds > 0 and degrees * DEGREE_KMH / seconds <= max_speed_kmh:
        return True  # an upper bound of the distance is plausible already
    distance = sphere_distance_m(lon0, lat0, lon, lat)
    if distance <= JUMP_MIN_DISTANCE_M:
        return True
    return seconds > 0 and distance / seconds * 3.6 <= max_speed_kmh
