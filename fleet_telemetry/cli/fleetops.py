"""``fleet vehicles|drivers|customers|assignments|jobs|maintenance|alerts|dashboard|commands``.

The entity commands are built from the table in :mod:`fleet_telemetry.cli.fleetops_table`.
Each opens the database (writes on the primary, read-only queries on a replica when
``FLEET_DATABASE_REPLICA_URLS`` names one that answers), prints the result as text or,
with ``--json``, as one JSON document, and exits 0. Bad input (an unknown id, an end
before its start, coordinates out of range, a double booking, ...) ends with one line
on stderr and exit status 2; an unreachable service with exit status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from uuid import uuid4

import asyncpg
import orjson

from fleet_telemetry.cli.fleetops_table import GROUPS, Action, json_object_arg, uuid_arg
from fleet_telemetry.cli.parsing import port_arg, seconds_arg
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.redis_client import connect_redis
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.documents import command as document_command
from fleet_telemetry.fleetops import access, commands, dashboard, tokens
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.tokens import TokenKeys
from fleet_telemetry.fleetops.vehicles import resolve_vehicle

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]

ACTOR_HELP = ("the user doing this, by e-mail or id (default FLEET_ACTOR); their role must allow the write,"
              " and the audit log records their id")


def register(sub: Any) -> None:
    """Adds ``fleet vehicles|drivers|customers|assignments|jobs|maintenance|dashboard|commands``."""
    for group in GROUPS:
        actions = _subcommands(sub, group.name, group.help)
        for action in group.actions:
            _add_action(actions, action)
    _register_dashboard(sub)
    _register_commands(sub)


def _subcommands(sub: Any, name: str, help: str) -> Any:
    parser = sub.add_parser(name, help=help, description=help)
    inner = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", parser_class=type(parser))
    inner.required = True
    return inner


def _add_action(sub: Any, action: Action) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(action.name, help=action.help,
                                                     description=action.description or action.help)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    if action.writes:
        parser.add_argument("--actor", help=ACTOR_HELP)
    for option in action.options:
        option.add_to(parser)
    parser.set_defaults(handler=_handler(action))


def _handler(action: Action) -> Handler:
    async def run(args: argparse.Namespace, settings: Settings) -> int:
        if action.writes:
            args.actor = args.actor or settings.actor
        try:
            async with Database.from_settings(settings, max_size=2) as database:
                await _resolve_vehicles(action, args, database)
                result = await _call(action, database, action.arguments(args), settings)
        except (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError) as exc:
            # SQLSTATE classes 22 and 23: input that broke a rule the writers do not check first.
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"refused by PostgreSQL: {message}") from None
        if action.writes:
            await dashboard.invalidate_for(settings)
        if action.render is not None and not args.json:
            print(action.render(result))
        else:
            _print(result, args.json, action.columns)
        return 0

    return run


async def _resolve_vehicles(action: Action, args: argparse.Namespace, database: Database) -> None:
    """Replaces each vehicle named by id, VIN or plate with its id (on the primary, so a
    vehicle just registered is found)."""
    named = [o.destination for o in action.options if o.vehicle and getattr(args, o.destination) is not None]
    if named:
        async with database.write() as conn:
            for destination in named:
                setattr(args, destination, await resolve_vehicle(conn, getattr(args, destination)))


async def _call(action: Action, database: Database, kwargs: dict[str, Any], settings: Settings) -> Any:
    if action.with_settings:
        return await action.call(database, settings=settings, **kwargs)
    if action.takes_database:
        return await action.call(database, **kwargs)
    async with (database.write() if action.writes else database.read()) as conn:
        return await action.call(conn, **kwargs)


# --- output ------------------------------------------------------------------------------------


def _print(result: Any, as_json: bool, columns: Sequence[str] = ()) -> None:
    if as_json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    if isinstance(result, list):
        if not result:
            print("(none)")
        for row in result:
            shown = columns or list(row)
            print("  ".join(f"{c}={display_value(row.get(c))}" for c in shown))
        return
    if isinstance(result, Mapping):
        for key, value in result.items():
            print(f"{key}: {display_value(value)}")
        return
    print(result)


def display_value(value: Any) -> str:
    """A value as one line of a table or a `key: value` listing: `-` for none, JSON for structures."""
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


# --- dashboard and commands ---------------------------------------------------------------------


async def _dashboard(args: argparse.Namespace, settings: Settings) -> int:
    redis = connect_redis(settings.redis_url)
    try:
        async with Database.from_settings(settings, max_size=2) as database:
            cache = dashboard.DashboardCache(redis, dashboard.database_compute(database),
                                             settings.dashboard_cache_seconds, key=settings.redis_keys.dashboard)
            if args.refresh:
                stats, cached = await cache.refresh(), False
            else:
                stats, cached = await cache.get()
    finally:
        await redis.aclose()
    _print(stats, args.json)
    if not args.json:
        print(f"(from the cache {settings.redis_keys.dashboard})" if cached else "(computed now)")
    return 0


def _register_dashboard(sub: Any) -> None:
    parser = sub.add_parser("dashboard", help="dashboard aggregates, cached in Redis",
                            description="Revenue, active vehicles, maintenance costs and open jobs, served from"
                            f" Redis key {dashboard.DASHBOARD_KEY} (after FLEET_REDIS_KEY_PREFIX) for"
                            " FLEET_DASHBOARD_CACHE_SECONDS or until a write changes them.")
    parser.add_argument("--json", action="store_true", help="print the aggregates as JSON")
    parser.add_argument("--refresh", action="store_true", help="recompute now and replace the cached value")
    parser.set_defaults(handler=_dashboard)


SENT_TOKEN_SECONDS = 300
"""Lifetime of the token ``fleet commands send`` issues for its actor."""


async def _command_token(args: argparse.Namespace, settings: Settings) -> str | None:
    """The token the command carries: read from stdin, or issued for the actor; None for v1."""
    if args.token_stdin:
        token = sys.stdin.readline().strip()
        if not token:
            raise UsageError("--token-stdin: standard input holds no token")
        return token
    if args.unsigned:
        return None
    keys = TokenKeys.required(settings)
    async with Database.from_settings(settings, max_size=1) as database, database.write() as conn:
        who = await access.resolve(conn, args.actor)
    token, _ = tokens.issue(keys, who.id, ttl_seconds=min(SENT_TOKEN_SECONDS, keys.max_ttl_seconds),
                            now=time.time())
    return token


async def _send_command(args: argparse.Namespace, settings: Settings) -> int:
    from fleet_telemetry.ingest.producer import start_producer

    command_id = args.id or uuid4()
    args.actor = args.actor or settings.actor
    token = await _command_token(args, settings)
    value = commands.command_value(args.type, args.data, command_id=command_id, token=token,
                                   actor=args.actor if token is None else None)
    producer = await start_producer(settings)
    try:
        key = args.key.encode() if args.key else None
        await producer.send_and_wait(settings.commands_topic, value, key=key)
    finally:
        await producer.stop()
    _print({"command_id": str(command_id), "topic": settings.commands_topic}, args.json)
    return 0


def _consume_commands(args: argparse.Namespace, settings: Settings) -> int:
    """The fleet-operations writers and ``document.attach``, on one command topic."""
    return commands.run_consumer(args, settings, handlers={**commands.HANDLERS,
                                                           **document_command.handlers(settings)})


def _register_commands(sub: Any) -> None:
    group = _subcommands(sub, "commands", "the command topic of the small writers (docs/commands.md)")
    p = group.add_parser("consume", help="apply commands from FLEET_COMMANDS_TOPIC",
                         description="Apply command events with the small writers, once per command_id;"
                         " rejected commands go to FLEET_COMMANDS_DLQ_TOPIC. SIGTERM or Ctrl-C stops cleanly.")
    p.add_argument("--stop-when-idle", type=seconds_arg, metavar="SECONDS",
                   help="exit 0 once no command arrived for SECONDS; exit 1 if the broker did not answer"
                   " for SECONDS at start")
    p.add_argument("--metrics-port", type=port_arg, default=0, help="serve /metrics on this port (default off)")
    p.set_defaults(handler=_consume_commands)

    p = group.add_parser("send", help="publish one command", description="Publish one command (version 2,"
                         " with a signed token) to FLEET_COMMANDS_TOPIC (the consumer applies it).")
    p.add_argument("type", choices=sorted([*commands.HANDLERS, *document_command.TYPES]),
                   help="the command type (docs/commands.md)")
    p.add_argument("--data", type=json_object_arg, required=True, help="the command's data as a JSON object")
    p.add_argument("--id", type=uuid_arg, help="command id (default: generated)")
    p.add_argument("--key", help="record key (default none; use the entity id to keep its commands ordered)")
    p.add_argument("--actor", help="the user the command acts as, by e-mail or id (default FLEET_ACTOR); a"
                   " token valid 300 s is issued for them with FLEET_JWT_SECRET or FLEET_JWT_PRIVATE_KEY")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--token-stdin", action="store_true",
                     help="read the token to attach from standard input (from 'fleet users token')")
    how.add_argument("--unsigned", action="store_true",
                     help="send a version 1 command naming --actor, without a token (accepted only while the"
                     " consumer runs with FLEET_COMMANDS_ALLOW_UNSIGNED=true)")
    p.add_argument("--json", action="store_true", help="print the command id and topic as JSON")
    p.set_defaults(handler=_send_command)
