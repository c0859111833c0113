"""``fleet geofences add|list|remove|import``: the geofence writer's command line.

What a geofence may be and how it is stored: :mod:`fleet_telemetry.consumers.rules.geofences`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import asyncpg
import orjson

from fleet_telemetry.consumers.rules.geofences import (
    Closed,
    NewGeofence,
    connect,
    from_feature,
    geojson_features,
    insert,
    list_geofences,
    parse_circle,
    polygon,
    positive,
    remove,
)
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings


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


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        print(text)


async def run(args: argparse.Namespace, settings: Settings) -> int:
    conn = await connect(settings)
    try:
        return await _COMMANDS[args.action](conn, args, settings)
    finally:
        await conn.close()


async def _add(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    given = [x for x in (args.wkt, args.geojson, args.circle) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one shape: --wkt, --geojson or --circle")
    defaults = {"name": args.name, "speed_limit_kmh": args.speed_limit, "dwell_seconds": args.dwell}
    positive(args.speed_limit, "--speed-limit", "add")
    positive(args.dwell, "--dwell", "add")
    if args.circle is not None:
        lat, lon, radius = parse_circle(args.circle)
        fence = NewGeofence(args.name, "circle", lat=lat, lon=lon, radius_m=radius, speed_limit_kmh=args.speed_limit,
                            dwell_seconds=args.dwell)
    elif args.wkt is not None:
        fence = NewGeofence(args.name, "polygon", ewkb=await polygon(conn, "wkt", args.wkt, "--wkt"),
                            speed_limit_kmh=args.speed_limit, dwell_seconds=args.dwell)
    else:
        found = geojson_features(_read_source(args.geojson))
        if len(found) != 1:
            raise UsageError(f"--geojson holds {len(found)} features; use 'fleet geofences import' for several")
        fence = await from_feature(conn, found[0], "--geojson", defaults)
    (fid,) = await insert(conn, [fence], active=not args.inactive)
    _print(args, {"id": fid, "name": fence.name, "kind": fence.kind},
           f"geofence {fid} added ({fence.kind} {fence.name!r})")
    return 0


async def _import(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    found = geojson_features(_read_source(args.source))
    defaults = {"speed_limit_kmh": args.speed_limit, "dwell_seconds": args.dwell}
    fences = [await from_feature(conn, f, f"feature {i}", defaults) for i, f in enumerate(found)]
    ids = await insert(conn, fences, active=not args.inactive)
    _print(args, [{"id": i, "name": f.name, "kind": f.kind} for i, f in zip(ids, fences)],
           f"{len(ids)} geofences imported: ids {', '.join(map(str, ids))}")
    return 0


async def _list(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    data = await list_geofences(conn, args.all)
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
    removal = await remove(conn, args.ids, settings.redis_url, settings.redis_keys)
    if not removal.redis_answered:
        sys.stderr.write("fleet geofences: Redis not reachable; the workers drop the geofence:{id} keys\n")
    data = {"removed": removal.removed, "closed": [
        {"id": c.id, "exits": [str(v) for v in c.exits], "alerts_resolved": c.alerts_resolved} for c in removal.closed]}
    lines = [f"removed geofence {', '.join(map(str, removal.removed))}", *map(_closed_line, removal.closed)]
    _print(args, data, "\n".join(lines))
    return 0


def _closed_line(closed: Closed) -> str:
    """``geofence 7: exit recorded for 2 vehicles inside, 1 open alert resolved``."""
    n, m = len(closed.exits), len(closed.alerts_resolved)
    exits = f"exit recorded for {n} vehicle{'' if n == 1 else 's'} inside" if n else "no vehicle inside"
    alerts = f"{m} open alert{'' if m == 1 else 's'} resolved" if m else "no open alert"
    return f"geofence {closed.id}: {exits}, {alerts}"


_COMMANDS = {"add": _add, "import": _import, "list": _list, "remove": _remove}


def _shape_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speed-limit", type=float, metavar="KMH", help="overspeed limit inside the fence")
    p.add_argument("--dwell", type=int, metavar="SECONDS",
                   help="minimum dwell before an enter or exit counts (default FLEET_GEOFENCE_DWELL_SECONDS)")
    p.add_argument("--inactive", action="store_true", help="store it switched off")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "geofences", help="add, list, remove and import geofences",
        description="Manage geofences: polygons (WKT or GeoJSON) and circles (centre and radius in metres). "
        "Running workers pick changes up within FLEET_GEOFENCE_REFRESH_SECONDS.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    add = actions.add_parser("add", help="add one geofence",
                             description="Add one geofence. Exactly one of --wkt, --geojson, --circle.")
    add.add_argument("name")
    add.add_argument("--wkt", help="POLYGON or MULTIPOLYGON in WKT, longitude first")
    add.add_argument("--geojson", metavar="FILE|JSON|-", help="a GeoJSON geometry or Feature (file, inline, or -)")
    add.add_argument("--circle", metavar="LAT,LON,RADIUS_M",
                     help="a circle: centre and radius in metres (write --circle=-33.9,151.2,500 when LAT is negative)")
    _shape_options(add)
    imp = actions.add_parser("import", help="import GeoJSON features",
                             description="Import every feature of a GeoJSON FeatureCollection (or one Feature), "
                             "all or nothing. Properties: name (required), speed_limit_kmh, dwell_seconds; a Point "
                             "feature with radius_m is a circle.")
    imp.add_argument("source", metavar="FILE|-")
    _shape_options(imp)
    lst = actions.add_parser("list", help="list geofences")
    lst.add_argument("--all", action="store_true", help="include inactive geofences")
    lst.add_argument("--json", action="store_true", help="print JSON")
    rm = actions.add_parser("remove", help="remove geofences (soft delete)",
                            description="Remove geofences: workers stop evaluating them, the vehicles inside "
                            "get an exit, their open alerts are resolved and their Redis geofence:{id} keys dropped; "
                            "history stays. Prints what was closed per geofence.")
    rm.add_argument("ids", type=int, nargs="+", metavar="ID")
    rm.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=run)
