"""``fleet maintain``: the time-series lifecycle pass, once or ``--every`` so often."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

import orjson
import structlog

from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.metrics import serve
from fleet_telemetry.core.stopping import StopSignals
from fleet_telemetry.lifecycle.policy import REPORT_VIEWS, parse_every
from fleet_telemetry.lifecycle.run import Maintainer

if TYPE_CHECKING:
    from fleet_telemetry.core.settings import Settings

log = structlog.get_logger(__name__)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Adds ``fleet maintain`` to the ``fleet`` command line."""
    parser = sub.add_parser(
        "maintain",
        help="partitions, rollups, retention, materialized views (one pass, or --every)",
        description="One idempotent maintenance pass: move default-partition rows, create partitions"
        " ahead, roll up the hours marked dirty, drop raw partitions past FLEET_RAW_RETENTION_DAYS"
        " once rolled up, remove rollups past their retention, refresh monthly_vehicle_stats and"
        " monthly_vehicle_revenue when their nightly run is due. Safe to run from several places at once.",
    )
    parser.add_argument(
        "--every", metavar="DURATION", default=None,
        help="run a pass every DURATION (30s, 5m, 1h) until SIGTERM or Ctrl-C; metrics on"
        " FLEET_MAINTAIN_METRICS_PORT (on FLEET_METRICS_ADDRESS)",
    )
    parser.add_argument("--dry-run", action="store_true", help="show what a pass would do, change nothing")
    parser.add_argument("--refresh-stats", action="store_true",
                        help=f"refresh {' and '.join(REPORT_VIEWS)} now instead of at their nightly hour")
    parser.add_argument("--json", action="store_true", help="print the pass report as JSON")
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace, settings: "Settings") -> int:
    """``fleet maintain``: prints one line per thing done (or the JSON report)."""
    if args.every is not None and args.dry_run:
        raise UsageError("--dry-run shows one pass; it cannot be combined with --every")
    interval = parse_every(args.every) if args.every is not None else None
    maintainer = Maintainer(settings)
    if interval is None:
        report = await maintainer.run_once(dry_run=args.dry_run, force_stats=args.refresh_stats)
        if args.json:
            print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
        else:
            for line in report.lines():
                print(line)
        return 0
    stop = asyncio.Event()
    signals = StopSignals(stop.set).install()
    if settings.maintain_metrics_port:
        serve(maintainer.metrics, settings.maintain_metrics_port, settings.metrics_address,
              setting="FLEET_MAINTAIN_METRICS_PORT")
        log.info("metrics served", address=settings.metrics_address, port=settings.maintain_metrics_port,
                 path="/metrics")
    log.info("maintaining", every_s=interval, database=settings.database_url_masked)
    return signals.status(await maintainer.run_every(interval, stop, force_stats=args.refresh_stats))
