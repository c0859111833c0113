"""Writing the ``geofences`` table: add, import, update, list, export and remove geofences.

Polygons come as WKT or GeoJSON (a geometry, a Feature or a FeatureCollection), circles
as ``LAT,LON,RADIUS_M`` or as GeoJSON Point features with a ``radius_m`` property.
PostGIS parses and validates every shape; an invalid one is refused with
``ST_IsValidReason`` (:class:`UsageError`) and nothing is written. A shape whose
latitudes lie beyond 90 while its longitudes would fit as latitudes is refused as
swapped; one that is only suspicious gets a warning (:func:`swap_warning`). A name is
unique among the active geofences (migration 0032). Workers pick up changes within
``FLEET_GEOFENCE_REFRESH_SECONDS``. Removing is a soft delete: the row stays for the
alerts and transitions that name it; what was open for the geofence is closed in the
same transaction, as it is when a geofence is deactivated, and a worker that has not
reloaded its geofences yet cannot open it again
(:func:`fleet_telemetry.consumers.rules.outcome.lock_live_geofences`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from fleet_telemetry.consumers.rules.geo_sets import drop_sets
from fleet_telemetry.core.errors import UsageError, unavailable
from fleet_telemetry.core.redis_client import connect_redis
from fleet_telemetry.core.redis_keys import NO_PREFIX, RedisKeys
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
       round(ST_Area(shape::geography)) AS area_m2, created_at, updated_at,
       ST_AsGeoJSON(area) AS geojson, ST_AsText(area) AS wkt
FROM geofences WHERE deleted_at IS NULL AND ($1 OR is_active) AND ($2::int8 IS NULL OR id = $2)
ORDER BY id
"""
_NAMES_IN_USE = """
SELECT id, name FROM geofences
WHERE name = ANY($1::text[]) AND is_active AND deleted_at IS NULL AND id <> ALL($2::int8[])
ORDER BY id
"""
# Whether a shape, or the same shape with latitude and longitude exchanged, lies near
# what the fleet knows: its vehicles' last positions (vehicle_positions_location_geog_gist)
# and its active geofences.
_NEAR_FLEET = """
WITH s AS (SELECT g, ST_FlipCoordinates(g) AS f FROM (SELECT ST_GeomFromEWKB($1::bytea) AS g) AS q)
SELECT EXISTS (SELECT 1 FROM vehicle_positions, s WHERE ST_DWithin(location::geography, s.g::geography, $2))
       OR EXISTS (SELECT 1 FROM geofences, s WHERE is_active AND deleted_at IS NULL
                  AND ST_DWithin(shape::geography, s.g::geography, $2)) AS near,
       EXISTS (SELECT 1 FROM vehicle_positions, s WHERE ST_DWithin(location::geography, s.f::geography, $2))
       OR EXISTS (SELECT 1 FROM geofences, s WHERE is_active AND deleted_at IS NULL
                  AND ST_DWithin(shape::geography, s.f::geography, $2)) AS swapped_near
"""
_POINT = "SELECT ST_AsEWKB(ST_SetSRID(ST_MakePoint($1::float8, $2::float8), 4326))"
SWAP_DISTANCE_M = 100_000.0
"""A shape farther than this from everything the fleet knows, whose swapped twin is nearer, gets a warning."""
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
       details = details || jsonb_build_object('resolved_because', $2::text)
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
    active: bool = True
    """False for a feature with ``"active": false`` (what ``export --all`` writes)."""


CLEAR = "none"
"""What ``update`` takes to clear the speed limit or the dwell."""


@dataclass(frozen=True)
class Changes:
    """What ``update`` changes; None leaves a field as it is, :data:`CLEAR` empties it."""

    name: str | None = None
    speed_limit_kmh: float | str | None = None
    dwell_seconds: int | str | None = None
    active: bool | None = None


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
        hint = " (latitude and longitude swapped? --circle takes LAT,LON, a GeoJSON Point [LON, LAT])" if (
            abs(lat) > 90 and abs(lon) <= 90) else ""
        raise UsageError(f"circle centre {lat},{lon} is outside -90..90 latitude, -180..180 longitude{hint}")
    if not radius > 0:
        raise UsageError(f"circle radius must be more than 0 metres, not {radius}")


