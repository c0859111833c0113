"""Polygons out of WKB, the form PostGIS hands geometries over in (``ST_AsBinary``)."""

from __future__ import annotations

import struct

from fleet_telemetry.consumers.rules.geometry import InvalidGeofence, Ring, closed_ring


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
        rings.append(closed_ring([values[i:i + 2] for i in range(0, n * dims, dims)]))
    return tuple(rings), at
