"""``fleet maintain``: partitions, rollups, retention and reports, one idempotent pass at a time.

A pass (schema/README.md, "Lifecycle: partitions, rollups, retention"), in this order:

1. moves rows that fell into a default partition into partitions of their own
   (telemetry days, audit months); rows of telemetry days whose raw data was already
   dropped are instead marked for folding into the rollups;
2. creates the telemetry partitions for today and ``partitions_ahead_days`` ahead, and
   the audit partitions for this month and ``audit_partitions_ahead_months`` ahead;
3. recomputes the rollups of the hours the sink marked dirty (:mod:`fleet_telemetry.lifecycle.rollups`);
4. detaches and drops raw partitions whose whole day is older than the raw retention,
   oldest first, each only once none of its hours waits for a rollup; removes hourly
   rollups past their retention (whole days) and, if configured, daily ones;
5. refreshes ``monthly_vehicle_stats`` concurrently when its nightly run is due.

Passes from several hosts serialise on a session advisory lock, and every step is safe
on its own as well. Each statement that takes a lock ingestion also needs (creating or
detaching a partition, claiming dirty hours) first retries with 20 ms lock waits for a
couple of seconds, then waits at most ``maintain_lock_timeout_seconds`` a few times
(:func:`fleet_telemetry.lifecycle.rollups.in_lock_timeout`); a step that still cannot get its lock is
reported as deferred and left to the next pass.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import structlog
from prometheus_client import start_http_server

from fleet_telemetry.core.metrics import MaintainMetrics
from fleet_telemetry.core.retry import is_transient
from fleet_telemetry.core.errors import FleetError, ServiceUnavailable, UsageError
from fleet_telemetry.lifecycle.rollups import (
    DAY,
    LOCK_PATIENCE_SECONDS,
    RollupReport,
    in_lock_timeout,
    lock_day,
    read_horizons,
    refresh_dirty_rollups,
    rollup_backlog,
    utc_day,
)

if TYPE_CHECKING:
    from fleet_telemetry.core.settings import Settings

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

# Session advisory lock held for a whole pass ("fmaint" in ASCII).
PASS_LOCK_KEY = 0x666D61696E74
CONNECT_TIMEOUT_SECONDS = 10.0
STATS_VIEW = "monthly_vehicle_stats"
TELEMETRY_PREFIX = "vehicle_telemetry_p"
AUDIT_PREFIX = "audit_logs_p"

_TELEMETRY_NAME = re.compile(r"^vehicle_telemetry_p(\d{4})(\d{2})(\d{2})$")
_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# --- policy and pure rules ---------------------------------------------------------------


@dataclass(frozen=True)
class LifecyclePolicy:
    """The retention and upkeep rules of a pass, resolved from the settings."""

    raw_retention_days: int = 30
    hourly_retention_days: int = 365
    daily_retention_days: int = 0
    """0 keeps daily rollups forever."""
    partitions_ahead_days: int = 7
    audit_partitions_ahead_months: int = 2
    stats_refresh_hour: int = 3
    lock_timeout_seconds: float = 0.5
    lock_patience_seconds: float = LOCK_PATIENCE_SECONDS
    """How long lock-taking steps first retry with 20 ms waits (see :func:`in_lock_timeout`)."""

    @classmethod
    def from_settings(cls, settings: "Settings") -> "LifecyclePolicy":
        """Raises :class:`UsageError` when the retentions do not nest (raw <= hourly <= daily)."""
        policy = cls(
            raw_retention_days=settings.raw_retention_days,
            hourly_retention_days=settings.hourly_retention_days,
            daily_retention_days=settings.daily_retention_days,
            partitions_ahead_days=settings.partitions_ahead_days,
            audit_partitions_ahead_months=settings.audit_partitions_ahead_months,
            stats_refresh_hour=settings.stats_refresh_hour,
            lock_timeout_seconds=settings.maintain_lock_timeout_seconds,
        )
        if policy.hourly_retention_days < policy.raw_retention_days:
            raise UsageError(
                f"FLEET_HOURLY_RETENTION_DAYS ({policy.hourly_retention_days}) must be at least"
                f" FLEET_RAW_RETENTION_DAYS ({policy.raw_retention_days}): hours are rolled up from raw rows"
            )
        if 0 < policy.daily_retention_days < policy.hourly_retention_days:
            raise UsageError(
                f"FLEET_DAILY_RETENTION_DAYS ({policy.daily_retention_days}) must be 0 (forever) or at"
                f" least FLEET_HOURLY_RETENTION_DAYS ({policy.hourly_retention_days})"
            )
        return policy


def parse_every(text: str) -> float:
    """``"5m"`` -> 300.0 seconds; units ``s``, ``m``, ``h`` (plain numbers are seconds).

    Raises :class:`UsageError` for anything else or for zero.
    """
    match = _EVERY.match(text)
    if match is None:
        raise UsageError(f"--every {text!r} is not a duration: use e.g. 30s, 5m or 1h")
    seconds = float(match[1]) * _UNIT_SECONDS[match[2] or "s"]
    if seconds <= 0:
        raise UsageError("--every must be longer than 0 seconds")
    return seconds


def raw_cutoff(now: datetime, retention_days: int) -> datetime:
    """Raw readings older than this are past retention (the consumer's rule too)."""
    return now - timedelta(days=retention_days)


def expired_raw_days(days: list[date], now: datetime, retention_days: int) -> list[date]:
    """The partition days, oldest first, whose whole UTC day is older than the retention."""
    cutoff = raw_cutoff(now, retention_days)
    return sorted(d for d in days if _day_start(d) + DAY <= cutoff)


def rollup_cutoff(now: datetime, retention_days: int) -> datetime:
    """Rollups of UTC days before this one are past a retention of ``retention_days``."""
    return utc_day(now - timedelta(days=retention_days))


def last_stats_refresh_slot(now: datetime, hour: int) -> datetime:
    """The latest moment at or before ``now`` at which the nightly refresh was scheduled."""
    slot = utc_day(now) + timedelta(hours=hour)
    return slot if slot <= now else slot - DAY


def stats_refresh_due(last: datetime | None, now: datetime, hour: int) -> bool:
    """True when no refresh happened since the latest scheduled slot (or never)."""
    return last is None or last < last_stats_refresh_slot(now, hour)


def telemetry_partition_day(name: str) -> date | None:
    """The day of a ``vehicle_telemetry_pYYYYMMDD`` partition name, else None."""
    match = _TELEMETRY_NAME.match(name)
    if match is None:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def telemetry_partition_name(day: date) -> str:
    return f"{TELEMETRY_PREFIX}{day:%Y%m%d}"


def audit_partition_name(month: date) -> str:
    return f"{AUDIT_PREFIX}{month:%Y%m}"


def add_months(day: date, months: int) -> date:
    """The first day of the month ``months`` after ``day``'s month."""
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


# --- report and metrics --------------------------------------------------------------


@dataclass
class PassReport:
    """What one pass did, or with ``dry_run`` what it would do."""

    now: datetime
    dry_run: bool = False
    rows_moved: dict[str, int] = field(default_factory=dict)
    """Partition created for default-partition rows -> rows moved into it."""
    late_hours_marked: int = 0
    """Hours of default-partition rows before the raw horizon, marked for folding."""
    telemetry_partitions_created: list[str] = field(default_factory=list)
    audit_partitions_created: list[str] = field(default_factory=list)
    rollups: RollupReport = field(default_factory=RollupReport)
    raw_partitions_dropped: list[str] = field(default_factory=list)
    raw_partitions_kept: dict[str, str] = field(default_factory=dict)
    """Partition past retention -> why it was kept this time."""
    hourly_rows_removed: int = 0
    daily_rows_removed: int = 0
    stats_refreshed: bool = False
    deferred: list[str] = field(default_factory=list)
    """Steps whose lock stayed busy past the lock timeout; the next pass retries them."""
    duration_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """One human line per thing done (or planned); the last line sums up."""

        def say(done: str, planned: str) -> str:
            return planned if self.dry_run else done

        out: list[str] = []
        for partition, rows in self.rows_moved.items():
            out.append(f"{say('moved', 'would move')} {rows} default-partition rows into {partition}")
        if self.late_hours_marked:
            out.append(f"{say('marked', 'would mark')} {self.late_hours_marked} hours of late rows"
                       " past the raw retention for folding into the rollups")
        for name in self.telemetry_partitions_created + self.audit_partitions_created:
            out.append(f"{say('created', 'would create')} partition {name}")
        r = self.rollups
        if self.dry_run:
            if r.pending_hours:
                out.append(f"would roll up {r.pending_hours} dirty hours (oldest marked {r.lag_seconds:.0f} s ago)")
        elif r.hours or r.days or r.late_hours:
            text = f"rolled up {r.hours} hours and {r.days} days"
            if r.late_hours:
                text += f", folded {r.folded_readings} late readings of {r.late_hours} hours past the raw retention"
            out.append(text)
        for name in self.raw_partitions_dropped:
            out.append(f"{say('dropped', 'would drop')} partition {name} (past the raw retention)")
        for name, why in self.raw_partitions_kept.items():
            out.append(f"kept partition {name} past the raw retention: {why}")
        if self.hourly_rows_removed:
            out.append(f"{say('removed', 'would remove')} {self.hourly_rows_removed} hourly rollup rows past retention")
        if self.daily_rows_removed:
            out.append(f"{say('removed', 'would remove')} {self.daily_rows_removed} daily rollup rows past retention")
        if self.stats_refreshed:
            out.append(f"{say('refreshed', 'would refresh')} {STATS_VIEW}")
        for step in self.deferred:
            out.append(f"deferred {step}: its lock stayed busy; the next pass retries")
        if self.dry_run:
            out.append("dry run: nothing was changed")
        else:
            lag = f"; {r.pending_hours} hours left to roll up, lag {r.lag_seconds:.0f} s" if r.pending_hours else ""
            out.append(f"pass done in {self.duration_seconds:.2f} s{lag}")
        return out


def record_pass(metrics: MaintainMetrics, report: PassReport, finished_at: float) -> None:
    """Counts a successful pass."""
    metrics.passes.labels(outcome="success").inc()
    metrics.last_success.set(finished_at)
    metrics.pass_duration.observe(report.duration_seconds)
    metrics.partitions_created.labels(table="vehicle_telemetry").inc(
        len(report.telemetry_partitions_created) + len(report.rows_moved)
    )
    metrics.partitions_created.labels(table="audit_logs").inc(len(report.audit_partitions_created))
    metrics.partitions_dropped.labels(table="vehicle_telemetry").inc(len(report.raw_partitions_dropped))
    metrics.rows_moved.inc(sum(report.rows_moved.values()))
    metrics.hours_rolled_up.inc(report.rollups.hours)
    metrics.rollup_lag.set(report.rollups.lag_seconds)
    metrics.rollup_pending.set(report.rollups.pending_hours)
    metrics.deferred.inc(len(report.deferred))


# --- the steps -------------------------------------------------------------------------


_EXISTING = "SELECT relname FROM pg_class WHERE relname = ANY($1::text[]) AND relnamespace = $2::regnamespace"
_SCHEMA_OF_TELEMETRY = (
    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.oid = 'vehicle_telemetry'::regclass"
)
_ATTACHED = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
    " WHERE i.inhparent = 'vehicle_telemetry'::regclass"
)
_NAMED_LIKE_PARTITIONS = (
    "SELECT c.relname, c.relispartition FROM pg_class c"
    " WHERE c.relkind = 'r' AND c.relname ~ '^vehicle_telemetry_p[0-9]{8}$' AND c.relnamespace = $1::regnamespace"
)
_DEFAULT_TELEMETRY_DAYS = (
    "SELECT (time AT TIME ZONE 'UTC')::date AS day, count(*) AS n FROM vehicle_telemetry_default"
    " GROUP BY 1 ORDER BY 1"
)
_DEFAULT_AUDIT_MONTHS = (
    "SELECT date_trunc('month', created_at AT TIME ZONE 'UTC')::date AS month, count(*) AS n"
    " FROM audit_logs_default GROUP BY 1 ORDER BY 1"
)
_MARK_LATE_HOURS = (
    "INSERT INTO telemetry_dirty_hours (hour)"
    " SELECT DISTINCT date_trunc('hour', time, 'UTC') FROM vehicle_telemetry_default WHERE time < $1"
    " ON CONFLICT (hour) DO NOTHING"
)
_COUNT_LATE_HOURS = (
    "SELECT count(DISTINCT date_trunc('hour', time, 'UTC')) FROM vehicle_telemetry_default WHERE time < $1"
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


class _Pass:
    """One pass over one connection; ``dry_run`` only reads."""

    def __init__(
        self, conn: asyncpg.Connection, policy: LifecyclePolicy, now: datetime, dry_run: bool, force_stats: bool
    ) -> None:
        self.conn = conn
        self.policy = policy
        self.now = now
        self.dry_run = dry_run
        self.force_stats = force_stats
        self.report = PassReport(now=now, dry_run=dry_run)
        self.schema = "public"

    async def locked(self, step: str, work: Callable[[asyncpg.Connection], Any]) -> tuple[bool, Any]:
        done, result = await in_lock_timeout(
            self.conn, work, timeout=self.policy.lock_timeout_seconds, patience=self.policy.lock_patience_seconds
        )
        if not done:
            self.report.deferred.append(step)
            log.warning("lock busy, step deferred to the next pass", step=step,
                        lock_timeout_s=self.policy.lock_timeout_seconds)
        return done, result

    async def missing(self, names: list[str]) -> list[str]:
        present = {row["relname"] for row in await self.conn.fetch(_EXISTING, names, self.schema)}
        return [name for name in names if name not in present]

    async def created(self, names: list[str]) -> list[str]:
        """Those of ``names`` that exist now."""
        still_missing = set(await self.missing(names))
        return [name for name in names if name not in still_missing]

    async def run(self) -> PassReport:
        self.schema = await self.conn.fetchval(_SCHEMA_OF_TELEMETRY)
        await self.move_default_rows()
        await self.ensure_ahead()
        await self.roll_up()
        await self.drop_expired_raw()
        await self.remove_old_rollups()
        await self.refresh_stats()
        return self.report

    # 1. default partitions -------------------------------------------------------------

    async def move_default_rows(self) -> None:
        horizons = await read_horizons(self.conn)
        for row in await self.conn.fetch(_DEFAULT_TELEMETRY_DAYS):
            day: date = row["day"]
            if not horizons.raw_kept(_day_start(day)):
                continue  # dropped day: marked for folding below, never re-partitioned
            name = telemetry_partition_name(day)
            if self.dry_run:
                self.report.rows_moved[name] = row["n"]
                continue

            async def move(c: asyncpg.Connection, day: date = day, name: str = name) -> int:
                await c.execute("SELECT fleet_ensure_telemetry_partitions($1, $1)", day)
                # Still under the parent's lock: the new partition holds exactly the moved rows.
                return int(await c.fetchval(f'SELECT count(*) FROM "{name}"'))

            done, moved = await self.locked(f"moving default rows into {name}", move)
            if done:
                self.report.rows_moved[name] = moved
        if horizons.raw is not None:
            if self.dry_run:
                self.report.late_hours_marked = int(await self.conn.fetchval(_COUNT_LATE_HOURS, horizons.raw))
            else:
                status = await self.conn.execute(_MARK_LATE_HOURS, horizons.raw)
                self.report.late_hours_marked = int(status.split()[-1])
        for row in await self.conn.fetch(_DEFAULT_AUDIT_MONTHS):
            month: date = row["month"]
            name = audit_partition_name(month)
            if self.dry_run:
                self.report.rows_moved[name] = row["n"]
                continue

            async def move_audit(c: asyncpg.Connection, month: date = month, name: str = name) -> int:
                await c.execute("SELECT fleet_ensure_audit_partitions($1, $1)", month)
                return int(await c.fetchval(f'SELECT count(*) FROM "{name}"'))

            done, moved = await self.locked(f"moving default rows into {name}", move_audit)
            if done:
                self.report.rows_moved[name] = moved

    # 2. partitions ahead ---------------------------------------------------------------

    async def ensure_ahead(self) -> None:
        today = self.now.astimezone(timezone.utc).date()
        last_day = today + timedelta(days=self.policy.partitions_ahead_days)
        days = [today + timedelta(days=i) for i in range((last_day - today).days + 1)]
        missing = await self.missing([telemetry_partition_name(d) for d in days])
        if missing and not self.dry_run:
            done, _ = await self.locked(
                "creating telemetry partitions ahead",
                lambda c: c.fetchval("SELECT fleet_ensure_telemetry_partitions($1, $2)", today, last_day),
            )
            missing = await self.created(missing) if done else []
        self.report.telemetry_partitions_created = missing

        this_month = today.replace(day=1)
        last_month = add_months(this_month, self.policy.audit_partitions_ahead_months)
        months = [add_months(this_month, i) for i in range(self.policy.audit_partitions_ahead_months + 1)]
        missing = await self.missing([audit_partition_name(m) for m in months])
        if missing and not self.dry_run:
            done, _ = await self.locked(
                "creating audit partitions ahead",
                lambda c: c.fetchval("SELECT fleet_ensure_audit_partitions($1, $2)", this_month, last_month),
            )
            missing = await self.created(missing) if done else []
        self.report.audit_partitions_created = missing

    # 3. rollups -----------------------------------------------------------------------

    async def roll_up(self) -> None:
        if self.dry_run:
            pending, lag = await rollup_backlog(self.conn)
            self.report.rollups = RollupReport(pending_hours=pending, lag_seconds=lag)
            return
        self.report.rollups = await refresh_dirty_rollups(
            self.conn, lock_timeout=self.policy.lock_timeout_seconds, lock_patience=self.policy.lock_patience_seconds
        )
        if self.report.rollups.claim_deferred:
            self.report.deferred.append("claiming dirty hours")

    # 4. retention -----------------------------------------------------------------------

    async def drop_expired_raw(self) -> None:
        attached = {row["relname"] for row in await self.conn.fetch(_ATTACHED)}
        by_day = {d: name for name in attached if (d := telemetry_partition_day(name)) is not None}
        for day in expired_raw_days(list(by_day), self.now, self.policy.raw_retention_days):
            name = by_day[day]
            start = _day_start(day)
            if self.dry_run:  # the pass rolls up first, so each of these would go
                self.report.raw_partitions_dropped.append(name)
                continue
            pending = int(await self.conn.fetchval(_PENDING_IN_DAY, start))
            if pending:
                self.report.raw_partitions_kept[name] = f"{pending} hours not rolled up yet"
                break  # drop in day order only, so everything before the raw horizon is gone

            async def detach(c: asyncpg.Connection, start: datetime = start, name: str = name) -> None:
                await lock_day(c, start)
                await c.execute(f'ALTER TABLE vehicle_telemetry DETACH PARTITION "{name}"')
                # Every sink transaction that wrote into the partition has committed by now
                # (the detach waited for it), so its dirty mark is visible here.
                hours = int(await c.fetchval(_PENDING_IN_DAY, start))
                if hours:
                    raise _StillDirty(hours)
                await c.execute(
                    "UPDATE telemetry_lifecycle SET raw_horizon = greatest(raw_horizon, $1)", start + DAY
                )

            try:
                done, _ = await self.locked(f"detaching {name}", detach)
            except _StillDirty as still:
                self.report.raw_partitions_kept[name] = (
                    f"{still.hours} hours marked while detaching; rolled up next pass"
                )
                break
            if not done:
                break
            await self.drop_detached(name)
            self.report.raw_partitions_dropped.append(name)
            log.info("raw partition dropped", partition=name)
        if not self.dry_run:
            await self.drop_orphans()

    async def drop_detached(self, name: str) -> None:
        # Its own transaction: the parent is no longer involved, so this holds up no writer.
        await self.locked(f"dropping detached {name}", lambda c: c.execute(f'DROP TABLE IF EXISTS "{name}"'))

    async def drop_orphans(self) -> None:
        """Drops detached partitions left by a pass that stopped between detach and drop."""
        horizons = await read_horizons(self.conn)
        if horizons.raw is None:
            return
        for row in await self.conn.fetch(_NAMED_LIKE_PARTITIONS, self.schema):
            day = telemetry_partition_day(row["relname"])
            if row["relispartition"] or day is None or _day_start(day) + DAY > horizons.raw:
                continue
            await self.drop_detached(row["relname"])
            if row["relname"] not in self.report.raw_partitions_dropped:
                self.report.raw_partitions_dropped.append(row["relname"])

    async def remove_old_rollups(self) -> None:
        cutoff = rollup_cutoff(self.now, self.policy.hourly_retention_days)
        if self.dry_run:
            self.report.hourly_rows_removed = int(
                await self.conn.fetchval("SELECT count(*) FROM vehicle_telemetry_hourly WHERE bucket < $1", cutoff)
            )
        else:
            while True:
                oldest = await self.conn.fetchval("SELECT min(bucket) FROM vehicle_telemetry_hourly")
                if oldest is None or oldest >= cutoff:
                    break
                day = utc_day(oldest)
                async with self.conn.transaction():
                    # The horizon moves first: a fold of this day now merges into the day itself.
                    await lock_day(self.conn, day)
                    await self.conn.execute(
                        "UPDATE telemetry_lifecycle SET hourly_horizon = greatest(hourly_horizon, $1)", day + DAY
                    )
                    status = await self.conn.execute(
                        "DELETE FROM vehicle_telemetry_hourly WHERE bucket >= $1 AND bucket < $2", day, day + DAY
                    )
                self.report.hourly_rows_removed += int(status.split()[-1])
        if not self.policy.daily_retention_days:
            return
        cutoff = rollup_cutoff(self.now, self.policy.daily_retention_days)
        if self.dry_run:
            self.report.daily_rows_removed = int(
                await self.conn.fetchval("SELECT count(*) FROM vehicle_telemetry_daily WHERE bucket < $1", cutoff)
            )
            return
        async with self.conn.transaction():
            status = await self.conn.execute("DELETE FROM vehicle_telemetry_daily WHERE bucket < $1", cutoff)
            await self.conn.execute("DELETE FROM telemetry_folded_readings WHERE time < $1", cutoff)
        self.report.daily_rows_removed = int(status.split()[-1])

    # 5. reporting views ---------------------------------------------------------------

    async def refresh_stats(self) -> None:
        if self.dry_run:
            last = await self.conn.fetchval(
                "SELECT last_success_at FROM maintenance_runs WHERE task = $1", STATS_VIEW
            )
            self.report.stats_refreshed = self.force_stats or stats_refresh_due(
                last, self.now, self.policy.stats_refresh_hour
            )
            return
        await self.conn.execute(
            "INSERT INTO maintenance_runs (task) VALUES ($1) ON CONFLICT (task) DO NOTHING", STATS_VIEW
        )
        async with self.conn.transaction():
            # The row lock makes a concurrent pass wait here, then find the refresh done.
            last = await self.conn.fetchval(
                "SELECT last_success_at FROM maintenance_runs WHERE task = $1 FOR UPDATE", STATS_VIEW
            )
            if not (self.force_stats or stats_refresh_due(last, self.now, self.policy.stats_refresh_hour)):
                return
            populated = await self.conn.fetchval(
                "SELECT ispopulated FROM pg_matviews WHERE matviewname = $1 AND schemaname = $2",
                STATS_VIEW, self.schema,
            )
            # CONCURRENTLY keeps the view readable during the refresh; it needs a populated view.
            mode = "CONCURRENTLY " if populated else ""
            await self.conn.execute(f"REFRESH MATERIALIZED VIEW {mode}{STATS_VIEW}")
            await self.conn.execute(
                "UPDATE maintenance_runs SET last_success_at = $2 WHERE task = $1", STATS_VIEW, self.now
            )
        self.report.stats_refreshed = True


async def run_pass(
    conn: asyncpg.Connection,
    policy: LifecyclePolicy,
    *,
    now: datetime,
    dry_run: bool = False,
    force_stats: bool = False,
) -> PassReport:
    """One maintenance pass at the moment ``now`` (the injectable clock's reading).

    Call outside a transaction: every step commits on its own, so a failure keeps what
    the earlier steps did and the next pass carries on. Blocks while another pass holds
    the pass lock. With ``dry_run`` it only reads (no lock, no change) and reports what a
    pass would do. Raises asyncpg errors (connection lost, ...) to the caller.
    """
    started = time.perf_counter()
    step = _Pass(conn, policy, now, dry_run, force_stats)
    if dry_run:
        report = await step.run()
    else:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PASS_LOCK_KEY):
            log.info("waiting for another fleet maintain pass to finish")
            await conn.execute("SELECT pg_advisory_lock($1)", PASS_LOCK_KEY)
        try:
            report = await step.run()
            await conn.execute(
                "INSERT INTO maintenance_runs (task, last_success_at) VALUES ('pass', $1)"
                " ON CONFLICT (task) DO UPDATE SET last_success_at = excluded.last_success_at",
                now,
            )
        finally:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", PASS_LOCK_KEY)
    report.duration_seconds = time.perf_counter() - started
    return report