def positive(value: Any, what: str, where: str) -> float | None:
    """``value`` as a number above 0 (None stays None); raises :class:`UsageError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UsageError(f"{where}: {what} must be a number above 0, not {value!r}")
    return float(value)


def feature_name(feature: Any) -> str | None:
    """A feature's ``name`` property, if it has a usable one."""
    props = feature.get("properties") if isinstance(feature, dict) else None
    name = props.get("name") if isinstance(props, dict) else None
    return name.strip() if isinstance(name, str) and name.strip() else None


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
    if swapped(row["x0"], row["y0"], row["x1"], row["y1"]):
        raise UsageError(f"{where}: latitude and longitude look swapped: latitudes reach {max(-row['y0'], row['y1']):g}"
                         " while every longitude would fit as a latitude; WKT and GeoJSON take longitude first (x y)")
    if row["x0"] < -180 or row["x1"] > 180 or row["y0"] < -90 or row["y1"] > 90:
        raise UsageError(f"{where}: coordinates must be longitude -180..180 and latitude -90..90 (x is longitude)")
    return bytes(row["ewkb"])


def swapped(x0: float, y0: float, x1: float, y1: float) -> bool:
    """A bounding box (x longitude, y latitude) whose latitudes go beyond 90 while its
    longitudes all lie within 90: the coordinates were given latitude first."""
    return (y0 < -90 or y1 > 90) and -90 <= x0 and x1 <= 90 and -180 <= y0 and y1 <= 180


async def swap_warning(conn: asyncpg.Connection, fence: NewGeofence) -> str | None:
    """A warning when ``fence`` may have latitude and longitude exchanged: it lies farther
    than :data:`SWAP_DISTANCE_M` from every vehicle position and active geofence, while
    the same shape swapped lies within it. None when it cannot tell (an empty fleet) or
    nothing is suspicious."""
    if fence.kind == "circle":
        if fence.lat is None or fence.lon is None or abs(fence.lon) > 90:
            return None
        ewkb = await conn.fetchval(_POINT, fence.lon, fence.lat)
    else:
        ewkb = fence.ewkb
    row = await conn.fetchrow(_NEAR_FLEET, ewkb, SWAP_DISTANCE_M)
    if row is None or row["near"] or not row["swapped_near"]:
        return None
    return (f"{fence.name!r} lies over {SWAP_DISTANCE_M / 1000:g} km from every vehicle and active geofence,"
            " but with latitude and longitude exchanged it would be near them: check the coordinate order"
            " (WKT and GeoJSON take longitude first; --circle takes LAT,LON)")


async def from_feature(conn: asyncpg.Connection, feature: Any, where: str, defaults: dict[str, Any]) -> NewGeofence:
    """One GeoJSON feature as a geofence; properties ``name``, ``speed_limit_kmh``,
    ``dwell_seconds``, ``active`` (default true), and ``radius_m`` for a Point (a
    circle). ``defaults`` fill the properties a feature does not have. Raises
    :class:`UsageError`."""
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise UsageError(f"{where}: not a GeoJSON Feature")
    props = {**defaults, **{k: v for k, v in (feature.get("properties") or {}).items() if v is not None}}
    name = props.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{where}: needs a name (a 'name' property, or --name)")
    active = props.get("active", True)
    if not isinstance(active, bool):
        raise UsageError(f"{where}: property 'active' must be true or false, not {active!r}")
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
                           dwell_seconds=dwell_seconds, active=active)
    ewkb = await polygon(conn, "geojson", orjson.dumps(geometry).decode(), where)
    return NewGeofence(name.strip(), "polygon", ewkb=ewkb, speed_limit_kmh=speed, dwell_seconds=dwell_seconds,
                       active=active)


