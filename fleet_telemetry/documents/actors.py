"""Who uploads: the ``--actor`` of a documents command (or a command's user) as a user
whose role grants the documents permission (:func:`fleet_telemetry.fleetops.access.authorize`).

Uploading, deleting and attaching need ``documents:write``, except a proof of delivery of
a shipment (it marks the shipment delivered): uploading or attaching one, asking for its presigned
PUT, needs ``shipments:deliver``. Reading (a download, a listing, a URL to GET) needs
``documents:read``. An unknown, disabled or not permitted actor is refused with
:class:`~fleet_telemetry.fleetops.access.Forbidden` (exit status 2, or a dead letter with
reason ``forbidden``) before anything is stored.
"""

from __future__ import annotations

from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops.access import authorize

READ = "documents:read"
WRITE = "documents:write"
DELIVER = "shipments:deliver"


def write_permission(owner_type: str, kind: str) -> str:
    """The permission storing a ``kind`` document of an ``owner_type`` needs."""
    return DELIVER if owner_type == "shipment" and kind == "proof_of_delivery" else WRITE


async def uploader(conn: asyncpg.Connection, actor: str, permission: str = WRITE) -> UUID:
    """The id of the active user ``actor`` names (a user id or an e-mail address), if their
    role grants ``permission``; raises :class:`~fleet_telemetry.fleetops.access.Forbidden`."""
    return (await authorize(conn, actor, permission)).id
