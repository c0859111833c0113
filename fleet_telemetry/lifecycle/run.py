"""``fleet maintain``: partitions, rollups, retention and reports, one idempotent pass at a time.

A pass (schema/README.md, "Lifecycle: partitions, rollups, retention"), in this order:

1. moves rows that fell into a default partition into partitions of their own
   (telemetry days, audit months); rows of telemetry days whose raw data was already
   dropped are instead marked for folding into the rollups
   (:mod:`fleet_telemetry.lifecycle.partitions`);
2. creates the telemetry partitions for today and ``partitions_ahead_days`` ahead, and
   the audit partitions for this month and ``audit_partitions_ahead_months`` ahead;
3. recomputes the rollups of the hours the sink marked dirty (:mod:`fleet_telemetry.lifecycle.rollups`),
   then the trips, stops and accumulators of the vehicle-hours late readings touched,
   and the trips of vehicles silent for the gap ended (:mod:`fleet_telemetry.trips.recompute`);
   then the daily driver scores of the days whose telemetry, behaviour alerts or
   assignments changed (:mod:`fleet_telemetry.lifecycle.driver_scores`; before retention,
   which may drop the raw rows they are computed from);
4. detaches and drops raw partitions whose whole day is older than the raw retention,
   oldest first, each only once none of its hours waits for a rollup; removes hourly
   rollups past their retention (whole days) and, if configured, daily ones
   (:mod:`fleet_telemetry.lifecycle.retention`); removes published outbound events past
   ``events_retention_days`` (:mod:`fleet_telemetry.lifecycle.events`);
5. refreshes ``monthly_vehicle_stats`` and ``monthly_vehicle_revenue`` concurrently when
   their nightly run is due (:mod:`fleet_telemetry.lifecycle.stats`);
6. raises and resolves ``document_expiring`` alerts, removes the objects of documents
   deleted past their grace period and objects no document refers to, and aborts stale
   multipart uploads (:mod:`fleet_telemetry.lifecycle.documents`).

Passes from several hosts serialise on a session advisory lock, and every step is safe
on its own as well. Each statement that takes a lock ingestion also needs (creating or
detaching a partition, claiming dirty hours) first retries with 20 ms lock waits for a
couple of seconds, then waits at most ``maintain_lock_timeout_seconds`` a few times
(:func:`fleet_telemetry.lifecycle.locks.in_lock_timeout`); a step that still cannot get
its lock is reported as deferred and left to the next pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import structlog

from fleet_telemetry.core.errors import FleetError, unavailable
from fleet_telemetry.core.failures import explain
from fleet_telemetry.core.metrics import MaintainMetrics
from fleet_telemetry.core.retry import is_transient
from fleet_telemetry.lifecycle.context import PassContext
from fleet_telemetry.lifecycle.documents import check_document_expiry, clean_document_storage
from fleet_telemetry.lifecycle.driver_scores import score_drivers
from fleet_telemetry.lifecycle.events import remove_old_events
from fleet_telemetry.lifecycle.locks import pass_lock
from fleet_telemetry.lifecycle.partitions import ensure_ahead, move_default_rows
from fleet_telemetry.lifecycle.policy import LifecyclePolicy, utc_now
from fleet_telemetry.lifecycle.report import PassReport, record_pass
from fleet_telemetry.lifecycle.retention import drop_expired_raw, remove_old_rollups
from fleet_telemetry.lifecycle.rollups import RollupReport, refresh_dirty_rollups, rollup_backlog
from fleet_telemetry.lifecycle.stats import refresh_stats
from fleet_telemetry.trips.recompute import expire_silent, pending_vehicles, recompute_dirty

if TYPE_CHECKING:
    from fleet_telemetry.core.settings import Settings

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
Step = Callable[[PassContext], Awaitable[None]]

CONNECT_TIMEOUT_SECONDS = 10.0

_SCHEMA_OF_TELEMETRY = (
    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.oid = 'vehicle_telemetry'::regclass"
)
_RECORD_PASS = (
    "INSERT INTO maintenance_runs (task, last_success_at) VALUES ('pass', $1)"
    " ON CONFLICT (task) DO UPDATE SET last_success_at = excluded.last_success_at"
)


async def roll_up(ctx: PassContext) -> None:
    """Recomputes the rollups of the dirty hours (with ``dry_run``: counts them)."""
    if ctx.dry_run:
        pending, lag = await rollup_backlog(ctx.conn)
        ctx.report.rollups = RollupReport(pending_hours=pending, lag_seconds=lag)
        return
    ctx.report.rollups = await refresh_dirty_rollups(
        ctx.conn, lock_timeout=ctx.policy.lock_timeout_seconds, lock_patience=ctx.policy.lock_patience_seconds
    )
    if ctx.report.rollups.claim_deferred:
        ctx.report.deferred.append("claiming dirty hours")


async def recompute_trips(ctx: PassContext) -> None:
    """Recomputes the trips, stops and accumulators of the vehicles late readings touched
    (with ``dry_run``: counts them), then ends the trips of vehicles silent for
    ``FLEET_TRIPS_GAP_SECONDS``. Runs before the raw partitions are dropped."""
    if ctx.dry_run:
        ctx.report.trip_vehicles_pending = await pending_vehicles(ctx.conn)
        return
    while True:
        done = await recompute_dirty(ctx.conn, ctx.policy.motion, ctx.now)
        if not done:
            break
        ctx.report.trip_vehicles_recomputed += len(done)
        ctx.report.trips_rewritten += sum(r.trips for r in done)
    while expired := await expire_silent(ctx.conn, ctx.policy.motion, ctx.now):
        ctx.report.trips_expired += expired


# The steps of a pass, in order; each commits what it did.
STEPS: tuple[Step, ...] = (move_default_rows, ensure_ahead, roll_up, recompute_trips, score_drivers, drop_expired_raw,
                           remove_old_rollups, remove_old_events, refresh_stats, check_document_expiry,
                           clean_document_storage)


async def run_pass(
    conn: asyncpg.Connection,
    policy: LifecyclePolicy,
    *,
    now: datetime,
    dry_run: bool = False,
    force_stats: bool = False,
    settings: "Settings | None" = None,
) -> PassReport:
    """One maintenance pass at the moment ``now`` (the injectable clock's reading).

    Call outside a transaction: every step commits on its own, so a failure keeps what
    the earlier steps did and the next pass carries on. Blocks while another pass holds
    the pass lock. With ``dry_run`` it only reads (no lock, no change) and reports what a
    pass would do. Without ``settings`` the documents' steps are skipped. Raises asyncpg
    errors (connection lost, ...) to the caller.
    """
    started = time.perf_counter()
    ctx = PassContext(conn, policy, now, dry_run=dry_run, force_stats=force_stats, settings=settings)
    if dry_run:
        await _run_steps(ctx)
    else:
        async with pass_lock(conn):
            await _run_steps(ctx)
            await conn.execute(_RECORD_PASS, now)
    ctx.report.duration_seconds = time.perf_counter() - started
    return ctx.report


async def _run_steps(ctx: PassContext) -> None:
    ctx.schema = await ctx.conn.fetchval(_SCHEMA_OF_TELEMETRY)
    for step in STEPS:
        await step(ctx)


# --- passes against the configured database -----------------------------------------------


async def connect(settings: "Settings") -> asyncpg.Connection:
    """A connection for one pass. Raises :class:`ServiceUnavailable` when PostgreSQL does
    not answer and :class:`FleetError` when the database does not exist or the server
    refuses the login."""
    try:
        return await asyncpg.connect(
            settings.database_url,
            timeout=CONNECT_TIMEOUT_SECONDS,
            server_settings={"application_name": "fleet maintain"},
        )
    except Exception as exc:
        failure = explain(exc, settings)
        if failure is None:
            raise
        raise failure from None


def _pass_failure(exc: Exception, settings: "Settings") -> FleetError:
    """The error a command reports for a pass that raised ``exc``."""
    if is_transient(exc):
        return unavailable(
            "PostgreSQL", settings.database_url_masked, exc,
            hint="the pass stopped part-way: what was committed stays, run fleet maintain again",
        )
    failure = explain(exc, settings)
    if failure is not None:
        return failure
    return FleetError(f"maintenance pass failed ({type(exc).__name__})")


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
        conn = await connect(self.settings)
        try:
            report = await run_pass(conn, self.policy, now=self.clock(), dry_run=dry_run, force_stats=force_stats,
                                    settings=self.settings)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self.metrics.passes.labels(outcome="failure").inc()
            raise _pass_failure(exc, self.settings) from None
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
                log.info("maintenance pass", summary=report.lines()[-1], **report.log_fields())
            except FleetError as exc:
                log.error("maintenance pass failed", error=str(exc))
            first = False
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, interval - (time.monotonic() - started)))
            except asyncio.TimeoutError:
                pass
        return 0
