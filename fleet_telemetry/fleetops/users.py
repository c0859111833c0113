"""The user accounts: add, show, list, disable, enable, delete (soft), set a role, set a
password; each change with its audit row, authorized like every writer
(:mod:`fleet_telemetry.fleetops.access`, permission ``users:write``).

Passwords arrive as ``SecretStr`` and are stored as argon2id hashes (argon2-cffi's
``PasswordHasher`` defaults); neither a password nor a hash is ever returned, logged or
put in the audit log. E-mail addresses are unique among live users, case-insensitively
(``users_email_key``). A user is linked to their driver profile by ``drivers.user_id``.

The first admin: :func:`add_user` without an actor (or naming the new user) adds an
``admin`` only while no active admin exists (checked under a table lock, so two at once cannot both succeed).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from uuid import UUID

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import SecretStr

from fleet_telemetry.fleetops import audit
from fleet_telemetry.fleetops.access import Actor, Forbidden, authorize, find_user, requires, resolve
from fleet_telemetry.fleetops.errors import Conflict, InvalidInput, NotFound

MIN_PASSWORD_LENGTH = 10
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+")
_HASHER = PasswordHasher()

_PUBLIC = """
SELECT u.id, u.email, u.role, u.is_active, u.created_at, u.updated_at, u.deleted_at,
       (SELECT d.id FROM drivers d WHERE d.user_id = u.id AND d.deleted_at IS NULL) AS driver_id
  FROM users u
