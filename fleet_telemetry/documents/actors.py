"""Who uploads: the ``--actor`` of a documents command (or a command's ``actor``) as a user.

Uploading, deleting and handing out URLs need the permissions ``documents:write`` or
``documents:read``; until every write checks permissions in one place, this module only
requires an active user (``users.is_active``, not deleted), named by id or e-mail.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops.errors import FleetOpsError


class UnknownActor(FleetOpsError):
    """The actor names no active user."""

    reason = "unknown_actor"


_ACTIVE_USER = (
    "SELECT id FROM users WHERE is_active AND deleted_at IS NULL"
    " AND (id = $1::uuid OR ($1::uuid IS NULL AND lower(email) = lower($2)))"
)


async def uploader(conn: asyncpg.Connection, actor: str) -> UUID:
    """The id of the active user ``actor`` names (a user id or an e-mail address).

    Raises :class:`UnknownActor` (exit status 2, or a dead letter) when there is none."""
    text = actor.strip()
    try:
        as_id: UUID | None = UUID(text)
    except ValueError:
        as_id = None
    found = await conn.fetchval(_ACTIVE_USER, as_id, text)
    if found is None:
        raise UnknownActor(f"actor {text[:100]!r} is not an active user (give a user's e-mail or id)")
    return UUID(str(found))
