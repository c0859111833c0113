"""What a pass removes: raw partitions past the raw retention, rollups past theirs.

A raw partition goes only once none of its hours waits for a rollup, and in day order,
so everything before ``telemetry_lifecycle.raw_horizon`` is gone and everything after
it is kept. Hourly rollups go a whole UTC day at a time, the horizon moving first.
"""

from __future__ import annotations

from datetime import date, datetime

import asyncpg
import structlog

from fleet_telemetry.lifecycle.context import PassContext
from fleet_telemetry.lifecycle.locks import lock_day
from fleet_telemetry.lifecycle.policy import (
    DAY,
    day_start,
    expired_raw_days,
    rollup_cutoff,
    telemetry_partition_day,
    utc_day,
)
from fleet_telemetry.lifecycle.rollups import DAILY, HOURLY, read_horizons

log = structlog.get_logger(__name__)

_ATTACHED = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = 'vehicle_telemetry'::regclass"
)
_NAMED_LIKE_PARTITIONS = (
    "SELECT c.relname, c.relispartition FROM pg_class c"
    " WHERE c.relkind = 'r' AND c.relname ~ '^vehicle_telemetry_p[0-9]{8}$' AND c.relnamespace = $1::regnamespace"
)
_PENDING_IN_DAY = """
SELECT count(*) FROM (
    SELECT hour FROM telemetry_dirty_hours WHERE hour >= $1 AND hour < $1 + interval '24 hours'
    UNION SELECT hour FROM telemetry_rollup_queue WHERE hour >= $1 AND hour < $1 + interval '24 hours'
) AS pending
"""


class _StillDirty(Exception):
    def __init__(self, hours: int) -> None:
        super().__init__(hours)
        self.hours = hours


def _rows(status: str) -> int:
    """The row count of a command status such as ``DELETE 12``."""
    return int(status.split()[-1])


# --- raw partitions ----------------------------------------------------------------------


async def drop_expired_raw(ctx: PassContext) -> None:
    """Detaches and drops the raw partitions past retention, oldest first, each once rolled up."""
    attached = {row["relname"] for row in await ctx.conn.fetch(_ATTACHED)}
    by_day = {d: name for name in attached if (d := telemetry_partition_day(name)) is not None}
    for day in expired_raw_days(list(by_day), ctx.now, ctx.policy.raw_retention_days):
        if ctx.dry_run:  # the pass rolls up first, so each of these would go
            ctx.report.raw_partitions_dropped.append(by_day[day])
        elif not await _drop_raw_day(ctx, day, by_day[day]):
            break  # drop in day order only, so everything before the raw horizon is gone
    if not ctx.dry_run:
        await _drop_orphans(ctx)


async def _drop_raw_day(ctx: PassContext, day: date, name: str) -> bool:
    """Detaches the day's partition, moves the raw horizon past it and drops it.

    Returns False when the partition stays this time (hours not rolled up yet, or its
    lock stayed busy); the caller then keeps the later days too.
    """
    start = day_start(day)
    pending = int(await ctx.conn.fetchval(_PENDING_IN_DAY, start))
    if pending:
        ctx.report.raw_partitions_kept[name] = f"{pending} hours not rolled up yet"
        return False

    async def detach(c: asyncpg.Connection) -> None:
        await lock_day(c, start)
        await c.execute(f'ALTER TABLE vehicle_telemetry DETACH PARTITION "{name}"')
        # Every sink transaction that wrote into the partition has committed by now
        # (the detach waited for it), so its dirty mark is visible here.
        hours = int(await c.fetchval(_PENDING_IN_DAY, start))
        if hours:
            raise _StillDirty(hours)
        await c.execute("UPDATE telemetry_lifecycle SET raw_horizon = greatest(raw_horizon, $1)", start + DAY)

    try:
        done, _ = await ctx.locked(f"detaching {name}", detach)
    except _StillDirty as still:
        ctx.report.raw_partitions_kept[name] = f"{still.hours} hours marked while detaching; rolled up next pass"
        return False
    if not done:
        return False
    await _drop_detached(ctx, name)
    ctx.report.raw_partitions_dropped.append(name)
    log.info("raw partition dropped", partition=name)
    return True


async def _drop_detached(ctx: PassContext, name: str) -> None:
    # Its own transaction: the parent is no longer involved, so this holds up no writer.
    await ctx.locked(f"dropping detached {name}", lambda c: c.execute(f'DROP TABLE IF EXISTS "{name}"'))


async def _drop_orphans(ctx: PassContext) -> None:
    """Drops detached partitions left by a pass that stopped between detach and drop."""
    horizons = await read_horizons(ctx.conn)
    if horizons.raw is None:
        return
    for row in await ctx.conn.fetch(_NAMED_LIKE_PARTITIONS, ctx.schema):
        day = telemetry_partition_day(row["relname"])
        if row["relispartition"] or day is None or day_start(day) + DAY > horizons.raw:
            continue
        await _drop_detached(ctx, row["relname"])
        if row["relname"] not in ctx.report.raw_partitions_dropped:
            ctx.report.raw_partitions_dropped.append(row["relname"])


# --- rollups -----------------------------------------------------------------------------


async def remove_old_rollups(ctx: PassContext) -> None:
    """Removes hourly rollups past their retention and, when one is set, daily ones."""
    hourly_cutoff = rollup_cutoff(ctx.now, ctx.policy.hourly_retention_days)
    daily_days = ctx.policy.daily_retention_days
    daily_cutoff = rollup_cutoff(ctx.now, daily_days) if daily_days else None
    if ctx.dry_run:
        ctx.report.hourly_rows_removed = await _count_before(ctx, HOURLY, hourly_cutoff)
        if daily_cutoff is not None:
            ctx.report.daily_rows_removed = await _count_before(ctx, DAILY, daily_cutoff)
        return
    await _remove_old_hourly(ctx, hourly_cutoff)
    if daily_cutoff is not None:
        await _remove_old_daily(ctx, daily_cutoff)


async def _count_before(ctx: PassContext, table: str, cutoff: datetime) -> int:
    return int(await ctx.conn.fetchval(f"SELECT count(*) FROM {table} WHERE bucket < $1", cutoff))


async def _remove_old_hourly(ctx: PassContext, cutoff: datetime) -> None:
    """Oldest day first, one transaction each, under the day's lock."""
    while True:
        oldest = await ctx.conn.fetchval(f"SELECT min(bucket) FROM {HOURLY}")
        if oldest is None or oldest >= cutoff:
            return
        day = utc_day(oldest)
        async with ctx.conn.transaction():
            # The horizon moves first: a fold of this day now merges into the day itself.
            await lock_day(ctx.conn, day)
            await ctx.conn.execute(
                "UPDATE telemetry_lifecycle SET hourly_horizon = greatest(hourly_horizon, $1)", day + DAY
            )
            status = await ctx.conn.execute(f"DELETE FROM {HOURLY} WHERE bucket >= $1 AND bucket < $2", day, day + DAY)
        ctx.report.hourly_rows_removed += _rows(status)


async def _remove_old_daily(ctx: PassContext, cutoff: datetime) -> None:
    """Daily rollups and the identities of folded readings past the daily retention."""
    async with ctx.conn.transaction():
        status = await ctx.conn.execute(f"DELETE FROM {DAILY} WHERE bucket < $1", cutoff)
        await ctx.conn.execute("DELETE FROM telemetry_folded_readings WHERE time < $1", cutoff)
    ctx.report.daily_rows_removed = _rows(status)
