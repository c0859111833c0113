"""What ``fleet maintain`` removes from the documents' bucket.

- the object of a document deleted more than ``FLEET_DOCUMENT_DELETED_GRACE_DAYS`` ago
  (the row stays, with ``object_removed_at`` set);
- objects under ``documents/`` that no row refers to, and every object under ``incoming/``
  (where presigned PUTs go; ``document.attach`` copies a checked one out and removes it),
  once older than ``FLEET_DOCUMENT_ORPHAN_GRACE_HOURS`` (an upload stopped between the
  object and the row, a presigned PUT never attached or put again after its attach, a
  duplicate whose removal failed); younger ones may be an upload in progress or a PUT
  awaiting ``document.attach`` and are kept;
- multipart uploads begun more than ``FLEET_DOCUMENT_ORPHAN_GRACE_HOURS`` ago (aborted).

Every removal is idempotent, so a pass stopped half-way is finished by the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from fleet_telemetry.documents.rules import DOCUMENTS_PREFIX, INCOMING_PREFIX
from fleet_telemetry.documents.storage import Storage, StoredObject

PAGE = 1000

_DELETED_PAST_GRACE = (
    "SELECT id, object_key FROM documents"
    " WHERE deleted_at IS NOT NULL AND object_removed_at IS NULL AND deleted_at < $1"
    " ORDER BY deleted_at LIMIT $2"
)
_KNOWN_KEYS = "SELECT object_key FROM documents WHERE object_key = ANY($1::text[])"


@dataclass
class CleanupReport:
    """What a pass removed from the bucket (or, dry, would remove)."""

    deleted_objects_removed: int = 0
    orphans_removed: int = 0
    young_orphans_kept: int = 0
    uploads_aborted: int = 0
    alerts_raised: int = 0
    alerts_resolved: int = 0
    skipped: str = ""
    """Why the bucket was left alone this pass (the storage did not answer), if it was."""


async def clean_bucket(conn: asyncpg.Connection, storage: Storage, report: CleanupReport, *, now: datetime,
                       orphan_grace: timedelta, deleted_grace: timedelta, dry_run: bool = False) -> None:
    """The three removals of the module docstring, counted in ``report``."""
    await _remove_deleted(conn, storage, report, now - deleted_grace, dry_run)
    await _remove_orphans(conn, storage, report, now - orphan_grace, dry_run)
    for upload in await storage.pending_uploads():
        if upload.initiated < now - orphan_grace:
            if not dry_run:
                await storage.abort(upload)
            report.uploads_aborted += 1


async def _remove_deleted(conn: asyncpg.Connection, storage: Storage, report: CleanupReport,
                          cutoff: datetime, dry_run: bool) -> None:
    if dry_run:
        report.deleted_objects_removed = await conn.fetchval(
            "SELECT count(*) FROM documents WHERE deleted_at IS NOT NULL AND object_removed_at IS NULL"
            " AND deleted_at < $1", cutoff)
        return
    while rows := await conn.fetch(_DELETED_PAST_GRACE, cutoff, PAGE):
        for row in rows:
            await storage.delete(row["object_key"])
            await conn.execute("UPDATE documents SET object_removed_at = now() WHERE id = $1", row["id"])
            report.deleted_objects_removed += 1


async def _remove_orphans(conn: asyncpg.Connection, storage: Storage, report: CleanupReport,
                          cutoff: datetime, dry_run: bool) -> None:
    for prefix in (DOCUMENTS_PREFIX, INCOMING_PREFIX):
        page: list[StoredObject] = []
        async for stored in storage.objects(f"{prefix}/"):
            page.append(stored)
            if len(page) >= PAGE:
                await _judge(conn, storage, report, page, cutoff, dry_run)
                page = []
        if page:
            await _judge(conn, storage, report, page, cutoff, dry_run)


async def _judge(conn: asyncpg.Connection, storage: Storage, report: CleanupReport, page: list[StoredObject],
                 cutoff: datetime, dry_run: bool) -> None:
    known = {r["object_key"] for r in await conn.fetch(_KNOWN_KEYS, [o.key for o in page])}
    for stored in page:
        if stored.key in known:
            continue
        if stored.last_modified >= cutoff:
            report.young_orphans_kept += 1
            continue
        if not dry_run:
            # Looked up again just before: a row inserted since the page was read keeps its object.
            if await conn.fetchval(_KNOWN_KEYS, [stored.key]) is not None:
                continue
            await storage.delete(stored.key)
        report.orphans_removed += 1