"""
"""The columns a user is shown with: never ``password_hash``."""


def hash_password(password: SecretStr) -> str:
    """The argon2id hash of a password of at least MIN_PASSWORD_LENGTH characters."""
    text = password.get_secret_value()
    if len(text) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return _HASHER.hash(text)


def password_matches(password_hash: str, password: SecretStr) -> bool:
    try:
        return _HASHER.verify(password_hash, password.get_secret_value())
    except (VerificationError, InvalidHashError):
        return False


def _email(value: str) -> str:
    email = value.strip()
    if not _EMAIL.fullmatch(email) or len(email) > 320:
        raise InvalidInput(f"not an e-mail address: {value[:100]!r}")
    return email


async def _role(conn: asyncpg.Connection, role: str) -> str:
    if await conn.fetchval("SELECT 1 FROM roles WHERE name = $1", role) is None:
        known = await conn.fetchval("SELECT string_agg(name, ', ' ORDER BY id) FROM roles")
        raise InvalidInput(f"no role {role!r}; roles: {known}")
    return role


async def show(conn: asyncpg.Connection, user_id: UUID) -> dict[str, Any]:
    row = await conn.fetchrow(_PUBLIC + " WHERE u.id = $1", user_id)
    if row is None:
        raise NotFound(f"no user with id {user_id}")
    return audit.snapshot(row) or {}


async def get_user(conn: asyncpg.Connection, name: str) -> dict[str, Any]:
    """The live user with this e-mail or id; raises NotFound."""
    row = await find_user(conn, name)
    if row is None:
        raise NotFound(f"no user {name[:200]!r} (unknown e-mail or id, or deleted)")
    return await show(conn, row["id"])


async def list_users(conn: asyncpg.Connection, *, role: str | None = None, deleted: bool = False,
                     limit: int = 100) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        _PUBLIC + " WHERE ($1::text IS NULL OR u.role = $1) AND ($2 OR u.deleted_at IS NULL)"
        " ORDER BY lower(u.email), u.created_at LIMIT $3", role, deleted, limit)
    return [audit.snapshot(r) or {} for r in rows]


async def _link_driver(conn: asyncpg.Connection, user_id: UUID, driver_id: UUID) -> None:
    driver = await conn.fetchrow("SELECT user_id FROM drivers WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
                                 driver_id)
    if driver is None:
        raise NotFound(f"no driver with id {driver_id} (unknown, or deleted)")
    if driver["user_id"] is not None and driver["user_id"] != user_id:
        raise Conflict(f"driver {driver_id} is linked to user {driver['user_id']} already")
    await conn.execute("UPDATE drivers SET user_id = $2 WHERE id = $1", driver_id, user_id)


async def add_user(conn: asyncpg.Connection, *, actor: str | None, email: str, password: SecretStr,
                   role: str = "viewer", driver_id: UUID | None = None) -> dict[str, Any]:
    """Adds an active user (linked to ``driver_id``'s profile when given); returns it.

    ``actor`` needs ``users:write``. Without an actor (None or empty), or with the new
    user's own e-mail as actor, only the first admin can be added: ``role`` must be
    ``admin`` and no active admin may exist.
    Raises InvalidInput, Conflict (e-mail in use, driver linked to another user),
    NotFound (driver), Forbidden.
    """
    email = _email(email)
    password_hash = await asyncio.to_thread(hash_password, password)
    async with conn.transaction():
        if actor and actor.strip().lower() != email.lower():
            who: Actor | None = await authorize(conn, actor, "users:write")
        else:  # nobody named, or the first admin naming themselves (FLEET_ACTOR set ahead)
            who = None
            await _bootstrap_allowed(conn, role)
        await _role(conn, role)
        try:
            async with conn.transaction():
                user_id = await conn.fetchval(
                    "INSERT INTO users (email, password_hash, role) VALUES ($1, $2, $3) RETURNING id",
                    email, password_hash, role)
        except asyncpg.exceptions.UniqueViolationError:
            raise Conflict(f"a user with e-mail {email} exists already") from None
        if driver_id is not None:
            await _link_driver(conn, user_id, driver_id)
        after = await show(conn, user_id)
        await audit.record(conn, actor=str(who.id if who else user_id),
                           action="user.add" if who else "user.bootstrap", entity_type="user",
                           entity_id=user_id, before=None, after=after)
    return after


async def _bootstrap_allowed(conn: asyncpg.Connection, role: str) -> None:
    # SHARE ROW EXCLUSIVE conflicts with itself and with inserts: one bootstrap at a time.
    await conn.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
    admins = await conn.fetchval(
        "SELECT count(*) FROM users WHERE role = 'admin' AND is_active AND deleted_at IS NULL")
    if admins:
        raise Forbidden("unknown actor: an admin exists, so name yourself with --actor EMAIL or FLEET_ACTOR")
    if role != "admin":
        raise Forbidden("forbidden: without an actor only the first admin can be added (--role admin)")


async def _change(conn: asyncpg.Connection, actor: str, target: str, action: str, sql: str,
                  *params: Any) -> dict[str, Any]:
    async with conn.transaction():
        row = await find_user(conn, target)
        if row is None:
            raise NotFound(f"no user {target[:200]!r} (unknown e-mail or id, or deleted)")
        before = await show(conn, row["id"])
        await conn.execute(sql, row["id"], *params)
        after = await show(conn, row["id"])
        await audit.record(conn, actor=actor, action=action, entity_type="user", entity_id=row["id"],
                           before=before, after=after)
    return after


@requires("users:write")
async def set_active(conn: asyncpg.Connection, *, actor: str, user: str, active: bool) -> dict[str, Any]:
    """Disables (their writes are refused from now on) or enables a user."""
    return await _change(conn, actor, user, "user.enable" if active else "user.disable",
                         "UPDATE users SET is_active = $2 WHERE id = $1", active)


@requires("users:write")
async def delete_user(conn: asyncpg.Connection, *, actor: str, user: str) -> dict[str, Any]:
    """Soft-deletes a user: disabled, their e-mail free for a new account, the row kept."""
    return await _change(conn, actor, user, "user.delete",
                         "UPDATE users SET is_active = false, deleted_at = now() WHERE id = $1")


@requires("users:write")
async def set_role(conn: asyncpg.Connection, *, actor: str, user: str, role: str) -> dict[str, Any]:
    await _role(conn, role)
    return await _change(conn, actor, user, "user.set_role", "UPDATE users SET role = $2 WHERE id = $1", role)


async def set_password(conn: asyncpg.Connection, *, actor: str, user: str, password: SecretStr) -> dict[str, Any]:
    """A user sets their own password; setting another's needs ``users:write``."""
    who = await resolve(conn, actor)
    target = await find_user(conn, user)
    if target is None or target["id"] != who.id:
        who = await authorize(conn, who, "users:write")
    password_hash = await asyncio.to_thread(hash_password, password)
    return await _change(conn, str(who.id), user, "user.passwd",
                         "UPDATE users SET password_hash = $2 WHERE id = $1", password_hash)


async def self_or_admin(conn: asyncpg.Connection, actor: str, user: str) -> tuple[Actor, dict[str, Any]]:
    """The actor and the user they act on, when it is themselves or they have ``users:write``."""
    who = await resolve(conn, actor)
    target = await get_user(conn, user)
    if target["id"] != str(who.id):
        who = await authorize(conn, who, "users:write")
    return who, target
