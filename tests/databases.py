"""Databases of a test's own on the test server: created (optionally from a template or
migrated), and dropped with every connection to them."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def create_database(server_url: str, name: str, *, template: str | None = None,
                          migrate: bool = False) -> str:
    """Creates ``name`` on the server of ``server_url``; returns its URL."""
    admin = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await admin.close()
    url = with_database(server_url, name)
    if migrate:
        from fleet_telemetry.schema.migrate import apply_migrations

        await apply_migrations(url)
    return url


async def drop_database(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
