"""``fleet geofences add|list|remove|import``: the geofence writer.

Polygons come as WKT or GeoJSON (a geometry, a Feature or a FeatureCollection), circles
as ``--circle LAT,LON,RADIUS_M`` or as GeoJSON Point features with a ``radius_m``
property. PostGIS parses and validates every shape; an invalid one is refused with
``ST_IsValidReason`` (exit 2) and nothing is written. Workers pick up changes within
``FLEET_GEOFENCE_REFRESH_SECONDS``. ``remove`` is a soft delete: the row stays for the
alerts and transitions that name it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from fleet_telemetry.consumers.alerts import geofence_key
from fleet_telemetry.core.retry import is_transient
from fleet_telemetry.core.errors import ServiceUnavailable, UsageError
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
_REMOVE = """
UPDATE geofences SET deleted_at = now(), is_active = false
WHERE id = ANY($1::int8[]) AND deleted_at IS NULL RETURNING id
"""
_FORGET = "DELETE FROM vehicle_geofence_state WHERE geofence_id = ANY($1::int8[])"
_CLOSE_ALERTS = """
UPDATE alerts SET is_resolved = true, resolved_at = now(),
       details = details || '{"resolved_because": "geofence removed"}'
WHERE geofence_id = ANY($1::int8[]) AND NOT is_resolved
"""


@dataclass(frozen=True)
class NewGeofence:
    name: str
    kind: str
    ewkb: bytes | None = None
    lat: float | None = None
    lon: float | None = None
    radius_m: float | None = None
    speed_limit_kmh: float | None = None
    dwell_seconds: int | None = None


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
    if not -90 <= lat <= 90 or not -180 <= lon <= 180:
        raise UsageError(f"circle centre {lat},{lon} is outside -90..90 latitude, -180..180 longitude")
    if not radius > 0:
        raise UsageError(f"circle radius must be more than 0 metres, not {radius}")


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


async def _polygon(conn: asyncpg.Connection, fmt: str, text: str, where: str) -> bytes:
    """Parses and validates a polygon in PostGIS; returns its EWKB. Raises :class:`UsageError`."""
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


def _number(value: Any, what: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UsageError(f"{where}: {what} must be a number above 0, not {value!r}")
    return float(value)


async def from_feature(conn: asyncpg.Connection, feature: Any, where: str, defaults: dict[str, Any]) -> NewGeofence:
    """One GeoJSON feature as a geofence; properties ``name``, ``speed_limit_kmh``,
    ``dwell_seconds``, and ``radius_m`` for a Point (a circle)."""
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise UsageError(f"{where}: not a GeoJSON Feature")
    props = {**defaults, **{k: v for k, v in (feature.get("properties") or {}).items() if v is not None}}
    name = props.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{where}: needs a name (a 'name' property, or --name)")
    speed = _number(props.get("speed_limit_kmh"), "speed_limit_kmh", where)
    dwell = _number(props.get("dwell_seconds"), "dwell_seconds", where)
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        raise UsageError(f"{where}: has no geometry")
    if geometry.get("type") == "Point":
        coords = geometry.get("coordinates") or []
        radius = _number(props.get("radius_m"), "radius_m", where)
        if radius is None or len(coords) < 2:
            raise UsageError(f"{where}: a Point is a circle and needs a 'radius_m' property")
        lon, lat = float(coords[0]), float(coords[1])
        check_circle(lat, lon, radius)
        return NewGeofence(name.strip(), "circle", lat=lat, lon=lon, radius_m=radius, speed_limit_kmh=speed,
                           dwell_seconds=None if dwell is None else int(dwell))
    ewkb = await _polygon(conn, "geojson", orjson.dumps(geometry).decode(), where)
    return NewGeofence(name.strip(), "polygon", ewkb=ewkb, speed_limit_kmh=speed,
                       dwell_seconds=None if dwell is None else int(dwell))


async def insert(conn: asyncpg.Connection, fences: list[NewGeofence], active: bool = True) -> list[int]:
    """Writes the geofences in one transaction; returns their ids."""
    ids = []
    async with conn.transaction():
        for f in fences:
            ids.append(await conn.fetchval(_INSERT, f.name, f.kind, f.ewkb, f.lon, f.lat, f.radius_m,
                                           f.speed_limit_kmh, f.dwell_seconds, active))
    return ids


def _read_source(value: str) -> str:
    """GeoJSON given inline, as a file path, or ``-`` for standard input."""
    if value == "-":
        return sys.stdin.read()
    if value.lstrip().startswith("{"):
        return value
    try:
        with open(value, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read {value}: {exc.strerror}") from None


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


async def _connect(settings: Settings) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(settings.database_url)
    except Exception as exc:
        if is_transient(exc):
            raise ServiceUnavailable(
                f"PostgreSQL at {settings.database_url_masked} is not answering ({type(exc).__name__});"
                " start it (fleet services up) or set FLEET_DATABASE_URL") from None
        raise


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        print(text)


async def run(args: argparse.Namespace, settings: Settings) -> int:
    conn = await _connect(settings)
    try:
        return await _COMMANDS[args.action](conn, args, settings)
    finally:
        await conn.close()


async def _add(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    given = [x for x in (args.wkt, args.geojson, args.circle) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one shape: --wkt, --geojson or --circle")
    defaults = {"name": args.name, "speed_limit_kmh": args.speed_limit, "dwell_seconds": args.dwell}
    _number(args.speed_limit, "--speed-limit", "add")
    _number(args.dwell, "--dwell", "add")
    if args.circle is not None:
        lat, lon, radius = parse_circle(args.circle)
        fence = NewGeofence(args.name, "circle", lat=lat, lon=lon, radius_m=radius, speed_limit_kmh=args.speed_limit,
                            dwell_seconds=args.dwell)
    elif args.wkt is not None:
        fence = NewGeofence(args.name, "polygon", ewkb=await _polygon(conn, "wkt", args.wkt, "--wkt"),
                            speed_limit_kmh=args.speed_limit, dwell_seconds=args.dwell)
    else:
        found = features(_load_json(_read_source(args.geojson)))
        if len(found) != 1:
            raise UsageError(f"--geojson holds {len(found)} features; use 'fleet geofences import' for several")
        fence = await from_feature(conn, found[0], "--geojson", defaults)
    (fid,) = await insert(conn, [fence], active=not args.inactive)
    _print(args, {"id": fid, "name": fence.name, "kind": fence.kind}, f"geofence {fid} added ({fence.kind} {fence.name!r})")
    return 0


async def _import(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    found = features(_load_json(_read_source(args.source)))
    defaults = {"speed_limit_kmh": args.speed_limit, "dwell_seconds": args.dwell}
    fences = [await from_feature(conn, f, f"feature {i}", defaults) for i, f in enumerate(found)]
    ids = await insert(conn, fences, active=not args.inactive)
    _print(args, [{"id": i, "name": f.name, "kind": f.kind} for i, f in zip(ids, fences)],
           f"{len(ids)} geofences imported: ids {', '.join(map(str, ids))}")
    return 0


async def _list(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    rows = await conn.fetch(_LIST, args.all)
    data = [{
        "id": r["id"], "name": r["name"], "kind": r["kind"], "active": r["is_active"],
        "speed_limit_kmh": r["speed_limit_kmh"], "dwell_seconds": r["dwell_seconds"],
        **({"lat": r["lat"], "lon": r["lon"], "radius_m": r["radius_m"]} if r["kind"] == "circle"
           else {"points": r["points"]}),
        "area_m2": float(r["area_m2"]) if r["area_m2"] is not None else None,
        "updated_at": r["updated_at"].isoformat(),
    } for r in rows]
    lines = [f"{'id':>6}  {'kind':7} {'active':6} {'limit':>6} {'dwell':>6}  {'shape':32} name"]
    for d in data:
        shape = (f"{d['lat']:.5f},{d['lon']:.5f} r={d['radius_m']:g} m" if d["kind"] == "circle"
                 else f"{d['points']} points, {d['area_m2'] or 0:,.0f} m2")
        lines.append(f"{d['id']:>6}  {d['kind']:7} {'yes' if d['active'] else 'no':6} "
                     f"{'' if d['speed_limit_kmh'] is None else format(d['speed_limit_kmh'], 'g'):>6} "
                     f"{'' if d['dwell_seconds'] is None else d['dwell_seconds']:>6}  {shape:32} {d['name']}")
    _print(args, data, "\n".join(lines) if data else "no geofences")
    return 0


async def _remove(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    async with conn.transaction():
        removed = [r["id"] for r in await conn.fetch(_REMOVE, args.ids)]
        missing = sorted(set(args.ids) - set(removed))
        if missing:
            raise UsageError(f"no geofence with id {', '.join(map(str, missing))}; see 'fleet geofences list'")
        await conn.execute(_FORGET, removed)
        await conn.execute(_CLOSE_ALERTS, removed)
    redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        await redis.delete(*(geofence_key(fid) for fid in removed))
    except Exception as exc:
        if not is_transient(exc):
            raise
        sys.stderr.write("fleet geofences: Redis not reachable; the workers drop the geofence:{id} keys\n")
    finally:
        await redis.aclose()
    _print(args, {"removed": removed}, f"removed geofence {', '.join(map(str, removed))}")
    return 0


_COMMANDS = {"add": _add, "import": _import, "list": _list, "remove": _remove}


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "geofences", help="add, list, remove and import geofences",
        description="Manage geofences: polygons (WKT or GeoJSON) and circles (centre and radius in metres). "
        "Running workers pick changes up within FLEET_GEOFENCE_REFRESH_SECONDS.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--speed-limit", type=float, metavar="KMH", help="overspeed limit inside the fence")
        p.add_argument("--dwell", type=int, metavar="SECONDS",
                       help="minimum dwell before an enter or exit counts (default FLEET_GEOFENCE_DWELL_SECONDS)")
        p.add_argument("--inactive", action="store_true", help="store it switched off")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    add = actions.add_parser("add", help="add one geofence",
                             description="Add one geofence. Exactly one of --wkt, --geojson, --circle.")
    add.add_argument("name")
    add.add_argument("--wkt", help="POLYGON or MULTIPOLYGON in WKT, longitude first")
    add.add_argument("--geojson", metavar="FILE|JSON|-", help="a GeoJSON geometry or Feature (file, inline, or -)")
    add.add_argument("--circle", metavar="LAT,LON,RADIUS_M", help="a circle: centre and radius in metres (write --circle=-33.9,151.2,500 when LAT is negative)")
    common(add)
    imp = actions.add_parser("import", help="import GeoJSON features",
                             description="Import every feature of a GeoJSON FeatureCollection (or one Feature), "
                             "all or nothing. Properties: name (required), speed_limit_kmh, dwell_seconds; a Point "
                             "feature with radius_m is a circle.")
    imp.add_argument("source", metavar="FILE|-")
    common(imp)
    lst = actions.add_parser("list", help="list geofences")
    lst.add_argument("--all", action="store_true", help="include inactive geofences")
    lst.add_argument("--json", action="store_true", help="print JSON")
    rm = actions.add_parser("remove", help="remove geofences (soft delete)",
                            description="Remove geofences: workers stop evaluating them, their open alerts are "
                            "resolved and their Redis geofence:{id} keys dropped; history stays.")
    rm.add_argument("ids", type=int, nargs="+", metavar="ID")
    rm.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run)
