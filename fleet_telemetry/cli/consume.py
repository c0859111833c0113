"""``fleet consume``: the telemetry consumer workers."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from fleet_telemetry.cli.parsing import add_command, seconds_arg
from fleet_telemetry.consumers.supervise import run_workers
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Runs the workers until they stop; then one summary line on stderr (or, with
    ``--json``, one JSON object on stdout). Exit 0 after a clean stop, 1 when work was
    left for redelivery, 130 after a Ctrl-C."""
    if args.workers < 1:
        raise UsageError("--workers must be 1 or more")
    outcome = run_workers(settings, args.workers, args.stop_when_idle)
    if args.json:
        sys.stdout.write(orjson.dumps({**outcome.summary.to_json(), "exit_status": outcome.status,
                                       "interrupted": outcome.interrupted}).decode() + "\n")
    else:
        sys.stderr.write(outcome.summary.text() + ("; interrupted" if outcome.interrupted else "") + "\n")
    return outcome.status


SUMMARY = "run the telemetry consumer workers"
DESCRIPTION = (
    "Consume telemetry from FLEET_TELEMETRY_TOPIC into PostgreSQL and Redis; "
    "rejected readings go to FLEET_DLQ_TOPIC. SIGTERM or Ctrl-C finishes the in-flight "
    "batches, commits and leaves the group (exit 0 after SIGTERM, 130 after Ctrl-C), then "
    "a summary line tells what was stored. With --workers N, worker i serves metrics on "
    "FLEET_METRICS_PORT + i."
)


def register(sub: Any) -> None:
    parser = add_command(sub, "consume", SUMMARY, DESCRIPTION, run)
    parser.add_argument("--workers", type=int, default=1, help="worker processes in the group (default 1)")
    parser.add_argument(
        "--stop-when-idle", type=seconds_arg, default=None, metavar="SECONDS",
        help="exit 0 once no record arrived for SECONDS and everything is committed (backfills, tests);"
        " exit 1 if the broker did not answer for SECONDS at start",
    )
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object on stdout instead of a line on stderr")
