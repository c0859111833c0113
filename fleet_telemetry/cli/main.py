"""The ``fleet`` command: builds the parser from the command-group modules, reads the
settings once, and turns errors into exit statuses with one line on stderr."""

from __future__ import annotations

import argparse
import asyncio
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Sequence

from pydantic import ValidationError

from fleet_telemetry.cli import consume, demo, fleetops, geofences, maintain, migrate, replay, services, simulate
from fleet_telemetry.cli import dead_letters, system
from fleet_telemetry.cli.parsing import Parser
from fleet_telemetry.core.errors import FleetError, UsageError

if TYPE_CHECKING:
    from fleet_telemetry.core.settings import Settings

# Command groups, in the order ``fleet --help`` lists them.
COMMAND_MODULES: tuple[ModuleType, ...] = (
    services, migrate, consume, simulate, demo, replay, maintain, geofences, fleetops, system, dead_letters,
)


def build_parser() -> Parser:
    parser = Parser(
        prog="fleet",
        description="Fleet telemetry ingestion: Kafka to PostgreSQL/PostGIS and Redis. "
        "Configuration comes from FLEET_* environment variables and a .env file.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def load_settings() -> "Settings":
    from fleet_telemetry.core.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "FLEET_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise UsageError(f"invalid configuration {field}: {first['msg']}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        from fleet_telemetry.core.logs import configure_logging

        configure_logging(settings.log_format, settings.log_level)
        result = args.handler(args, settings)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except FleetError as exc:
        sys.stderr.write(f"fleet {args.command}: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"fleet {args.command}: interrupted\n")
        return 130
