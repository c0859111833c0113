"""The nightly refresh of the reporting views ``monthly_vehicle_stats`` and
``monthly_vehicle_revenue`` (together they make the monthly profitability per vehicle).

Due once after each day's ``stats_refresh_hour`` (UTC), or whenever asked for; the
time of the last refresh is kept in ``maintenance_runs``, so passes from several hosts
refresh them once.
"""

from __future__ import annotations

from datetime import datetime

from fleet_telemetry.lifecycle.context import PassContext
from fleet_telemetry.lifecycle.policy import REPORT_VIEWS, STATS_VIEW, stats_refresh_due

_LAST_REFRESH = "SELECT last_success_at FROM maintenance_runs WHERE task = $1"


def _due(ctx: PassContext, last: datetime | None) -> bool:
    return ctx.force_stats or stats_refresh_due(last, ctx.now, ctx.policy.stats_refresh_hour)


async def refresh_stats(ctx: PassContext) -> None:
    """Refreshes the views when due, each concurrently once it is populated, in one
    transaction with the time of the refresh; commits."""
    if ctx.dry_run:
        ctx.report.stats_refreshed = _due(ctx, await ctx.conn.fetchval(_LAST_REFRESH, STATS_VIEW))
        return
    conn = ctx.conn
    await conn.execute("INSERT INTO maintenance_runs (task) VALUES ($1) ON CONFLICT (task) DO NOTHING", STATS_VIEW)
    async with conn.transaction():
        # The row lock makes a concurrent pass wait here, then find the refresh done.
        if not _due(ctx, await conn.fetchval(_LAST_REFRESH + " FOR UPDATE", STATS_VIEW)):
            return
        for view in REPORT_VIEWS:
            populated = await conn.fetchval(
                "SELECT ispopulated FROM pg_matviews WHERE matviewname = $1 AND schemaname = $2", view, ctx.schema
            )
            # CONCURRENTLY keeps the view readable during the refresh; it needs a populated
            # view and a unique index (both views have one).
            mode = "CONCURRENTLY " if populated else ""
            await conn.execute(f"REFRESH MATERIALIZED VIEW {mode}{view}")
        await conn.execute("UPDATE maintenance_runs SET last_success_at = $2 WHERE task = $1", STATS_VIEW, ctx.now)
    ctx.report.stats_refreshed = True
