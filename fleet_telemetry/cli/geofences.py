"""``fleet geofences add|import|update|list|export|remove``: the geofence writer's command line.

What a geofence may be and how it is stored: :mod:`fleet_telemetry.consumers.rules.geofences`.
Warnings (coordinates that may be swapped) go to stderr as ``fleet geofences: warning:
...`` lines; the command still succeeds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import asyncpg
import orjson

from fleet_telemetry.cli.parsing import Parser
from fleet_telemetry.consumers.rules.geofences import (
    CLEAR,
    Changes,
    Closed,
    NewGeofence,
    Removal,
    connect,
    feature_collection,
    feature_name,
    from_feature,
    geojson_features,
    insert,
    list_geofences,
    parse_circle,
    polygon,
    positive,
    remove,
    swap_warning,
    update,
)
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops.access import authorize


class GeofenceParser(Parser):
    """The geofence commands' parser: ``--circle -33.9,18.4,500`` reads the negative
    latitude as an option, so the error says how to write it."""

    _given: list[str] = []

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument --circle: expected one argument"):
            given = self._given
            at = given.index("--circle") + 1 if "--circle" in given else len(given)
            value = given[at] if at < len(given) else "-33.9,18.4,500"
            message = (f"argument --circle: expected one argument: a negative latitude reads as an option,"
                       f" so write --circle={value}")
        super().error(message)


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


async def _warn_if_swapped(conn: asyncpg.Connection, fences: list[NewGeofence]) -> None:
    for fence in fences:
        warning = await swap_warning(conn, fence)
        if warning is not None:
            sys.stderr.write(f"fleet geofences: warning: {warning}\n")


_WRITES = frozenset({"add", "import", "update", "remove"})
"""The actions that need an actor whose role grants ``geofences:write``."""


async def run(args: argparse.Namespace, settings: Settings) -> int:
    conn = await connect(settings)
    try:
        if args.action in _WRITES:
            await authorize(conn, args.actor or settings.actor, "geofences:write")
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
    await _warn_if_swapped(conn, [fence])
    (fid,) = await insert(conn, [fence], active=not args.inactive)
    _print(args, {"id": fid, "name": fence.name, "kind": fence.kind},
           f"geofence {fid} added ({fence.kind} {fence.name!r})")
    return 0


async def _import(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    found = geojson_features(_read_source(args.source))
    defaults = {"speed_limit_kmh": args.speed_limit, "dwell_seconds": args.dwell}
    unnamed = [i for i, f in enumerate(found) if feature_name(f) is None]
    named = {i: args.name if len(unnamed) == 1 else f"{args.name} {n}" for n, i in enumerate(unnamed, start=1)}
    fences = [await from_feature(conn, f, f"feature {i}", {**defaults, "name": named.get(i) if args.name else None})
              for i, f in enumerate(found)]
    await _warn_if_swapped(conn, fences)
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


async def _export(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    if args.format == "json":
        data: Any = await list_geofences(conn, args.all, shapes=True)
    else:
        data = await feature_collection(conn, args.all)
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    return 0


async def _update(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    changes = Changes(name=args.name, speed_limit_kmh=args.speed_limit, dwell_seconds=args.dwell, active=args.active)
    shown, closed = await update(conn, args.id, changes, settings.redis_url, settings.redis_keys)
    if closed is not None:
        _redis_note(closed)
        shown["closed"] = [_closed_data(c) for c in closed.closed]
    lines = [f"geofence {shown['id']} updated ({shown['kind']} {shown['name']!r}, "
             f"{'active' if shown['active'] else 'inactive'})", *map(_closed_line, closed.closed if closed else [])]
    _print(args, shown, "\n".join(lines))
    return 0


async def _remove(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> int:
    removal = await remove(conn, args.ids, settings.redis_url, settings.redis_keys)
    _redis_note(removal)
    data = {"removed": removal.removed, "closed": [_closed_data(c) for c in removal.closed]}
    lines = [f"removed geofence {', '.join(map(str, removal.removed))}", *map(_closed_line, removal.closed)]
    _print(args, data, "\n".join(lines))
    return 0


def _redis_note(removal: Removal) -> None:
    if not removal.redis_answered:
        sys.stderr.write("fleet geofences: Redis not reachable; the workers drop the geofence:{id} keys\n")


def _closed_data(closed: Closed) -> dict[str, Any]:
    return {"id": closed.id, "exits": [str(v) for v in closed.exits], "alerts_resolved": closed.alerts_resolved}


def _closed_line(closed: Closed) -> str:
    """``geofence 7: exit recorded for 2 vehicles inside, 1 open alert resolved``."""
    n, m = len(closed.exits), len(closed.alerts_resolved)
    exits = f"exit recorded for {n} vehicle{'' if n == 1 else 's'} inside" if n else "no vehicle inside"
    alerts = f"{m} open alert{'' if m == 1 else 's'} resolved" if m else "no open alert"
    return f"geofence {closed.id}: {exits}, {alerts}"


_COMMANDS = {"add": _add, "import": _import, "update": _update, "list": _list, "export": _export, "remove": _remove}


def _limit(text: str) -> float | str:
    """``--speed-limit``/``--dwell`` of ``update``: a number above 0, or ``none`` to clear it."""
    if text.strip().lower() == CLEAR:
        return CLEAR
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number (or 'none' to clear it): {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0 (or 'none' to clear it), not {text}")
    return value


def _dwell(text: str) -> int | str:
    value = _limit(text)
    return value if isinstance(value, str) else int(value)


def _shape_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speed-limit", type=float, metavar="KMH", help="overspeed limit inside the fence")
    p.add_argument("--dwell", type=int, metavar="SECONDS",
                   help="minimum dwell before an enter or exit counts (default FLEET_GEOFENCE_DWELL_SECONDS)")
    p.add_argument("--inactive", action="store_true", help="store it switched off")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _actor_option(p)


def _actor_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actor", help="the user doing this, by e-mail or id (default FLEET_ACTOR); their role"
                   " must grant geofences:write")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "geofences", help="add, import, update, list, export and remove geofences",
        description="Manage geofences: polygons (WKT or GeoJSON) and circles (centre and radius in metres). "
        "Running workers pick changes up within FLEET_GEOFENCE_REFRESH_SECONDS.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=GeofenceParser)
    actions.required = True

    add = actions.add_parser("add", help="add one geofence",
                             description="Add one geofence. Exactly one of --wkt, --geojson, --circle.")
    add.add_argument("name", help="a name unique among the active geofences")
    add.add_argument("--wkt", help="POLYGON or MULTIPOLYGON in WKT, longitude first")
    add.add_argument("--geojson", metavar="FILE|JSON|-", help="a GeoJSON geometry or Feature (file, inline, or -)")
    add.add_argument("--circle", metavar="LAT,LON,RADIUS_M",
                     help="a circle: centre and radius in metres (write --circle=-33.9,151.2,500 when LAT is negative)")
    _shape_options(add)
    imp = actions.add_parser("import", help="import GeoJSON features",
                             description="Import every feature of a GeoJSON FeatureCollection (or one Feature), "
                             "all or nothing. Properties: name (required), speed_limit_kmh, dwell_seconds; a Point "
                             "feature with radius_m is a circle.")
    imp.add_argument("source", metavar="FILE|-", help="a GeoJSON file (Feature, FeatureCollection or geometry); - reads stdin")
    imp.add_argument("--name", help="the name of a feature without a 'name' property (several such features"
                     " are numbered: NAME 1, NAME 2, ...)")
    _shape_options(imp)
    upd = actions.add_parser("update", help="change a geofence's name, speed limit, dwell or active flag",
                             description="Change a geofence's name (unique among the active ones), speed limit, "
                             "dwell or active flag. Switching it off closes what was open for it, as 'remove' does "
                             "(exits, alerts resolved, its Redis geofence:{id} key dropped); its history stays.")
    upd.add_argument("id", type=int, metavar="ID", help="the geofence's id (fleet geofences list shows it)")
    upd.add_argument("--name", help="a new name, unique among the active geofences")
    upd.add_argument("--speed-limit", type=_limit, metavar="KMH|none", help="overspeed limit inside, or none")
    upd.add_argument("--dwell", type=_dwell, metavar="SECONDS|none",
                     help="minimum dwell, or none for FLEET_GEOFENCE_DWELL_SECONDS")
    switch = upd.add_mutually_exclusive_group()
    switch.add_argument("--active", dest="active", action="store_const", const=True, help="switch it on")
    switch.add_argument("--inactive", dest="active", action="store_const", const=False, help="switch it off")
    upd.add_argument("--json", action="store_true", help="print the result as JSON")
    _actor_option(upd)
    exp = actions.add_parser("export", help="the geofences as GeoJSON (what import reads) or JSON",
                             description="Print the geofences: a GeoJSON FeatureCollection that 'fleet geofences "
                             "import' reads back (circles as Points with radius_m), or with --json a list with each "
                             "polygon's WKT.")
    form = exp.add_mutually_exclusive_group()
    form.add_argument("--geojson", dest="format", action="store_const", const="geojson", help="GeoJSON (default)")
    form.add_argument("--json", dest="format", action="store_const", const="json", help="a JSON list")
    exp.set_defaults(format="geojson")
    exp.add_argument("--all", action="store_true", help="include inactive geofences (with active: false)")
    lst = actions.add_parser("list", help="list geofences",
                             description="The active geofences (with --all the inactive ones too): id, name, kind, speed limit, dwell.")
    lst.add_argument("--all", action="store_true", help="include inactive geofences")
    lst.add_argument("--json", action="store_true", help="print JSON")
    rm = actions.add_parser("remove", help="remove geofences (soft delete)",
                            description="Remove geofences: workers stop evaluating them, the vehicles inside "
                            "get an exit, their open alerts are resolved and their Redis geofence:{id} keys dropped; "
                            "history stays. Prints what was closed per geofence.")
    rm.add_argument("ids", type=int, nargs="+", metavar="ID", help="the ids of the geofences to remove")
    rm.add_argument("--json", action="store_true", help="print JSON")
    _actor_option(rm)
    parser.set_defaults(handler=run)
