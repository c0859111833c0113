"""``fleet services up|down|status``: the local stack on loopback."""

from __future__ import annotations

import argparse
import asyncio

from fleet_telemetry.cli.parsing import add_actions, add_command, seconds_arg
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.deploy.stack import down, status, up


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = add_command(
        sub, "services", "the local stack on loopback: PostgreSQL with PostGIS, Redis, a Kafka broker",
        "Start, stop or check the local stack: PostgreSQL with PostGIS, Redis and a Kafka-protocol broker at "
        "the FLEET_* addresses.", run)
    actions = add_actions(parser)
    up_parser = actions.add_parser(
        "up",
        help="start what does not answer yet (installing it with apt-get if needed)",
        description="Use every service that answers as it is; install (apt-get, pip) and "
        "start the missing ones on loopback and wait until they answer. When no broker "
        "answers, runs Tansu, which keeps its data in memory only.",
    )
    up_parser.add_argument(
        "--timeout",
        type=seconds_arg,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for each service to answer (default: 60)",
    )
    actions.add_parser("down", help="stop what 'up' started, and nothing else",
                       description="Stop the services 'fleet services up' started, and nothing else.")
    status_parser = actions.add_parser(
        "status", help="whether each service answers; exit 1 if one does not",
        description="Whether PostgreSQL, Redis and the Kafka broker answer at the FLEET_* addresses;"
        " exit 1 if one does not.",
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Runs the action; exit 0, or raises ServiceUnavailable (exit 1) with one line."""
    if args.action == "up":
        return asyncio.run(up(settings, args.timeout))
    if args.action == "down":
        return asyncio.run(down(settings))
    return asyncio.run(status(settings, args.json))
