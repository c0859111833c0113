"""The audit trail of the small writers: one ``audit_logs`` row per change.

Each writer calls :func:`record` inside its own transaction, so a change and its audit
row commit together or not at all. ``before`` and ``after`` are :func:`snapshot` s of the
row (None for a creation or, never, for a deletion: soft-deletes keep the row, so
``after`` shows ``deleted_at``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

_INSERT = (
    "INSERT INTO audit_logs (actor, action, entity_type, entity_id, before, after)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data: UUIDs and times as text, amounts as exact decimal text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "as_json"):
        return value.as_json()
    return str(value)


def snapshot(row: Mapping[str, Any] | asyncpg.Record | None) -> dict[str, Any] | None:
    """A stored row as a JSON-ready dict (what the audit log and ``--json`` show)."""
    if row is None:
        return None
    return {key: jsonable(row[key]) for key in row.keys()}


async def record(
    conn: asyncpg.Connection,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: UUID | str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
) -> None:
    """Inserts one audit row on ``conn`` (inside the caller's transaction; commits nothing).

    ``action`` is ``<entity>.<verb>``, e.g. ``vehicle.register``, ``assignment.cancel``.
    """
    await conn.execute(
        _INSERT, actor, action, entity_type, str(entity_id),
        jsonable(before) if before is not None else None,
        jsonable(after) if after is not None else None,
    )
