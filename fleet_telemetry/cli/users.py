"""``fleet users add|list|show|disable|enable|delete|set-role|passwd|token|revoke|roles``.

Passwords are read from the terminal (asked twice) or, with ``--password-stdin``, from
the first line of standard input; never from the command line. Changes need an actor
with ``users:write`` (``--actor`` or ``FLEET_ACTOR``), except the first admin
(README, "Users and roles"), a user's own password, token and revocation.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from typing import Any
from uuid import UUID

import orjson
from pydantic import SecretStr

from fleet_telemetry.cli.fleetops_table import uuid_arg
from fleet_telemetry.cli.parsing import add_actions, add_command, count_arg
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.redis_client import connect_redis
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.fleetops import access, sessions, tokens, users
from fleet_telemetry.fleetops.db import Database

ACTOR_HELP = "the user doing this, by e-mail or id (default FLEET_ACTOR)"
USER_HELP = "the user's e-mail or id"
TOKEN_SECONDS = 3600


def _password(args: argparse.Namespace) -> SecretStr:
    if args.password_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise UsageError("--password-stdin: standard input holds no password")
        return SecretStr(line)
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask for the password: give it on standard input with --password-stdin")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat the password: ") != first:
        raise UsageError("the passwords differ")
    return SecretStr(first)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else text)


def _line(user: dict[str, Any]) -> str:
    state = "deleted" if user["deleted_at"] else "active" if user["is_active"] else "disabled"
    driver = f"  driver {user['driver_id']}" if user.get("driver_id") else ""
    return f"{user['id']}  {user['email']}  {user['role']}  {state}{driver}"


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    actor = getattr(args, "actor", None) or settings.actor
    async with Database.from_settings(settings, max_size=1) as database, database.write() as conn:
        data, text = await _ACTIONS[args.action](conn, args, settings, actor)
    _print(args, data, text)
    return 0


async def _add(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    user = await users.add_user(conn, actor=actor or None, email=args.email, password=_password(args),
                                role=args.role, driver_id=args.driver)
    return user, f"user {user['id']} added: {user['email']} ({user['role']})"


async def _list(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    found = await users.list_users(conn, role=args.role, deleted=args.deleted, limit=args.limit)
    return found, "\n".join(map(_line, found)) or "(none)"


async def _show(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    user = await users.get_user(conn, args.user)
    return user, "\n".join(f"{k}: {'-' if v is None else v}" for k, v in user.items())


async def _disable(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    user = await users.set_active(conn, actor=actor, user=args.user, active=False)
    return user, f"user {user['email']} disabled: their writes and commands are refused"


async def _enable(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    user = await users.set_active(conn, actor=actor, user=args.user, active=True)
    return user, f"user {user['email']} enabled"


async def _delete(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    user = await users.delete_user(conn, actor=actor, user=args.user)
    return user, f"user {user['email']} deleted (the row stays; the e-mail is free again)"


async def _set_role(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    user = await users.set_role(conn, actor=actor, user=args.user, role=args.role)
    return user, f"user {user['email']} now has role {user['role']}"


async def _passwd(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    user = await users.set_password(conn, actor=actor, user=args.user, password=_password(args))
    return user, f"password of {user['email']} changed"


async def _token(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    keys = tokens.TokenKeys.required(settings)
    _, user = await users.self_or_admin(conn, actor, args.user)
    if not user["is_active"]:
        raise UsageError(f"user {user['email']} is disabled; their tokens would be refused")
    ttl = args.ttl if args.ttl is not None else min(TOKEN_SECONDS, keys.max_ttl_seconds)
    token, claims = tokens.issue(keys, UUID(user["id"]), ttl_seconds=ttl, now=time.time())
    data = {"token": token, "sub": str(claims.user_id), "exp": claims.expires_at, "jti": claims.token_id}
    return data, token


async def _revoke(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    _, user = await users.self_or_admin(conn, actor, args.user)
    redis = connect_redis(settings.redis_url)
    try:
        keys, revoked_at = await sessions.revoke(conn, redis, settings.redis_keys, UUID(user["id"]),
                                                 now=time.time(), keep_seconds=settings.jwt_max_ttl_seconds)
    finally:
        await redis.aclose()
    data = {"user": user["id"], "key": keys[0], "keys": keys, "revoked_at": revoked_at,
            "kept_seconds": settings.jwt_max_ttl_seconds}
    return data, (f"tokens of {user['email']} issued up to {revoked_at} (epoch seconds) revoked"
                  f" ({', '.join(keys)}, kept {settings.jwt_max_ttl_seconds} s)")


async def _roles(conn: Any, args: argparse.Namespace, settings: Settings, actor: str) -> tuple[Any, str]:
    seeded = await access.roles(conn)
    return seeded, access.roles_table(seeded)


_ACTIONS = {"add": _add, "list": _list, "show": _show, "disable": _disable, "enable": _enable, "delete": _delete,
            "set-role": _set_role, "passwd": _passwd, "token": _token, "revoke": _revoke, "roles": _roles}


def _common(p: argparse.ArgumentParser, *, actor: bool = True, user: bool = True) -> None:
    if user:
        p.add_argument("user", metavar="USER", help=USER_HELP)
    if actor:
        p.add_argument("--actor", help=ACTOR_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _password_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input instead of asking")


def _action(actions: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help, description=description or help)
    return parser


def register(sub: Any) -> None:
    parser = add_command(sub, "users", "user accounts, roles and command tokens",
                         "Add and change user accounts (argon2id password hashes), issue and revoke the"
                         " tokens that sign commands, and show which writes each role may do.")
    parser.set_defaults(handler=_run)
    actions = add_actions(parser)
    p = _action(actions, "add", "add a user", "Add an active user. Without an actor this"
                           " works only for the first admin (--role admin while no active admin exists).")
    p.add_argument("--email", required=True, help="the user's e-mail address, unique among live users")
    p.add_argument("--role", default="viewer", help="admin, fleet_manager, dispatcher, mechanic, driver or viewer"
                   " (default viewer; 'fleet users roles' lists them)")
    p.add_argument("--driver", type=uuid_arg, help="link the user to this driver profile (drivers.id)")
    _password_option(p)
    _common(p, user=False)
    p = _action(actions, "list", "users by e-mail")
    p.add_argument("--role", help="only users of this role")
    p.add_argument("--deleted", action="store_true", help="include deleted users")
    p.add_argument("--limit", type=count_arg, default=100, help="at most this many users (default 100)")
    p.add_argument("--json", action="store_true", help="print the users as JSON")
    _common(_action(actions, "show", "one user"), actor=False)
    _common(_action(actions, "disable", "disable a user: their writes and commands are refused"))
    _common(_action(actions, "enable", "enable a disabled user"))
    _common(_action(actions, "delete", "soft-delete a user (the row stays; the e-mail is free again)"))
    p = _action(actions, "set-role", "give a user another role")
    _common(p)
    p.add_argument("role", help="the new role")
    p = _action(actions, "passwd", "set a user's password (your own, or any with users:write)")
    _common(p)
    _password_option(p)
    p = _action(actions, "token", "issue a command token for a user",
                           "Print a signed token (JWT, sub = the user's id) for version 2 commands."
                           " Your own, or any user's with users:write.")
    _common(p)
    p.add_argument("--ttl", type=int, metavar="SECONDS",
                   help="lifetime (default 3600, at most FLEET_JWT_MAX_TTL_SECONDS)")
    _common(_action(actions, "revoke", "revoke every token issued to a user until now",
                               "Write the user's session key in Redis (and, for a user linked to a driver"
                               " profile, the driver's): tokens issued until now are refused for"
                               " FLEET_JWT_MAX_TTL_SECONDS, the longest they could live."))
    p = _action(actions, "roles", "the roles and which writes each may do (a Markdown table)")
    p.add_argument("--json", action="store_true", help="print the roles and their permissions as JSON")
