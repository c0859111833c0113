"""Writing the ``geofences`` table: add, import, list and remove geofences.

Polygons come as WKT or GeoJSON (a geometry, a Feature or a FeatureCollection), circles
as ``LAT,LON,RADIUS_M`` or as GeoJSON Point features with a ``radius_m`` property.
PostGIS parses and validates every shape; an invalid one is refused with
``ST_IsValidReason`` (:class:`UsageError`) and nothing is written. Workers pick up
changes within ``FLEET_GEOFENCE_REFRESH_SECONDS``. Removing is a soft delete: the row
stays for the alerts and transitions that name it; what was open for the geofence is
closed in the same transaction, and a worker that has not reloaded its geofences yet
cannot open it again (:func:`fleet_telemetry.consumers.rules.outcome.lock_live_geofences`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import redis.asyncio as aioredis

from fleet_telemetry.consumers.rules.geo_sets import drop_sets
from fleet_telemetry.core.errors import UsageError, unavailable
from fleet_telemetry.core.retry import CONNECT_TIMEOUT_SECONDS, is_transient
from fleet_telemetry.core.settings import Settings

_PARSE = {
    "wkt": "ST_GeomFromText($1, 4326)",
    "geojson": "ST_SetSRID(ST_GeomFromGeoJSON($1), 4326)",
}
# Parses, flattens to 2-D and validates in one statement; ``ewkb`` is what gets stored.
_CHECK = """
SELECT GeometryType(g) AS type, ST_IsValid(g) AS valid, ST_IsValidReason(g) AS reason,
       ST_XMin(g) AS x0, ST_YMin(g) AS y0, ST_XMax(g) AS x1, ST_YMax(g) AS y1, ST_AsEWKB(g) AS ewkb
FROM (SELECT ST_Force2D({parse}) AS g) AS q
"""
_INSERT = """
INSERT INTO geofences (name, kind, area, center, radius_m, speed_limit_kmh, dwell_seconds, is_active)
VALUES ($1, $2, ST_GeomFromEWKB($3::bytea), CASE WHEN $4::float8 IS NULL THEN NULL
        ELSE ST_SetSRID(ST_MakePoint($4::float8, $5::float8), 4326) END, $6, $7, $8, $9)
RETURNING id
"""
_LIST = """
SELECT id, name, kind, is_active, speed_limit_kmh, dwell_seconds, radius_m,
       ST_Y(center) AS lat, ST_X(center) AS lon, ST_NPoints(area) AS points,
       round(ST_Area(shape::geography)) AS area_m2, created_at, updated_at
FROM geofences WHERE deleted_at IS NULL AND ($1 OR is_active)
ORDER BY id
"""
# FOR UPDATE waits for the workers' transactions that hold these rows (FOR KEY SHARE,
# outcome.lock_live_geofences) and makes the later ones find the geofences removed.
_LOCK = "SELECT id FROM geofences WHERE id = ANY($1::int8[]) AND deleted_at IS NULL ORDER BY id FOR UPDATE"
_REMOVE = "UPDATE geofences SET deleted_at = now(), is_active = false WHERE id = ANY($1::int8[])"
# The vehicles inside leave the geofence as it goes: an exit as the rules record one, at
# the removal (never before the enter), where the vehicle was last seen.
_EXIT_INSIDE = """
INSERT INTO geofence_transitions (vehicle_id, geofence_id, kind, time, lat, lon, crossing)
SELECT fs.vehicle_id, fs.geofence_id, 'exit', greatest(now(), fs.since),
       coalesce(rs.lat, ST_Y(ST_PointOnSurface(g.shape))), coalesce(rs.lon, ST_X(ST_PointOnSurface(g.shape))), false
FROM vehicle_geofence_state AS fs
JOIN geofences AS g ON g.id = fs.geofence_id
LEFT JOIN vehicle_rule_state AS rs ON rs.vehicle_id = fs.vehicle_id
WHERE fs.geofence_id = ANY($1::int8[]) AND fs.inside
ON CONFLICT (vehicle_id, geofence_id, time, kind) DO NOTHING
RETURNING geofence_id, vehicle_id
"""
_FORGET = "DELETE FROM vehicle_geofence_state WHERE geofence_id = ANY($1::int8[])"
_CLOSE_ALERTS = """
UPDATE alerts SET is_resolved = true, resolved_at = now(),
       details = details || '{"resolved_because": "geofence removed"}'
