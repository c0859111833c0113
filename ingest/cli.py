"""The ``fleet`` command line.

Each command lives in the module that does its work; that module exposes
``register(subparsers)`` which adds its parser and sets ``handler`` to a function
``handler(args, settings) -> int``. This module only builds the parser, reads the
settings once, and turns errors into exit statuses with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from typing import TYPE_CHECKING, NoReturn, Sequence

from pydantic import ValidationError

from ingest.errors import FleetError, UsageError

if TYPE_CHECKING:
    from ingest.settings import Settings

# Command modules, in the order ``fleet --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "deploy.services",
    "schema.migrate",
    "consumers.worker",
    "ingest.simulate",
    "ingest.demo",
    "consumers.replay",
    "schema.maintain",
    "consumers.geofence_cli",
    "consumers.fleetops.cli",
)


class Parser(argparse.ArgumentParser):
    """argparse with one readable line and exit status 2 on bad usage."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> Parser:
    parser = Parser(
        prog="fleet",
        description="Fleet telemetry ingestion: Kafka to PostgreSQL/PostGIS and Redis. "
        "Configuration comes from FLEET_* environment variables and a .env file.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def load_settings() -> "Settings":
    from ingest.settings import Settings

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
        from ingest.logs import configure_logging

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
