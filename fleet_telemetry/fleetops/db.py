"""Which PostgreSQL server serves what: writes the primary, read-only queries a replica.

:class:`Database` holds one small pool for the primary (``FLEET_DATABASE_URL``) and one
per read replica (``FLEET_DATABASE_REPLICA_URLS``, seed 4.3). :meth:`Database.write`
hands out a primary connection; :meth:`Database.read` hands out a connection inside a
``READ ONLY`` transaction on the next replica in turn. A replica that cannot be reached
(or refuses connections while it starts) is skipped for ``replica_retry_seconds`` and
the next one, finally the primary, serves the read; so reads keep working with every
replica down.

Replicas lag behind the primary by a little (streaming replication is asynchronous):
a read that must see a write just made (read-your-writes) uses :meth:`Database.write`'s
connection. The availability query reads from a replica; the exclusion constraints on the
primary are what guarantee that no booking overlaps, whatever a stale read said.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import structlog

from fleet_telemetry.core.errors import unavailable
from fleet_telemetry.core.retry import is_transient
from fleet_telemetry.core.settings import Settings, mask_url

log = structlog.get_logger("fleet.fleetops")

CONNECT_TIMEOUT_SECONDS = 5.0


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_json(value: Any) -> str:
    """JSON text for a jsonb parameter; Decimal as a string, so amounts stay exact."""
    return orjson.dumps(value, default=_json_default).decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb parameters and results as Python objects. Every connection the writers and
    queries use needs it (the pools of :class:`Database` run it on each new connection)."""
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=encode_json, decoder=orjson.loads, format="text"
    )
    await conn.set_type_codec(
        "json", schema="pg_catalog", encoder=encode_json, decoder=orjson.loads, format="text"
    )


class Database:
    """The primary pool and the replica pools, with the routing rule of the module docstring.

    Pools connect lazily (``min_size=0``), so a replica that is down when the process
    starts costs nothing until a read tries it. Call :meth:`close` when done.
    """

    def __init__(
        self,
        primary_url: str,
        replica_urls: tuple[str, ...] | list[str] = (),
        *,
        replica_retry_seconds: float = 30.0,
        max_size: int = 4,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        self.primary_url = primary_url
        self.replica_urls = tuple(replica_urls)
        self._retry = replica_retry_seconds
        self._max_size = max_size
        self._timeout = connect_timeout
        self._primary: asyncpg.Pool | None = None
        self._replicas: dict[str, asyncpg.Pool] = {}
        self._down_until: dict[str, float] = {}
        self._turn = 0

    @classmethod
    def from_settings(cls, settings: Settings, *, max_size: int = 4) -> "Database":
        return cls(settings.database_url, settings.database_replica_urls,
                   replica_retry_seconds=settings.replica_retry_seconds, max_size=max_size)

    async def _pool(self, url: str) -> asyncpg.Pool:
        pool = self._primary if url == self.primary_url else self._replicas.get(url)
        if pool is None:
            pool = await asyncpg.create_pool(
                url, min_size=0, max_size=self._max_size, init=init_connection,
                timeout=self._timeout, command_timeout=60,
                server_settings={"application_name": "fleet ops"},
            )
            assert pool is not None
            if url == self.primary_url:
                self._primary = pool
            else:
                self._replicas[url] = pool
        return pool

    async def close(self) -> None:
        """Closes every pool (waits for connections in use to be released)."""
        pools = [p for p in (self._primary, *self._replicas.values()) if p is not None]
        self._primary, self._replicas = None, {}
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)

    async def __aenter__(self) -> "Database":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[asyncpg.Connection]:
        """A primary connection, no transaction open (the writers open their own).

        Raises :class:`~fleet_telemetry.core.errors.ServiceUnavailable` if the primary cannot
        be reached.
        """
        try:
            pool = await self._pool(self.primary_url)
            conn = await pool.acquire()
        except Exception as exc:
            if not is_transient(exc):
                raise
            raise unavailable("PostgreSQL", mask_url(self.primary_url), exc) from None
        try:
            yield conn
        finally:
            await pool.release(conn)

    def replicas_in_turn(self, now: float | None = None) -> list[str]:
        """The replicas to try for the next read, in order: round-robin, skipping those
        marked down until their retry time has come."""
        now = time.monotonic() if now is None else now
        urls = [u for u in self.replica_urls if self._down_until.get(u, 0.0) <= now]
        if not urls:
            return []
        start = self._turn % len(urls)
        self._turn += 1
        return urls[start:] + urls[:start]

    def replicas_down(self, now: float | None = None) -> list[str]:
        """The replicas being skipped right now (they failed to answer recently)."""
        now = time.monotonic() if now is None else now
        return [u for u in self.replica_urls if self._down_until.get(u, 0.0) > now]

    def mark_down(self, url: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._down_until[url] = now + self._retry

    @asynccontextmanager
    async def read(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside a READ ONLY transaction: a replica's if one answers, else the
        primary's. The transaction ends (rolled back: nothing to keep) when the block exits.

        Raises :class:`~fleet_telemetry.core.errors.ServiceUnavailable` if neither a replica
        nor the primary answers.
        """
        for url in self.replicas_in_turn():
            acquired = await self._try_begin(url)
            if acquired is None:
                continue
            pool, conn, tx = acquired
            try:
                yield conn
            except Exception as exc:
                if is_transient(exc):  # the replica went away under the query
                    self.mark_down(url)
                raise
            finally:
                await _finish(pool, conn, tx)
            return
        async with self.write() as conn:
            tx = conn.transaction(readonly=True)
            await tx.start()
            try:
                yield conn
            finally:
                if not conn.is_closed():
                    await tx.rollback()

    async def _try_begin(self, url: str) -> tuple[asyncpg.Pool, asyncpg.Connection, Any] | None:
        pool: asyncpg.Pool | None = None
        conn: asyncpg.Connection | None = None
        try:
            pool = await self._pool(url)
            conn = await pool.acquire()
            tx = conn.transaction(readonly=True)
            await tx.start()
            return pool, conn, tx
        except Exception as exc:
            if not is_transient(exc):
                raise
            if pool is not None and conn is not None:
                await pool.release(conn)
            self.mark_down(url)
            log.warning("read replica skipped", replica=mask_url(url), error=type(exc).__name__,
                        retry_in_s=self._retry)
            return None


async def _finish(pool: asyncpg.Pool, conn: asyncpg.Connection, tx: Any) -> None:
    try:
        if not conn.is_closed():
            await tx.rollback()
    finally:
        await pool.release(conn)
