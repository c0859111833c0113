"""``fleet consume``: the telemetry consumer workers."""

from __future__ import annotations

import argparse
from typing import Any

from fleet_telemetry.cli.parsing import add_command
from fleet_telemetry.consumers.supervise import run_workers
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.workers < 1:
        raise UsageError("--workers must be 1 or more")
    return run_workers(settings, args.workers, args.stop_when_idle)


SUMMARY = "run the telemetry consumer workers"
DESCRIPTION = (
    "Consume telemetry from FLEET_TELEMETRY_TOPIC into PostgreSQL and Redis; "
    "rejected readings go to FLEET_DLQ_TOPIC. SIGTERM or Ctrl-C finishes the in-flight "
    "batches, commits and leaves the group. With --workers N, worker i serves metrics on "
    "FLEET_METRICS_PORT + i."
)


def register(sub: Any) -> None:
    parser = add_command(sub, "consume", SUMMARY, DESCRIPTION, run)
    parser.add_argument("--workers", type=int, default=1, help="worker processes in the group (default 1)")
    parser.add_argument(
        "--stop-when-idle", type=float, default=None, metavar="SECONDS",
        help="exit 0 once no record arrived for SECONDS and everything is committed (backfills, tests)",
    )