# --- the command -------------------------------------------------------------------------


async def _connect(settings: "Settings") -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            settings.database_url,
            timeout=CONNECT_TIMEOUT_SECONDS,
            server_settings={"application_name": "fleet maintain"},
        )
    except asyncpg.exceptions.InvalidCatalogNameError:
        raise FleetError(
            f"database at {settings.database_url_masked} does not exist: run fleet migrate first"
        ) from None
    except (OSError, asyncio.TimeoutError, asyncpg.exceptions.PostgresConnectionError,
            asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.TooManyConnectionsError) as exc:
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable at {settings.database_url_masked} ({type(exc).__name__}):"
            " start it with `fleet services up` or set FLEET_DATABASE_URL"
        ) from None


class Maintainer:
    """Runs passes against ``settings.database_url`` with a clock and metrics of its own."""

    def __init__(self, settings: "Settings", *, clock: Clock = utc_now, metrics: MaintainMetrics | None = None) -> None:
        self.settings = settings
        self.policy = LifecyclePolicy.from_settings(settings)
        self.clock = clock
        self.metrics = metrics if metrics is not None else MaintainMetrics()

    async def run_once(self, *, dry_run: bool = False, force_stats: bool = False) -> PassReport:
        """One pass on a fresh connection. Raises :class:`ServiceUnavailable` when
        PostgreSQL cannot be reached and :class:`FleetError` when a step fails (the
        failure is counted in the metrics)."""
        conn = await _connect(self.settings)
        try:
            report = await run_pass(conn, self.policy, now=self.clock(), dry_run=dry_run, force_stats=force_stats)
        except asyncpg.exceptions.UndefinedTableError as exc:
            self.metrics.passes.labels(outcome="failure").inc()
            raise FleetError(f"the schema is missing a table ({exc}): run fleet migrate") from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self.metrics.passes.labels(outcome="failure").inc()
            if is_transient(exc):
                raise ServiceUnavailable(
                    f"lost PostgreSQL at {self.settings.database_url_masked} during the pass"
                    f" ({type(exc).__name__}); what was committed stays, run fleet maintain again"
                ) from None
            sqlstate = getattr(exc, "sqlstate", None)
            raise FleetError(f"maintenance pass failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             + (f" (SQLSTATE {sqlstate})" if sqlstate else "")) from None
        finally:
            if not conn.is_closed():
                await conn.close()
        if not dry_run:
            record_pass(self.metrics, report, time.time())
        return report

    async def run_every(self, interval: float, stop: asyncio.Event, *, force_stats: bool = False) -> int:
        """Passes every ``interval`` seconds (start to start) until ``stop`` is set.

        A failed pass is logged and counted and the loop carries on; the pass in progress
        when ``stop`` is set finishes first. Returns 0.
        """
        first = True
        while not stop.is_set():
            started = time.monotonic()
            try:
                report = await self.run_once(force_stats=force_stats and first)
                log.info("maintenance pass", summary=report.lines()[-1], **_log_fields(report))
            except FleetError as exc:
                log.error("maintenance pass failed", error=str(exc))
            first = False
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, interval - (time.monotonic() - started)))
            except asyncio.TimeoutError:
                pass
        return 0


