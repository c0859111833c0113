"""The ``fleet`` command: builds the parser from the command-group modules, reads the
settings once, and turns every way a command can end into an exit status and at most
one line on stderr, never a traceback:

- 0: done;
- 1: the work failed (a service away or refusing, a database not migrated, ...);
- 2: bad usage or bad input (also bare ``fleet``, which prints the help);
- 130: interrupted by Ctrl-C (after the clean stop of a command that has one).

The command modules (and the libraries they need) are imported inside :func:`main`, so
a Ctrl-C while they load is an interruption like any other.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet_telemetry.cli.parsing import Parser
    from fleet_telemetry.core.settings import Settings

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def command_modules() -> tuple[ModuleType, ...]:
    """The command groups, in the order ``fleet --help`` lists them."""
    from fleet_telemetry.cli import consume, demo, fleetops, geofences, maintain, migrate, replay, services, simulate
    from fleet_telemetry.cli import dead_letters, documents, notify, system, users

    return (services, migrate, consume, simulate, demo, replay, maintain, geofences, fleetops, documents, users,
            notify, system, dead_letters)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fleet-telemetry")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> "Parser":
    from fleet_telemetry.cli.parsing import Parser

    parser = Parser(
        prog="fleet",
        description="Fleet telemetry ingestion: Kafka to PostgreSQL/PostGIS and Redis. "
        "Configuration comes from FLEET_* environment variables and a .env file.",
        epilog="Exit status: 0 done, 1 failed, 2 bad usage or input, 130 interrupted (Ctrl-C). "
        'Shell completion (bash, zsh): eval "$(register-python-argcomplete fleet)".',
    )
    parser.add_argument("--version", action="version", version=f"fleet {package_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in command_modules():
        module.register(sub)
    return parser


def load_settings() -> "Settings":
    from pydantic import ValidationError

    from fleet_telemetry.core.errors import UsageError
    from fleet_telemetry.core.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = "FLEET_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise UsageError(f"invalid configuration {field}: {first['msg']}") from None


def main(argv: Sequence[str] | None = None) -> int:
    name = "fleet"
    settings: "Settings | None" = None
    try:
        parser = build_parser()
        import argcomplete

        argcomplete.autocomplete(parser)  # answers a shell's completion request, then exits
        arguments = list(sys.argv[1:] if argv is None else argv)
        if not arguments:
            parser.print_help()
            return EXIT_USAGE
        args = parser.parse_args(arguments)
        name = f"fleet {args.command}"
        settings = load_settings()
        from fleet_telemetry.core.logs import configure_logging

        configure_logging(settings.log_format, settings.log_level)
        result = args.handler(args, settings)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or the main task cancelled by it
        sys.stderr.write(f"{name}: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (``fleet ... | head``): nothing left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        from fleet_telemetry.core.failures import report

        return report(exc, settings, name)
