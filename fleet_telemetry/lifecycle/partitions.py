"""Partitions a pass creates: for rows that fell into a default partition, and ahead of time.

``vehicle_telemetry`` has a partition per UTC day, ``audit_logs`` one per month; both
have a default partition that catches rows for which no partition existed yet. The
partitions are created by the schema's ``fleet_ensure_*_partitions`` functions, which
also move the default partition's rows of that range into the new partition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import asyncpg

from fleet_telemetry.lifecycle.context import PassContext
from fleet_telemetry.lifecycle.policy import (
    add_months,
    audit_partition_name,
    day_start,
    telemetry_partition_name,
)
from fleet_telemetry.lifecycle.rollups import Horizons, read_horizons

_EXISTING = "SELECT relname FROM pg_class WHERE relname = ANY($1::text[]) AND relnamespace = $2::regnamespace"
_MARK_LATE_HOURS = (
    "INSERT INTO telemetry_dirty_hours (hour)"
    " SELECT DISTINCT date_trunc('hour', time, 'UTC') FROM vehicle_telemetry_default WHERE time < $1"
    " ON CONFLICT (hour) DO NOTHING"
)
_COUNT_LATE_HOURS = (
    "SELECT count(DISTINCT date_trunc('hour', time, 'UTC')) FROM vehicle_telemetry_default WHERE time < $1"
)


@dataclass(frozen=True)
class PartitionedTable:
    """A table partitioned by time: how its partitions are named, created and found missing."""

    label: str
    """What the steps that create its partitions ahead are called by."""
    name: Callable[[date], str]
    """The partition of a bucket (a day or the first of a month)."""
    ensure: str
    """SQL function creating the partitions of the buckets from $1 to $2, moving default rows."""
    default_buckets: str
    """Buckets of the default partition's rows, oldest first, with their row count ``n``."""


TELEMETRY = PartitionedTable(
    label="telemetry",
    name=telemetry_partition_name,
    ensure="fleet_ensure_telemetry_partitions",
    default_buckets="SELECT (time AT TIME ZONE 'UTC')::date AS bucket, count(*) AS n"
    " FROM vehicle_telemetry_default GROUP BY 1 ORDER BY 1",
)
AUDIT = PartitionedTable(
    label="audit",
    name=audit_partition_name,
    ensure="fleet_ensure_audit_partitions",
    default_buckets="SELECT date_trunc('month', created_at AT TIME ZONE 'UTC')::date AS bucket, count(*) AS n"
    " FROM audit_logs_default GROUP BY 1 ORDER BY 1",
)


async def move_default_rows(ctx: PassContext) -> None:
    """Moves default-partition rows into partitions of their own (telemetry, then audit).

    Rows of telemetry days whose raw data was already dropped are not re-partitioned:
    their hours are marked dirty, and the roll-up step folds them into the rollups.
    """
    horizons = await read_horizons(ctx.conn)
    telemetry = await ctx.conn.fetch(TELEMETRY.default_buckets)
    await _move(ctx, TELEMETRY, [(r["bucket"], r["n"]) for r in telemetry if horizons.raw_kept(day_start(r["bucket"]))])
    await _mark_late_hours(ctx, horizons)
    audit = await ctx.conn.fetch(AUDIT.default_buckets)
    await _move(ctx, AUDIT, [(r["bucket"], r["n"]) for r in audit])


async def _move(ctx: PassContext, table: PartitionedTable, buckets: list[tuple[date, int]]) -> None:
    """Creates the partition of each bucket, which takes its rows out of the default partition."""
    for bucket, rows in buckets:
        name = table.name(bucket)
        if ctx.dry_run:
            ctx.report.rows_moved[name] = rows
            continue

        async def move(c: asyncpg.Connection, bucket: date = bucket, name: str = name) -> int:
            await c.execute(f"SELECT {table.ensure}($1, $1)", bucket)
            # Still under the parent's lock: the new partition holds exactly the moved rows.
            return int(await c.fetchval(f'SELECT count(*) FROM "{name}"'))

        _, moved = await ctx.locked(f"moving default rows into {name}", move)
        if moved is not None:
            ctx.report.rows_moved[name] = moved


async def _mark_late_hours(ctx: PassContext, horizons: Horizons) -> None:
    """Marks the hours of default-partition rows before the raw horizon for folding."""
    if horizons.raw is None:
        return
    if ctx.dry_run:
        ctx.report.late_hours_marked = int(await ctx.conn.fetchval(_COUNT_LATE_HOURS, horizons.raw))
    else:
        status = await ctx.conn.execute(_MARK_LATE_HOURS, horizons.raw)
        ctx.report.late_hours_marked = int(status.split()[-1])


async def ensure_ahead(ctx: PassContext) -> None:
    """Creates the telemetry partitions of today and ``partitions_ahead_days`` ahead, and
    the audit partitions of this month and ``audit_partitions_ahead_months`` ahead."""
    today = ctx.now.astimezone(timezone.utc).date()
    days = [today + timedelta(days=i) for i in range(ctx.policy.partitions_ahead_days + 1)]
    ctx.report.telemetry_partitions_created = await _ensure(ctx, TELEMETRY, days)
    ctx.report.telemetry_partitions_until = await _partitioned_until(ctx, days)
    this_month = today.replace(day=1)
    months = [add_months(this_month, i) for i in range(ctx.policy.audit_partitions_ahead_months + 1)]
    ctx.report.audit_partitions_created = await _ensure(ctx, AUDIT, months)


async def _ensure(ctx: PassContext, table: PartitionedTable, buckets: list[date]) -> list[str]:
    """The partitions of ``buckets`` that were missing and now exist (or would be created)."""
    missing = await _missing(ctx, [table.name(b) for b in buckets])
    if not missing or ctx.dry_run:
        return missing
    done, _ = await ctx.locked(
        f"creating {table.label} partitions ahead",
        lambda c: c.fetchval(f"SELECT {table.ensure}($1, $2)", buckets[0], buckets[-1]),
    )
    if not done:
        return []
    still_missing = set(await _missing(ctx, missing))
    return [name for name in missing if name not in still_missing]


async def _partitioned_until(ctx: PassContext, days: list[date]) -> datetime:
    """The end of the telemetry partitions that follow on from the first of ``days``
    without a gap (its start when it has none): what ingestion can write into."""
    missing = set(await _missing(ctx, [TELEMETRY.name(day) for day in days]))
    covered = 0
    for day in days:
        if TELEMETRY.name(day) in missing:
            break
        covered += 1
    return day_start(days[0] + timedelta(days=covered))


async def _missing(ctx: PassContext, names: list[str]) -> list[str]:
    present = {row["relname"] for row in await ctx.conn.fetch(_EXISTING, names, ctx.schema)}
    return [name for name in names if name not in present]
