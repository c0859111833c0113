"""Rows of the writers' tables: one-row inserts and updates, and the life cycle shared by
vehicles, drivers and customers (register, update, soft-delete).

The life-cycle functions run in a transaction of their own on the given primary
connection (a savepoint inside a caller's transaction), write one ``audit_logs`` row
with the row before and after, and return the rows. Column names come from a
whitelist only (the :class:`Kind`'s, or the checked fields of ``validation``); values
are always parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.fleetops import audit
from fleet_telemetry.fleetops.errors import Conflict, NotFound


@dataclass(frozen=True)
class Kind:
    """One soft-deletable table: ``vehicles`` (kind ``vehicle``), ...

    ``unique`` maps a unique index's name to the column it makes unique among live rows,
    so a violation can name the row that already holds the value.
    """

    table: str
    name: str
    columns: tuple[str, ...]
    unique: Mapping[str, str] = field(default_factory=dict)


async def insert_row(conn: asyncpg.Connection, table: str, values: Mapping[str, Any], *,
                     row_id: UUID | None = None) -> asyncpg.Record:
    """Inserts one row of ``values`` into ``table``, with id ``row_id`` when given (else the
    table's default, a new UUID), and returns it. Runs in the caller's transaction;
    raises what PostgreSQL raises (``UniqueViolationError`` for an id or value taken)."""
    columns = list(values)
    params = list(values.values())
    if row_id is not None:
        columns.insert(0, "id")
        params.insert(0, row_id)
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return await conn.fetchrow(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders}) RETURNING *", *params
    )


async def update_row(conn: asyncpg.Connection, table: str, row_id: UUID,
                     values: Mapping[str, Any]) -> asyncpg.Record:
    """Sets ``values`` (at least one) on the row ``row_id`` of ``table``; returns the row
    after. Runs in the caller's transaction."""
    sets = ", ".join(f"{column} = ${i}" for i, column in enumerate(values, start=2))
    return await conn.fetchrow(
        f"UPDATE {table} SET {sets} WHERE id = $1 RETURNING *", row_id, *values.values()
    )


async def fetch_live(conn: asyncpg.Connection, kind: Kind, entity_id: UUID, *,
                     lock: bool = False) -> asyncpg.Record:
    """The live (not soft-deleted) row; raises :class:`NotFound` otherwise."""
    sql = f"SELECT * FROM {kind.table} WHERE id = $1 AND deleted_at IS NULL"
    row = await conn.fetchrow(sql + (" FOR UPDATE" if lock else ""), entity_id)
    if row is None:
        raise NotFound(f"no {kind.name} with id {entity_id}"
                       " (unknown, or deleted)")
    return row


async def register(conn: asyncpg.Connection, kind: Kind, *, actor: str,
                   values: Mapping[str, Any], entity_id: UUID | None = None) -> asyncpg.Record:
    """Inserts a row (with ``entity_id`` if given) and its audit row; returns the new row.

    Raises :class:`Conflict` when a unique value (VIN, plate, licence) is taken by a live row.
    """
    columns = {c: v for c, v in values.items() if c in kind.columns}
    try:
        async with conn.transaction():
            row = await insert_row(conn, kind.table, columns, row_id=entity_id)
            await audit.record(conn, actor=actor, action=f"{kind.name}.register", entity_type=kind.name,
                               entity_id=row["id"], before=None, after=audit.snapshot(row))
            return row
    except asyncpg.exceptions.UniqueViolationError as exc:
        raise await _taken(conn, kind, exc, values) from None


async def update(conn: asyncpg.Connection, kind: Kind, *, actor: str, entity_id: UUID,
                 values: Mapping[str, Any]) -> tuple[asyncpg.Record, asyncpg.Record]:
    """Changes the given columns of a live row; returns (before, after).

    A change that changes nothing writes nothing (no audit row). Raises :class:`NotFound`
    and :class:`Conflict` (a unique value taken).
    """
    columns = [c for c in values if c in kind.columns]
    try:
        async with conn.transaction():
            before = await fetch_live(conn, kind, entity_id, lock=True)
            changed = [c for c in columns if before[c] != values[c]]
            if not changed:
                return before, before
            after = await update_row(conn, kind.table, entity_id, {c: values[c] for c in changed})
            await audit.record(conn, actor=actor, action=f"{kind.name}.update", entity_type=kind.name,
                               entity_id=entity_id, before=audit.snapshot(before),
                               after=audit.snapshot(after))
            return before, after
    except asyncpg.exceptions.UniqueViolationError as exc:
        raise await _taken(conn, kind, exc, values) from None


async def soft_delete(conn: asyncpg.Connection, kind: Kind, *, actor: str,
                      entity_id: UUID) -> asyncpg.Record:
    """Sets ``deleted_at`` on a live row (inside the caller's transaction) and audits it.

    The caller checks first whatever must hold for the deletion (no open bookings, ...).
    Raises :class:`NotFound` for an unknown or already deleted id.
    """
    before = await fetch_live(conn, kind, entity_id, lock=True)
    after = await conn.fetchrow(
        f"UPDATE {kind.table} SET deleted_at = now() WHERE id = $1 RETURNING *", entity_id
    )
    await audit.record(conn, actor=actor, action=f"{kind.name}.delete", entity_type=kind.name,
                       entity_id=entity_id, before=audit.snapshot(before), after=audit.snapshot(after))
    return after


async def _taken(conn: asyncpg.Connection, kind: Kind, exc: asyncpg.exceptions.UniqueViolationError,
                 values: Mapping[str, Any]) -> Exception:
    """The :class:`Conflict` for a unique violation, naming the live row holding the value."""
    column = kind.unique.get(exc.constraint_name or "")
    if column is None:
        if exc.constraint_name == f"{kind.table}_pkey":
            return Conflict(f"a {kind.name} with this id exists already")
        return Conflict(f"this {kind.name} collides with a stored one ({exc.constraint_name})")
    holder = await conn.fetchval(
        f"SELECT id FROM {kind.table} WHERE {column} = $1 AND deleted_at IS NULL", values.get(column)
    )
    return Conflict(f"{column} {values.get(column)!s} is already used by {kind.name} {holder}")


async def list_live(conn: asyncpg.Connection, kind: Kind, *, where: str = "", params: tuple[Any, ...] = (),
                    order: str = "created_at DESC", limit: int = 100) -> list[asyncpg.Record]:
    """Live rows, newest first; ``where`` is a fixed SQL condition with ``$n`` parameters."""
    condition = "deleted_at IS NULL" + (f" AND ({where})" if where else "")
    return await conn.fetch(
        f"SELECT * FROM {kind.table} WHERE {condition} ORDER BY {order} LIMIT ${len(params) + 1}",
        *params, limit,
    )
