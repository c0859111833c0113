"""The ``documents`` rows: registering an uploaded object, reading, soft-deleting.

Each write runs in its own transaction with its ``audit_logs`` row. Registering a
``proof_of_delivery`` of a shipment also delivers the shipment (and its job once every
shipment of an in-transit job is delivered) in the same transaction. The objects
themselves are the business of :mod:`fleet_telemetry.documents.storage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.documents import expiry
from fleet_telemetry.documents.rules import OWNER_COLUMNS, OWNER_TABLES
from fleet_telemetry.fleetops import audit, jobs
from fleet_telemetry.fleetops.audit import snapshot
from fleet_telemetry.fleetops.errors import Conflict, NotFound

_COLUMNS = (
    "id, owner_type, owner_id, kind, object_key, sha256, size_bytes, content_type, file_name,"
    " uploaded_by, created_at, expires_on, deleted_at"
)


@dataclass(frozen=True)
class NewDocument:
    """An object in the bucket, checked, waiting to become a row."""

    owner_type: str
    owner_id: UUID
    kind: str
    object_key: str
    sha256: str
    size_bytes: int
    content_type: str
    file_name: str
    uploaded_by: UUID
    expires_on: date | None = None


async def check_owner(conn: asyncpg.Connection, owner_type: str, owner_id: UUID) -> None:
    """Raises :class:`NotFound` unless the owner exists (and is not soft-deleted); locks
    its row against deletion until the transaction ends."""
    table, soft_deleted = OWNER_TABLES[owner_type]
    live = " AND deleted_at IS NULL" if soft_deleted else ""
    found = await conn.fetchval(f"SELECT 1 FROM {table} WHERE id = $1{live} FOR SHARE", owner_id)
    if found is None:
        raise NotFound(f"no {owner_type.replace('_', ' ')} with id {owner_id} (unknown, or deleted)")


async def same_content(conn: asyncpg.Connection, owner_id: UUID, kind: str, sha256: str) -> dict[str, Any] | None:
    """The live document of ``owner_id`` and ``kind`` with these bytes, if there is one."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM documents WHERE owner_id = $1 AND kind = $2 AND sha256 = $3"
        " AND deleted_at IS NULL", owner_id, kind, sha256)
    return snapshot(row)


async def register(conn: asyncpg.Connection, new: NewDocument, *, actor: str,
                   action: str = "document.upload") -> tuple[dict[str, Any], bool]:
    """Inserts the row of an uploaded object with its audit row; returns ``(document, created)``.

    When the owner already has a live document of this kind with the same bytes, nothing is
    inserted and that document is returned with ``created`` False (its caller removes the
    object just uploaded). Raises :class:`NotFound` for an owner that is gone,
    :class:`Conflict` for a key already registered or a shipment whose job cannot be delivered.
    """
    async with conn.transaction():
        await check_owner(conn, new.owner_type, new.owner_id)
        existing = await same_content(conn, new.owner_id, new.kind, new.sha256)
        if existing is not None:
            return existing, False
        column = OWNER_COLUMNS[new.owner_type]
        try:
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"INSERT INTO documents ({column}, kind, object_key, sha256, size_bytes, content_type,"
                    " file_name, uploaded_by, expires_on) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                    f" RETURNING {_COLUMNS}",
                    new.owner_id, new.kind, new.object_key, new.sha256, new.size_bytes, new.content_type,
                    new.file_name, new.uploaded_by, new.expires_on)
        except asyncpg.exceptions.UniqueViolationError as exc:
            if exc.constraint_name == "documents_same_content":  # a concurrent upload of the same bytes
                raced = await same_content(conn, new.owner_id, new.kind, new.sha256)
                if raced is not None:
                    return raced, False
            raise Conflict(f"object {new.object_key} is registered already") from None
        document = snapshot(row) or {}
        await audit.record(conn, actor=actor, action=action, entity_type="document",
                           entity_id=document["id"], before=None, after=document)
        await expiry.resolve_superseded(conn, owner_id=new.owner_id, kind=new.kind, newest=document["id"])
        if new.kind == "proof_of_delivery" and new.owner_type == "shipment":
            document["shipment"] = await deliver_shipment(conn, new.owner_id, actor=actor,
                                                          document_id=document["id"])
    return document, True


