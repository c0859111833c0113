"""The benchmarks' databases of their own on ``FLEET_DATABASE_URL``'s server.

A name may come from the command line (``--database``): it is quoted as an identifier
in every statement and percent-encoded in every URL, so any name means that database
and nothing else.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from fleet_telemetry.schema.migrate import quote_identifier


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead, options kept."""
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(name, safe="")))


async def create(admin_url: str, name: str, *, template: str | None = None, strategy: str | None = None) -> None:
    """Creates database ``name`` (a copy of ``template`` if given, with ``strategy``
    ``FILE_COPY`` or ``WAL_LOG``); raises asyncpg errors (it exists, no right to create)."""
    sql = f"CREATE DATABASE {quote_identifier(name)}"
    if template is not None:
        sql += f" TEMPLATE {quote_identifier(template)}"
    if strategy is not None:
        if strategy not in ("FILE_COPY", "WAL_LOG"):
            raise ValueError(f"unknown strategy {strategy!r}")
        sql += f" STRATEGY {strategy}"
    await _run(admin_url, [sql])


async def drop(admin_url: str, *names: str) -> None:
    """Drops the databases ``names`` if they exist, closing every connection to them."""
    await _run(admin_url, [_drop(name) for name in names])


async def recreate(admin_url: str, name: str) -> None:
    """Database ``name`` dropped if it existed, then created empty."""
    await _run(admin_url, [_drop(name), f"CREATE DATABASE {quote_identifier(name)}"])


def _drop(name: str) -> str:
    return f"DROP DATABASE IF EXISTS {quote_identifier(name)} WITH (FORCE)"


async def _run(admin_url: str, statements: list[str]) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        for sql in statements:
            await admin.execute(sql)
    finally:
        await admin.close()
