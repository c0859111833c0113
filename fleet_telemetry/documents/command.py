"""``document.attach`` on the command topic: registers an object a client uploaded
through a presigned PUT (``fleet documents url --put``), see docs/commands.md.

The handler is given to the command consumer by the command line (the consumer knows
only the fleet-operations writers); it opens the bucket per command and checks the
object before the row is inserted. A refusal is a dead letter with its reason
(``invalid_input``, ``not_found``, ``conflict``, ``unknown_actor``); a storage that does
not answer is retried like PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.documents import rules
from fleet_telemetry.documents.storage import Storage
from fleet_telemetry.documents.transfer import Upload, attach_object
from fleet_telemetry.fleetops.errors import InvalidInput
from fleet_telemetry.fleetops.values import parse_date, parse_int, parse_text, parse_uuid

ATTACH = "document.attach"
TYPES = (ATTACH,)
FIELDS = ("key", "owner_type", "owner_id", "kind", "file_name", "expires_on", "sha256", "size")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Handler = Callable[[asyncpg.Connection, str, dict[str, Any]], Awaitable[dict[str, Any]]]


def parse_attach(data: dict[str, Any]) -> tuple[Upload, str, str, int]:
    """The command's data checked: ``(upload, key, sha256, size)``. Raises InvalidInput."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f != "expires_on" and data.get(f) is None]
    if missing:
        raise InvalidInput(f"document.attach needs field(s): {', '.join(missing)}")
    sha256 = parse_text(data["sha256"], "sha256").lower()
    if not _SHA256.match(sha256):
        raise InvalidInput("field 'sha256' must be 64 hexadecimal digits")
    upload = Upload(
        owner_type=rules.owner_type(parse_text(data["owner_type"], "owner_type")),
        owner_id=parse_uuid(data["owner_id"], "owner_id"),
        kind=rules.kind(parse_text(data["kind"], "kind")),
        file_name=rules.file_name(parse_text(data["file_name"], "file_name")),
        expires_on=None if data.get("expires_on") is None else parse_date(data["expires_on"], "expires_on"),
    )
    return upload, parse_text(data["key"], "key", max_length=1024), sha256, parse_int(data["size"], "size", minimum=1)


def attach_handler(settings: Settings) -> Handler:
    """The ``document.attach`` handler of the command consumer, on ``settings``' bucket."""

    async def attach(conn: asyncpg.Connection, actor: str, data: dict[str, Any]) -> dict[str, Any]:
        upload, key, sha256, size = parse_attach(data)
        async with Storage.open(settings, check=False) as storage:
            document, created = await attach_object(conn, storage, upload, key, sha256=sha256, size=size,
                                                    actor=actor)
        return {**document, "created": created}

    return attach


def handlers(settings: Settings) -> dict[str, Handler]:
    """The command types this package adds to the command consumer."""
    return {ATTACH: attach_handler(settings)}
