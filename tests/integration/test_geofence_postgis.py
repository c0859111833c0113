"""The worker's containment tests agree with PostGIS on random fences and on points
near and on their boundaries: ``ST_Covers`` for polygons, ``ST_DWithin`` on geography
for circles."""

from __future__ import annotations

import math
import random

import asyncpg
import pytest

from fleet_telemetry.consumers.rules.geometry import make_geofence
from fleet_telemetry.consumers.rules.index import GeofenceIndex
from fleet_telemetry.consumers.rules.wkb import polygons_from_wkb

pytestmark = pytest.mark.integration


def star(rng: random.Random, cx: float, cy: float, r_min: float, r_max: float, n: int) -> list[tuple[float, float]]:
    """A closed ring, star-shaped around (cx, cy), so always simple."""
    angles = [(i + rng.uniform(0.1, 0.9)) * 2 * math.pi / n for i in range(n)]
    radii = [rng.uniform(r_min, r_max) for _ in angles]
    ring = [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]
    return ring + [ring[0]]


def wkt_ring(ring: list[tuple[float, float]]) -> str:
    return "(" + ", ".join(f"{x!r} {y!r}" for x, y in ring) + ")"


def probes(rng: random.Random, rings: list[list[tuple[float, float]]], n_random: int) -> list[tuple[float, float]]:
    """Vertices, points along edges, points a hair off the edges, and random points around."""
    out: list[tuple[float, float]] = []
    for ring in rings:
        for (x1, y1), (x2, y2) in zip(ring, ring[1:]):
            out.append((x1, y1))
            for t in (0.5, rng.random(), rng.random()):
                x, y = x1 + t * (x2 - x1), y1 + t * (y2 - y1)
                out.append((x, y))
                length = math.hypot(x2 - x1, y2 - y1) or 1.0
                nx, ny = -(y2 - y1) / length, (x2 - x1) / length
                for eps in (1e-12, 1e-9, 1e-6):
                    out.append((x + nx * eps, y + ny * eps))
                    out.append((x - nx * eps, y - ny * eps))
            out.append((x1, y1 + 1e-10))
            out.append((x1 - 1e-10, y1))
    xs = [x for ring in rings for x, _ in ring]
    ys = [y for ring in rings for _, y in ring]
    for _ in range(n_random):
        out.append((rng.uniform(min(xs) - 0.01, max(xs) + 0.01), rng.uniform(min(ys) - 0.01, max(ys) + 0.01)))
    return out


async def test_polygons_agree_with_st_covers(db: asyncpg.Connection) -> None:
    rng = random.Random(20261125)
    checked = disagreements = 0
    for case in range(12):
        cx, cy = rng.uniform(-170, 170), rng.uniform(-70, 70)
        size = rng.choice((0.002, 0.01, 0.05))
        outer = star(rng, cx, cy, size * 0.6, size, rng.randint(6, 14))
        rings = [outer]
        if case % 3 == 1:
            rings.append(star(rng, cx, cy, size * 0.1, size * 0.3, rng.randint(3, 8)))
        polygon = "(" + ", ".join(wkt_ring(r) for r in rings) + ")"
        if case % 4 == 3:
            other = star(rng, cx + 3 * size, cy, size * 0.5, size, 6)
            rings.append(other)
            wkt = f"MULTIPOLYGON({polygon}, ({wkt_ring(other)}))"
        else:
            wkt = f"POLYGON{polygon}"
        # An axis-aligned square too, where points on edges are exactly representable.
        if case == 0:
            wkt = f"POLYGON(({cx} {cy}, {cx + size} {cy}, {cx + size} {cy + size}, {cx} {cy + size}, {cx} {cy}))"
            rings = [[(cx, cy), (cx + size, cy), (cx + size, cy + size), (cx, cy + size), (cx, cy)]]
        wkb, valid = await db.fetchrow("SELECT ST_AsBinary(g), ST_IsValid(g) FROM ST_GeomFromText($1, 4326) AS g", wkt)
        assert valid, wkt
        fence = make_geofence(case, "p", "polygon", polygons=polygons_from_wkb(bytes(wkb)))
        index = GeofenceIndex([fence])
        points = probes(rng, rings, 300)
        rows = await db.fetch(
            "SELECT ST_Covers(ST_GeomFromText($1, 4326), ST_SetSRID(ST_MakePoint(x, y), 4326)) AS covered"
            " FROM unnest($2::float8[], $3::float8[]) WITH ORDINALITY AS u(x, y, n) ORDER BY n",
            wkt, [p[0] for p in points], [p[1] for p in points],
        )
        for (x, y), row in zip(points, rows):
            checked += 1
            if fence.covers(x, y) != row["covered"] or (case in index.containing(x, y)) != row["covered"]:
                disagreements += 1
                print("disagree", wkt[:60], x, y, row["covered"])
    assert checked > 5000
    assert disagreements == 0


async def test_circles_agree_with_st_dwithin_on_geography(db: asyncpg.Connection) -> None:
    rng = random.Random(4326)
    checked = disagreements = 0
    for case in range(20):
        lon, lat = rng.uniform(-179, 179), rng.uniform(-80, 80)
        radius = rng.choice((25.0, 150.0, 800.0, 5000.0, 40000.0))
        fence = make_geofence(case, "c", "circle", center=(lon, lat), radius_m=radius)
        index = GeofenceIndex([fence])
        # Points at geodesic distances radius * (1 +- d) in every direction, and random ones.
        distances = [radius * (1 + s * d) for d in (0.05, 1e-3, 1e-4, 1e-5, 1e-6) for s in (-1, 1)]
        distances += [rng.uniform(0, radius * 2) for _ in range(20)]
        azimuths = [rng.uniform(0, 2 * math.pi) for _ in range(12)]
        rows = await db.fetch(
            "SELECT ST_X(p::geometry) AS x, ST_Y(p::geometry) AS y,"
            " ST_DWithin(ST_MakePoint($1, $2)::geography, p, $3) AS within"
            " FROM (SELECT ST_Project(ST_MakePoint($1, $2)::geography, d, a) AS p"
            "       FROM unnest($4::float8[]) AS d, unnest($5::float8[]) AS a) AS q",
            lon, lat, radius, distances, azimuths,
        )
        rows += await db.fetch(
            "SELECT $1::float8 AS x, $2::float8 AS y, ST_DWithin(ST_MakePoint($1, $2)::geography,"
            " ST_MakePoint($1, $2)::geography, $3) AS within", lon, lat, radius)
        for row in rows:
            checked += 1
            if fence.covers(row["x"], row["y"]) != row["within"] or (
                    case in index.containing(row["x"], row["y"])) != row["within"]:
                disagreements += 1
                print("disagree", lon, lat, radius, row["x"], row["y"], row["within"])
    assert checked > 5000
    assert disagreements == 0