WHERE geofence_id = ANY($1::int8[]) AND NOT is_resolved
RETURNING geofence_id, id
"""


@dataclass
class Closed:
    """What removing one geofence closed."""

    id: int
    exits: list[UUID] = field(default_factory=list)
    """The vehicles that were inside: an exit was recorded for each."""
    alerts_resolved: list[int] = field(default_factory=list)
    """The ids of its open alerts, now resolved."""


@dataclass
class Removal:
    """What ``remove`` did."""

    closed: list[Closed]
    """Per geofence removed, by id."""
    redis_answered: bool
    """False: the ``geofence:{id}`` sets are left to the workers, which drop them when they next refresh."""

    @property
    def removed(self) -> list[int]:
        return [c.id for c in self.closed]


@dataclass(frozen=True)
class NewGeofence:
    """A geofence to insert: a polygon (``ewkb``) or a circle (centre and radius)."""

    name: str
    kind: str
    """``polygon`` or ``circle``."""
    ewkb: bytes | None = None
    lat: float | None = None
    lon: float | None = None
    radius_m: float | None = None
    speed_limit_kmh: float | None = None
    dwell_seconds: int | None = None


async def connect(settings: Settings) -> asyncpg.Connection:
    """A connection to the primary; raises :class:`ServiceUnavailable` when PostgreSQL
    does not answer."""
    try:
        return await asyncpg.connect(settings.database_url, timeout=CONNECT_TIMEOUT_SECONDS)
    except Exception as exc:
        if is_transient(exc):
            raise unavailable("PostgreSQL", settings.database_url_masked, exc) from None
        raise


# --- shapes ------------------------------------------------------------------------


def parse_circle(text: str) -> tuple[float, float, float]:
    """``LAT,LON,RADIUS_M`` -> numbers; raises :class:`UsageError`."""
    parts = [p.strip() for p in text.split(",")]
    try:
        lat, lon, radius = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--circle takes LAT,LON,RADIUS_M (three numbers), not {text!r}") from None
    check_circle(lat, lon, radius)
    return lat, lon, radius


def check_circle(lat: float, lon: float, radius: float) -> None:
    """Raises :class:`UsageError` unless the centre is on the globe and the radius positive."""
    if not -90 <= lat <= 90 or not -180 <= lon <= 180:
        raise UsageError(f"circle centre {lat},{lon} is outside -90..90 latitude, -180..180 longitude")
    if not radius > 0:
        raise UsageError(f"circle radius must be more than 0 metres, not {radius}")


def positive(value: Any, what: str, where: str) -> float | None:
    """``value`` as a number above 0 (None stays None); raises :class:`UsageError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UsageError(f"{where}: {what} must be a number above 0, not {value!r}")
    return float(value)


def geojson_features(text: str) -> list[dict[str, Any]]:
    """The features of a GeoJSON document given as text; raises :class:`UsageError`."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return features(document)


def features(document: Any) -> list[dict[str, Any]]:
    """The features of a GeoJSON document: a FeatureCollection, a Feature or a bare geometry."""
    if not isinstance(document, dict):
        raise UsageError("GeoJSON must be an object")
    kind = document.get("type")
    if kind == "FeatureCollection":
        found = document.get("features")
        if not isinstance(found, list) or not found:
            raise UsageError("the FeatureCollection has no features")
        return found
    if kind == "Feature":
        return [document]
    if kind in ("Polygon", "MultiPolygon", "Point"):
        return [{"type": "Feature", "geometry": document, "properties": {}}]
    raise UsageError(f"GeoJSON type {kind!r} is not a FeatureCollection, Feature, Polygon or MultiPolygon")


async def polygon(conn: asyncpg.Connection, fmt: str, text: str, where: str) -> bytes:
    """Parses (``fmt`` is ``wkt`` or ``geojson``) and validates a polygon in PostGIS;
    returns its EWKB. Raises :class:`UsageError`."""
    try:
        row = await conn.fetchrow(_CHECK.format(parse=_PARSE[fmt]), text)
    except (asyncpg.exceptions.InternalServerError, asyncpg.exceptions.DataError) as exc:
        # PostGIS reports unreadable WKT and GeoJSON as XX000 (or 22xxx): bad input here.
        raise UsageError(f"{where}: cannot read the geometry: {exc.message}") from None
    if row is None or row["type"] is None:
        raise UsageError(f"{where}: no geometry")
    if row["type"] not in ("POLYGON", "MULTIPOLYGON"):
        raise UsageError(f"{where}: a geofence is a Polygon or MultiPolygon, not a {row['type'].title()}")
    if not row["valid"]:
        raise UsageError(f"{where}: invalid geometry: {row['reason']}")
    if row["x0"] < -180 or row["x1"] > 180 or row["y0"] < -90 or row["y1"] > 90:
        raise UsageError(f"{where}: coordinates must be longitude -180..180 and latitude -90..90 (x is longitude)")
    return bytes(row["ewkb"])


async def from_feature(conn: asyncpg.Connection, feature: Any, where: str, defaults: dict[str, Any]) -> NewGeofence:
    """One GeoJSON feature as a geofence; properties ``name``, ``speed_limit_kmh``,
    ``dwell_seconds``, and ``radius_m`` for a Point (a circle). ``defaults`` fill the
    properties a feature does not have. Raises :class:`UsageError`."""
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise UsageError(f"{where}: not a GeoJSON Feature")
    props = {**defaults, **{k: v for k, v in (feature.get("properties") or {}).items() if v is not None}}
    name = props.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{where}: needs a name (a 'name' property, or --name)")
    speed = positive(props.get("speed_limit_kmh"), "speed_limit_kmh", where)
    dwell = positive(props.get("dwell_seconds"), "dwell_seconds", where)
    dwell_seconds = None if dwell is None else int(dwell)
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        raise UsageError(f"{where}: has no geometry")
    if geometry.get("type") == "Point":
        coords = geometry.get("coordinates") or []
        radius = positive(props.get("radius_m"), "radius_m", where)
        if radius is None or len(coords) < 2:
            raise UsageError(f"{where}: a Point is a circle and needs a 'radius_m' property")
        lon, lat = float(coords[0]), float(coords[1])
        check_circle(lat, lon, radius)
        return NewGeofence(name.strip(), "circle", lat=lat, lon=lon, radius_m=radius, speed_limit_kmh=speed,
                           dwell_seconds=dwell_seconds)
    ewkb = await polygon(conn, "geojson", orjson.dumps(geometry).decode(), where)
    return NewGeofence(name.strip(), "polygon", ewkb=ewkb, speed_limit_kmh=speed, dwell_seconds=dwell_seconds)


# --- the table ---------------------------------------------------------------------


async def insert(conn: asyncpg.Connection, fences: list[NewGeofence], active: bool = True) -> list[int]:
    """Writes the geofences in one transaction (all or nothing); returns their ids."""
    ids = []
    async with conn.transaction():
        for f in fences:
            ids.append(await conn.fetchval(_INSERT, f.name, f.kind, f.ewkb, f.lon, f.lat, f.radius_m,
                                           f.speed_limit_kmh, f.dwell_seconds, active))
    return ids


async def list_geofences(conn: asyncpg.Connection, include_inactive: bool) -> list[dict[str, Any]]:
    """The geofences not removed, by id: a circle with its centre and radius, a polygon
    with its number of points; both with their area."""
    return [{
        "id": r["id"], "name": r["name"], "kind": r["kind"], "active": r["is_active"],
        "speed_limit_kmh": r["speed_limit_kmh"], "dwell_seconds": r["dwell_seconds"],
        **({"lat": r["lat"], "lon": r["lon"], "radius_m": r["radius_m"]} if r["kind"] == "circle"
           else {"points": r["points"]}),
        "area_m2": float(r["area_m2"]) if r["area_m2"] is not None else None,
        "updated_at": r["updated_at"].isoformat(),
    } for r in await conn.fetch(_LIST, include_inactive)]


async def remove(conn: asyncpg.Connection, ids: list[int], redis_url: str) -> Removal:
    """Soft-deletes the geofences and closes what was open for them, in one transaction:
    an exit for each vehicle inside, the vehicles' sides of them forgotten, their open
    alerts resolved. Then drops their Redis ``geofence:{id}`` sets.

    Blocks until the workers' transactions that hold these geofences commit; the ones
    after it write nothing more for them. Raises :class:`UsageError`, writing nothing,
    when an id is unknown or removed already.
    """
    async with conn.transaction():
        found = [r["id"] for r in await conn.fetch(_LOCK, ids)]
        missing = sorted(set(ids) - set(found))
        if missing:
            raise UsageError(f"no geofence with id {', '.join(map(str, missing))}; see 'fleet geofences list'")
        await conn.execute(_REMOVE, found)
        closed = {fid: Closed(fid) for fid in found}
        for row in await conn.fetch(_EXIT_INSIDE, found):
            closed[row["geofence_id"]].exits.append(row["vehicle_id"])
        await conn.execute(_FORGET, found)
        for row in await conn.fetch(_CLOSE_ALERTS, found):
            closed[row["geofence_id"]].alerts_resolved.append(row["id"])
    redis = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        dropped = await drop_sets(redis, found)
    finally:
        await redis.aclose()
    for c in closed.values():
        c.exits.sort()
        c.alerts_resolved.sort()
    return Removal(list(closed.values()), dropped)
