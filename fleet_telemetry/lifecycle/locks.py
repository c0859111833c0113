"""The locks of the lifecycle: the pass lock, the per-day rollup lock, and short lock waits.

- A pass holds a session advisory lock, so passes from several hosts run one at a time.
- Every writer of one day's rollups (recompute, fold, retention) holds a
  transaction-level advisory lock on that day, so they never interleave on the same day.
- A statement whose lock also holds up ingestion (creating or detaching a partition,
  claiming dirty hours) runs through :func:`in_lock_timeout`: short lock waits, retried
  with backoff, and a plain "not now" when the lock stays busy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import date, datetime, timezone
from typing import TypeVar

import asyncpg
import structlog

from fleet_telemetry.core.retry import Backoff, GaveUp, retry
from fleet_telemetry.lifecycle.policy import DEFAULT_LOCK_TIMEOUT_SECONDS, LOCK_PATIENCE_SECONDS

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Session advisory lock held for a whole pass ("fmaint" in ASCII).
PASS_LOCK_KEY = 0x666D61696E74
# First key of the per-day advisory lock held by every writer of one day's rollups
# ("flrd" in ASCII); the second key is the day's number since 1970-01-01.
DAY_LOCK_KEY = 0x666C7264
EPOCH_DAY = date(1970, 1, 1)

LOCK_ATTEMPTS = 3
QUICK_LOCK_WAIT_SECONDS = 0.02


class LockBusy(TimeoutError):
    """A statement's lock wait ran out (PostgreSQL's ``lock_timeout``); its try was rolled back."""


@asynccontextmanager
async def pass_lock(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Holds the pass lock for the block; blocks while another pass holds it."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PASS_LOCK_KEY):
        log.info("waiting for another fleet maintain pass to finish")
        await conn.execute("SELECT pg_advisory_lock($1)", PASS_LOCK_KEY)
    try:
        yield
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", PASS_LOCK_KEY)


def day_lock_number(day: datetime | date) -> int:
    """Second key of a day's advisory lock: days since 1970-01-01."""
    as_date = day.astimezone(timezone.utc).date() if isinstance(day, datetime) else day
    return (as_date - EPOCH_DAY).days


async def lock_day(conn: asyncpg.Connection, day: datetime | date) -> None:
    """Takes the day's rollup lock until the end of the current transaction (blocks)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1::int, $2::int)", DAY_LOCK_KEY, day_lock_number(day))


async def in_lock_timeout(
    conn: asyncpg.Connection,
    work: Callable[[asyncpg.Connection], Awaitable[T]],
    *,
    timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    attempts: int = LOCK_ATTEMPTS,
    patience: float = LOCK_PATIENCE_SECONDS,
) -> tuple[bool, T | None]:
    """Runs ``work(conn)`` in a transaction whose lock waits are kept short; retries.

    For every statement whose lock also holds up ingestion (creating and detaching
    partitions, claiming dirty hours): while it waits in the lock queue, the writers
    queued behind it wait too. So it first tries for up to ``patience`` seconds with
    lock waits of 20 ms (a long query holding the table then holds up no writer), then
    ``attempts`` times with waits of ``timeout``, pausing with backoff between tries. A
    try whose lock wait runs out is rolled back and each try commits on success.
    Returns ``(True, result)``, or ``(False, None)`` when every try ran out. Any other
    error of ``work`` or of the connection is raised at once.
    """
    if patience > 0:
        quick_until = time.monotonic() + patience
        done, result = await _tries(
            conn, work, QUICK_LOCK_WAIT_SECONDS, Backoff(initial=0.05, maximum=0.05),
            is_last=lambda _: time.monotonic() >= quick_until,
        )
        if done:
            return done, result
    return await _tries(conn, work, timeout, Backoff(initial=0.1, maximum=0.4), is_last=lambda n: n >= attempts)


async def _tries(
    conn: asyncpg.Connection,
    work: Callable[[asyncpg.Connection], Awaitable[T]],
    wait: float,
    backoff: Backoff,
    *,
    is_last: Callable[[int], bool],
) -> tuple[bool, T | None]:
    """Tries ``work`` with lock waits of ``wait`` until it succeeds or ``is_last(tries)`` held for a busy try."""
    give_up = asyncio.Event()
    tries = 0

    async def one_try() -> T:
        nonlocal tries
        tries += 1
        if is_last(tries):
            give_up.set()
        try:
            async with conn.transaction():
                await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{max(1, int(wait * 1000))}ms")
                return await work(conn)
        except asyncpg.exceptions.LockNotAvailableError as exc:
            raise LockBusy(f"lock wait of {wait} s ran out") from exc

    try:
        return True, await retry(one_try, what="taking a lock", backoff=backoff, on_retry=_busy_locks_only,
                                 give_up=give_up)
    except GaveUp as gave_up:
        if isinstance(gave_up.cause, LockBusy):
            return False, None
        raise gave_up.cause from None


def _busy_locks_only(exc: BaseException, delay: float, attempt: int) -> None:
    """Only a busy lock is worth another try here: a lost connection stays lost."""
    if not isinstance(exc, LockBusy):
        raise exc