def _log_fields(report: PassReport) -> dict[str, Any]:
    return {
        "partitions_created": len(report.telemetry_partitions_created) + len(report.audit_partitions_created),
        "rows_moved": sum(report.rows_moved.values()),
        "hours_rolled_up": report.rollups.hours,
        "partitions_dropped": len(report.raw_partitions_dropped),
        "rollup_lag_s": round(report.rollups.lag_seconds, 1),
        "deferred": report.deferred,
    }


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Adds ``fleet maintain`` to the ``fleet`` command line."""
    parser = sub.add_parser(
        "maintain",
        help="partitions, rollups, retention, materialized views (one pass, or --every)",
        description="One idempotent maintenance pass: move default-partition rows, create partitions"
        " ahead, roll up the hours marked dirty, drop raw partitions past FLEET_RAW_RETENTION_DAYS"
        " once rolled up, remove rollups past their retention, refresh monthly_vehicle_stats when its"
        " nightly run is due. Safe to run from several places at once.",
    )
    parser.add_argument(
        "--every", metavar="DURATION", default=None,
        help="run a pass every DURATION (30s, 5m, 1h) until SIGTERM or Ctrl-C; metrics on"
        " FLEET_MAINTAIN_METRICS_PORT",
    )
    parser.add_argument("--dry-run", action="store_true", help="show what a pass would do, change nothing")
    parser.add_argument("--refresh-stats", action="store_true",
                        help=f"refresh {STATS_VIEW} now instead of at its nightly hour")
    parser.add_argument("--json", action="store_true", help="print the pass report as JSON")
    parser.set_defaults(handler=run)


async def run(args: argparse.Namespace, settings: "Settings") -> int:
    """``fleet maintain``: prints one line per thing done (or the JSON report)."""
    if args.every is not None and args.dry_run:
        raise UsageError("--dry-run shows one pass; it cannot be combined with --every")
    interval = parse_every(args.every) if args.every is not None else None
    maintainer = Maintainer(settings)
    if interval is None:
        report = await maintainer.run_once(dry_run=args.dry_run, force_stats=args.refresh_stats)
        if args.json:
            print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
        else:
            for line in report.lines():
                print(line)
        return 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.maintain_metrics_port:
        start_http_server(settings.maintain_metrics_port, registry=maintainer.metrics.registry)
        log.info("metrics served", port=settings.maintain_metrics_port, path="/metrics")
    log.info("maintaining", every_s=interval, database=settings.database_url_masked)
    return await maintainer.run_every(interval, stop, force_stats=args.refresh_stats)
