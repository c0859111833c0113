"""Who may write what: every write of the fleet-operations writers names an actor, an
active user whose role grants the write's permission.

:func:`authorize` is the one check. It resolves the actor (a user's e-mail or id) on the
caller's connection and raises :class:`Forbidden` when no live user answers to it, when
the user is disabled, or when their role lacks the permission; nothing has been written
then. The writers get it through :func:`requires`, which authorizes before the writer
runs and hands the writer the user's id as ``actor``: the audit log (``audit_logs.actor``)
and ``processed_commands.actor`` record user ids.

A role's permissions are ``roles.permissions`` ("*" grants everything). :data:`WRITES`
names each write permission and what it lets a user do; :func:`roles_table` renders the
README's table from the seeded roles.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

import asyncpg
import orjson

from fleet_telemetry.fleetops.errors import FleetOpsError

EVERYTHING = "*"

WRITES: dict[str, str] = {
    "vehicles:write": "register, update, delete vehicles",
    "drivers:write": "register, update, delete drivers",
    "customers:write": "register, update, delete customers",
    "assignments:write": "create, end, cancel assignments",
    "jobs:write": "create, update, assign, move, add cargo to, delete jobs",
    "maintenance:write": "record services; add and change schedules",
    "alerts:resolve": "resolve alerts by hand",
    "geofences:write": "add, import, update, remove geofences",
    "documents:write": "attach and change documents",
    "shipments:deliver": "attach a shipment's proof of delivery, which marks it (and its job) delivered",
    "users:write": "add, disable, delete users; set roles and passwords; issue and revoke tokens",
}
"""Every write permission a writer checks, with what it allows (README, "Roles")."""


class Forbidden(FleetOpsError):
    """The actor is unknown, disabled, or their role lacks the permission."""

    reason = "forbidden"


@dataclass(frozen=True)
class Actor:
    """An active user as the writers see them. Holds no secret (no password hash)."""

    id: UUID
    email: str
    role: str
    permissions: frozenset[str]
    driver_id: UUID | None = None

    def may(self, permission: str) -> bool:
        return EVERYTHING in self.permissions or permission in self.permissions

    def __str__(self) -> str:
        return str(self.id)


_USER = """
SELECT u.id, u.email, u.role, u.is_active, r.permissions,
       (SELECT d.id FROM drivers d WHERE d.user_id = u.id AND d.deleted_at IS NULL) AS driver_id
  FROM users u JOIN roles r ON r.name = u.role
 WHERE u.deleted_at IS NULL AND {match}
"""
_BY_ID = _USER.format(match="u.id = $1")
_BY_EMAIL = _USER.format(match="lower(u.email) = lower($1)")


def _as_id(name: str) -> UUID | None:
    try:
        return UUID(name)
    except ValueError:
        return None


async def find_user(conn: asyncpg.Connection, name: str | UUID) -> asyncpg.Record | None:
    """The live (not deleted) user with this id or e-mail, active or not, or None."""
    user_id = name if isinstance(name, UUID) else _as_id(name.strip())
    if user_id is not None:
        return await conn.fetchrow(_BY_ID, user_id)
    return await conn.fetchrow(_BY_EMAIL, str(name).strip())


def _permissions(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        value = orjson.loads(value)
    return frozenset(str(p) for p in value or ())


async def resolve(conn: asyncpg.Connection, actor: str | UUID | Actor) -> Actor:
    """The active user named by ``actor`` (e-mail or id); raises Forbidden otherwise."""
    name = actor.id if isinstance(actor, Actor) else actor
    if not isinstance(name, UUID) and not str(name or "").strip():
        raise Forbidden("unknown actor: name a user with --actor EMAIL or FLEET_ACTOR")
    row = await find_user(conn, name)
    if row is None:
        raise Forbidden(f"unknown actor {str(name)[:200]!r}: no user has this e-mail or id")
    if not row["is_active"]:
        raise Forbidden(f"forbidden: user {row['email']} is disabled")
    return Actor(row["id"], row["email"], row["role"], _permissions(row["permissions"]), row["driver_id"])


async def authorize(conn: asyncpg.Connection, actor: str | UUID | Actor, permission: str) -> Actor:
    """The active user named by ``actor`` if their role grants ``permission``.

    Reads on ``conn`` (inside the caller's transaction when there is one); writes nothing.
    Raises :class:`Forbidden` (a UsageError: exit 2; dead-letter reason ``forbidden``).
    """
    who = await resolve(conn, actor)
    if not who.may(permission):
        raise Forbidden(f"forbidden: {who.email} (role {who.role}) may not {permission}")
    return who


P = ParamSpec("P")
T = TypeVar("T")


def requires(permission: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Makes a writer ``f(conn, *, actor, ...)`` authorize ``actor`` for ``permission``
    first; the writer then runs with ``actor`` = the user's id (what the audit log keeps)."""
    if permission not in WRITES:
        raise ValueError(f"{permission} is not a write permission of WRITES")

    def decorate(writer: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(writer)
        async def checked(*args: P.args, **kwargs: P.kwargs) -> T:
            who = await authorize(args[0], kwargs["actor"], permission)  # type: ignore[arg-type]
            kwargs["actor"] = str(who.id)
            return await writer(*args, **kwargs)

        checked.permission = permission  # type: ignore[attr-defined]
        return checked

    return decorate


# --- the roles table ----------------------------------------------------------------------------


async def roles(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """The seeded roles: name, description, permissions (sorted)."""
    rows = await conn.fetch("SELECT name, description, permissions FROM roles ORDER BY id")
    return [{"name": r["name"], "description": r["description"],
             "permissions": sorted(_permissions(r["permissions"]))} for r in rows]


def roles_table(seeded: Iterable[Mapping[str, Any]]) -> str:
    """The Markdown table of which writes each role may do (README, "Roles")."""
    seeded = list(seeded)
    header = "| write permission | allows | " + " | ".join(r["name"] for r in seeded) + " |"
    lines = [header, "| --- | --- | " + " | ".join("---" for _ in seeded) + " |"]
    for permission, allows in WRITES.items():
        cells = ["yes" if EVERYTHING in r["permissions"] or permission in r["permissions"] else "-"
                 for r in seeded]
        lines.append(f"| `{permission}` | {allows} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