async def deliver_shipment(conn: asyncpg.Connection, shipment_id: UUID, *, actor: str,
                           document_id: UUID) -> dict[str, Any]:
    """Inside the caller's transaction: the shipment becomes ``delivered`` (audited
    ``shipment.deliver``); once no shipment of its job is pending and the job is
    ``in_transit``, the job becomes ``delivered`` too (audited by the job writer).
    A shipment delivered already stays as it is. Raises :class:`Conflict` when the job
    is cancelled or deleted."""
    before = await conn.fetchrow("SELECT * FROM shipments WHERE id = $1 FOR UPDATE", shipment_id)
    if before is None:
        raise NotFound(f"no shipment with id {shipment_id}")
    job = await conn.fetchrow("SELECT status, deleted_at FROM transport_jobs WHERE id = $1 FOR UPDATE",
                              before["job_id"])
    if job["deleted_at"] is not None or job["status"] == "cancelled":
        raise Conflict(f"shipment {shipment_id} belongs to job {before['job_id']}, which is"
                       f" {'deleted' if job['deleted_at'] is not None else 'cancelled'}")
    if before["status"] == "delivered":
        return snapshot(before) or {}
    after = await conn.fetchrow(
        "UPDATE shipments SET status = 'delivered', delivered_at = now() WHERE id = $1 RETURNING *", shipment_id)
    await audit.record(conn, actor=actor, action="shipment.deliver", entity_type="shipment",
                       entity_id=shipment_id, before=snapshot(before),
                       after={**(snapshot(after) or {}), "proof_of_delivery": str(document_id)})
    pending = await conn.fetchval(
        "SELECT count(*) FROM shipments WHERE job_id = $1 AND status <> 'delivered'", before["job_id"])
    if pending == 0 and job["status"] == "in_transit":
        # The delivery was authorized (shipments:deliver); the job's status follows from it,
        # so the job writer runs without its own jobs:write check.
        await jobs.set_job_status.__wrapped__(  # type: ignore[attr-defined]
            conn, actor=actor, job_id=before["job_id"], status="delivered")
    return snapshot(after) or {}


async def get(conn: asyncpg.Connection, document_id: UUID, *, include_deleted: bool = False) -> dict[str, Any]:
    """One document; raises :class:`NotFound` for an unknown (or deleted) id."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM documents WHERE id = $1"
        + ("" if include_deleted else " AND deleted_at IS NULL"), document_id)
    if row is None:
        raise NotFound(f"no document with id {document_id} (unknown, or deleted)")
    return snapshot(row) or {}


async def find(conn: asyncpg.Connection, *, owner_id: UUID | None = None, kind: str | None = None,
               include_deleted: bool = False, limit: int = 100) -> list[dict[str, Any]]:
    """Documents newest first, of one owner and/or kind."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM documents WHERE ($1::uuid IS NULL OR owner_id = $1)"
        " AND ($2::text IS NULL OR kind = $2) AND ($3 OR deleted_at IS NULL)"
        " ORDER BY created_at DESC, id LIMIT $4", owner_id, kind, include_deleted, limit)
    return [snapshot(r) or {} for r in rows]


async def by_key(conn: asyncpg.Connection, object_key: str) -> dict[str, Any] | None:
    return snapshot(await conn.fetchrow(f"SELECT {_COLUMNS} FROM documents WHERE object_key = $1", object_key))


async def delete(conn: asyncpg.Connection, document_id: UUID, *, actor: str) -> dict[str, Any]:
    """Soft-deletes a document (its object goes after ``FLEET_DOCUMENT_DELETED_GRACE_DAYS``,
    removed by ``fleet maintain``) with its audit row; resolves its expiry alert."""
    async with conn.transaction():
        before = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM documents WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", document_id)
        if before is None:
            raise NotFound(f"no document with id {document_id} (unknown, or deleted)")
        after = await conn.fetchrow(
            f"UPDATE documents SET deleted_at = now() WHERE id = $1 RETURNING {_COLUMNS}", document_id)
        await audit.record(conn, actor=actor, action="document.delete", entity_type="document",
                           entity_id=document_id, before=snapshot(before), after=snapshot(after))
        await expiry.resolve_deleted(conn, document_id)
    return snapshot(after) or {}
