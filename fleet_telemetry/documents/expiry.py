"""``document_expiring`` alerts: raised for a licence, registration or insurance expiring
within ``FLEET_DOCUMENT_EXPIRY_DAYS`` days, resolved once a newer document of the same kind
is attached for the same owner, or the document is deleted.

One open alert per document (index ``alerts_one_open_document`` on ``details->>'document_id'``),
on the owner (``entity_type`` = owner type, ``entity_id`` = owner id). :func:`check_expiry`
is a step of ``fleet maintain``; the writers also resolve at once, in their own transaction,
the alerts a new or deleted document settles (:func:`resolve_superseded`,
:func:`resolve_deleted`).
"""

from __future__ import annotations

from datetime import date
from uuid import UUID

import asyncpg

from fleet_telemetry.documents.rules import EXPIRING_KINDS

ALERT_TYPE = "document_expiring"

# A live document of an expiring kind is "current" when no newer live document of the same
# kind belongs to the same owner.
_RAISE = """
INSERT INTO alerts (entity_type, entity_id, type, severity, details)
SELECT d.owner_type, d.owner_id, 'document_expiring',
       CASE WHEN d.expires_on < $1::date THEN 'critical' ELSE 'warning' END,
       jsonb_build_object('document_id', d.id::text, 'kind', d.kind, 'expires_on', d.expires_on,
                          'file_name', d.file_name)
  FROM documents AS d
 WHERE d.deleted_at IS NULL AND d.expires_on IS NOT NULL AND d.expires_on <= $1::date + $2::int
   AND d.kind = ANY($3::text[])
   AND NOT EXISTS (SELECT 1 FROM documents AS n
                    WHERE n.owner_id = d.owner_id AND n.kind = d.kind AND n.deleted_at IS NULL
                      AND n.created_at > d.created_at)
ON CONFLICT ((details ->> 'document_id')) WHERE NOT is_resolved AND type = 'document_expiring' DO NOTHING
RETURNING id
"""

# Open expiry alerts whose document is gone, superseded, or no longer expiring soon
# (FLEET_DOCUMENT_EXPIRY_DAYS lowered).
_RESOLVE = """
UPDATE alerts AS a
   SET is_resolved = true, resolved_at = now(),
       details = a.details || jsonb_build_object('resolution', CASE
           WHEN d.id IS NULL OR d.deleted_at IS NOT NULL THEN 'document deleted'
           WHEN d.expires_on IS NULL OR d.expires_on > $1::date + $2::int THEN 'no longer expiring soon'
           ELSE 'newer document attached' END)
  FROM alerts AS o LEFT JOIN documents AS d ON d.id = (o.details ->> 'document_id')::uuid
 WHERE a.id = o.id AND NOT a.is_resolved AND a.type = 'document_expiring'
   AND (d.id IS NULL OR d.deleted_at IS NOT NULL OR d.expires_on IS NULL OR d.expires_on > $1::date + $2::int
        OR EXISTS (SELECT 1 FROM documents AS n
                    WHERE n.owner_id = d.owner_id AND n.kind = d.kind AND n.deleted_at IS NULL
                      AND n.created_at > d.created_at))
RETURNING a.id
"""

_RESOLVE_SUPERSEDED = """
UPDATE alerts AS a
   SET is_resolved = true, resolved_at = now(),
       details = a.details || jsonb_build_object('resolution', 'newer document attached')
  FROM documents AS d
 WHERE NOT a.is_resolved AND a.type = 'document_expiring'
   AND d.id = (a.details ->> 'document_id')::uuid
   AND d.owner_id = $1 AND d.kind = $2 AND d.id <> $3
RETURNING a.id
"""
_RESOLVE_DELETED = """
UPDATE alerts SET is_resolved = true, resolved_at = now(),
       details = details || jsonb_build_object('resolution', 'document deleted')
 WHERE NOT is_resolved AND type = 'document_expiring' AND details ->> 'document_id' = $1::text
RETURNING id
"""


async def check_expiry(conn: asyncpg.Connection, *, today: date, days: int) -> tuple[int, int]:
    """Resolves the alerts settled, then raises the new ones, in one transaction.
    Returns (raised, resolved)."""
    async with conn.transaction():
        resolved = await conn.fetch(_RESOLVE, today, days)
        raised = await conn.fetch(_RAISE, today, days, list(EXPIRING_KINDS))
    return len(raised), len(resolved)


async def resolve_superseded(conn: asyncpg.Connection, *, owner_id: UUID, kind: str, newest: UUID) -> int:
    """Inside the caller's transaction: resolves the open expiry alerts of ``owner_id``'s
    other documents of ``kind``, now that ``newest`` is attached. Returns how many."""
    if kind not in EXPIRING_KINDS:
        return 0
    return len(await conn.fetch(_RESOLVE_SUPERSEDED, owner_id, kind, newest))


async def resolve_deleted(conn: asyncpg.Connection, document_id: UUID) -> int:
    """Inside the caller's transaction: resolves the open expiry alert of a deleted document."""
    return len(await conn.fetch(_RESOLVE_DELETED, str(document_id)))