# --- the table ---------------------------------------------------------------------


async def refuse_names_in_use(conn: asyncpg.Connection, names: list[str], keep: Sequence[int] = ()) -> None:
    """Raises :class:`UsageError` when a name repeats in ``names`` or an active geofence
    (other than those of ``keep``) holds one of them."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"geofence names repeat: {', '.join(map(repr, repeated))}; a name is unique among the"
                         " active geofences")
    rows = await conn.fetch(_NAMES_IN_USE, names, list(keep))
    if rows:
        taken = ", ".join(f"{r['name']!r} (id {r['id']})" for r in rows)
        raise UsageError(f"an active geofence has this name already: {taken}; choose another name, or deactivate"
                         " it first ('fleet geofences update ID --inactive')")


async def insert(conn: asyncpg.Connection, fences: list[NewGeofence], active: bool = True) -> list[int]:
    """Writes the geofences in one transaction (all or nothing); returns their ids.
    ``active`` False stores them all switched off, else each as its ``active`` says.

    Raises :class:`UsageError` when an active geofence's name is taken.
    """
    ids = []
    async with conn.transaction():
        await refuse_names_in_use(conn, [f.name for f in fences if active and f.active])
        for f in fences:
            ids.append(await conn.fetchval(_INSERT, f.name, f.kind, f.ewkb, f.lon, f.lat, f.radius_m,
                                           f.speed_limit_kmh, f.dwell_seconds, active and f.active))
    return ids


async def list_geofences(conn: asyncpg.Connection, include_inactive: bool, *, shapes: bool = False,
                         geofence_id: int | None = None) -> list[dict[str, Any]]:
    """The geofences not removed, by id: a circle with its centre and radius, a polygon
    with its number of points (and, with ``shapes``, its WKT); both with their area."""
    return [{
        "id": r["id"], "name": r["name"], "kind": r["kind"], "active": r["is_active"],
        "speed_limit_kmh": r["speed_limit_kmh"], "dwell_seconds": r["dwell_seconds"],
        **({"lat": r["lat"], "lon": r["lon"], "radius_m": r["radius_m"]} if r["kind"] == "circle"
           else {"points": r["points"], **({"wkt": r["wkt"]} if shapes else {})}),
        "area_m2": float(r["area_m2"]) if r["area_m2"] is not None else None,
        "updated_at": r["updated_at"].isoformat(),
    } for r in await conn.fetch(_LIST, include_inactive, geofence_id)]


async def feature_collection(conn: asyncpg.Connection, include_inactive: bool) -> dict[str, Any]:
    """The geofences as a GeoJSON FeatureCollection that ``import`` reads back: polygons
    as their geometry, circles as a Point with ``radius_m``; properties ``name``,
    ``speed_limit_kmh``, ``dwell_seconds``, ``active`` and ``id``."""
    features = []
    for r in await conn.fetch(_LIST, include_inactive, None):
        props: dict[str, Any] = {"id": r["id"], "name": r["name"], "speed_limit_kmh": r["speed_limit_kmh"],
                                 "dwell_seconds": r["dwell_seconds"], "active": r["is_active"]}
        if r["kind"] == "circle":
            geometry: Any = {"type": "Point", "coordinates": [r["lon"], r["lat"]]}
            props["radius_m"] = r["radius_m"]
        else:
            geometry = orjson.loads(r["geojson"])
        features.append({"type": "Feature", "geometry": geometry, "properties": props})
    return {"type": "FeatureCollection", "features": features}


async def remove(conn: asyncpg.Connection, ids: list[int], redis_url: str, keys: RedisKeys = NO_PREFIX) -> Removal:
    """Soft-deletes the geofences and closes what was open for them, in one transaction:
    an exit for each vehicle inside, the vehicles' sides of them forgotten, their open
    alerts resolved. Then drops their Redis ``geofence:{id}`` sets.

    Blocks until the workers' transactions that hold these geofences commit; the ones
    after it write nothing more for them. Raises :class:`UsageError`, writing nothing,
    when an id is unknown or removed already.
    """
    async with conn.transaction():
        found = await _lock(conn, ids)
        await conn.execute(_REMOVE, found)
        closed = await _close(conn, found, "geofence removed")
    return Removal(closed, await _drop_sets(redis_url, found, keys))


async def _lock(conn: asyncpg.Connection, ids: list[int]) -> list[int]:
    """Takes the geofences ``FOR UPDATE`` (in the caller's transaction); raises
    :class:`UsageError` when one is unknown or removed."""
    found = [r["id"] for r in await conn.fetch(_LOCK, ids)]
    missing = sorted(set(ids) - set(found))
    if missing:
        raise UsageError(f"no geofence with id {', '.join(map(str, missing))}; see 'fleet geofences list'")
    return found


async def _close(conn: asyncpg.Connection, ids: list[int], because: str) -> list[Closed]:
    """What was open for geofences going out of use, closed (in the caller's transaction):
    an exit for each vehicle inside, their sides forgotten, open alerts resolved."""
    closed = {fid: Closed(fid) for fid in ids}
    for row in await conn.fetch(_EXIT_INSIDE, ids):
        closed[row["geofence_id"]].exits.append(row["vehicle_id"])
    await conn.execute(_FORGET, ids)
    for row in await conn.fetch(_CLOSE_ALERTS, ids, because):
        closed[row["geofence_id"]].alerts_resolved.append(row["id"])
    for c in closed.values():
        c.exits.sort()
        c.alerts_resolved.sort()
    return list(closed.values())


async def _drop_sets(redis_url: str, ids: list[int], keys: RedisKeys) -> bool:
    redis = connect_redis(redis_url)
    try:
        return await drop_sets(redis, ids, keys)
    finally:
        await redis.aclose()


async def update(conn: asyncpg.Connection, geofence_id: int, changes: Changes, redis_url: str,
                 keys: RedisKeys = NO_PREFIX) -> tuple[dict[str, Any], Removal | None]:
    """Changes a geofence's name, speed limit, dwell or active flag in one transaction;
    returns it as :func:`list_geofences` shows it and, when it was switched off, what
    that closed (as a removal closes it; its Redis set is dropped after the commit).

    Raises :class:`UsageError`: an unknown or removed id, nothing to change, a name in use.
    """
    sets: dict[str, Any] = {}
    if changes.name is not None:
        if not changes.name.strip():
            raise UsageError("a geofence's name cannot be empty")
        sets["name"] = changes.name.strip()
    for column, value in (("speed_limit_kmh", changes.speed_limit_kmh), ("dwell_seconds", changes.dwell_seconds)):
        if value is not None:
            sets[column] = None if value == CLEAR else value
    if changes.active is not None:
        sets["is_active"] = changes.active
    if not sets:
        raise UsageError("nothing to change: give --name, --speed-limit, --dwell, --active or --inactive")
    closed: list[Closed] | None = None
    async with conn.transaction():
        await _lock(conn, [geofence_id])
        before = await conn.fetchrow("SELECT name, is_active FROM geofences WHERE id = $1", geofence_id)
        if sets.get("is_active", before["is_active"]):
            await refuse_names_in_use(conn, [sets.get("name", before["name"])], [geofence_id])
        assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(sets, start=2))
        await conn.execute(f"UPDATE geofences SET {assignments} WHERE id = $1", geofence_id, *sets.values())
        if before["is_active"] and sets.get("is_active") is False:
            closed = await _close(conn, [geofence_id], "geofence deactivated")
    (shown,) = await list_geofences(conn, True, geofence_id=geofence_id)
    if closed is None:
        return shown, None
    return shown, Removal(closed, await _drop_sets(redis_url, [geofence_id], keys))
