"""``fleet migrate``: applies the schema migrations to ``FLEET_DATABASE_URL``."""

from __future__ import annotations

import argparse
import json

from fleet_telemetry.cli.parsing import add_command
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.schema.migrate import apply_migrations


SUMMARY = "apply the schema migrations to FLEET_DATABASE_URL"
DESCRIPTION = (
    "Create the database if needed and apply the numbered SQL migrations"
    " not yet applied, each in its own transaction. Safe to run again and to run"
    " concurrently; an applied migration that was edited is refused."
)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = add_command(sub, "migrate", SUMMARY, DESCRIPTION, run)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the versions applied by this run as a JSON list",
    )


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """One line per applied migration, then a summary line; with ``--json`` the list."""

    def announce(version: str) -> None:
        print(f"applied {version}", flush=True)

    applied = await apply_migrations(
        settings.database_url, on_applied=None if args.json else announce
    )
    if args.json:
        print(json.dumps(applied))
    elif not applied:
        print("schema is up to date")
    else:
        noun = "migration" if len(applied) == 1 else "migrations"
        print(f"{len(applied)} {noun} applied")
    return 0
