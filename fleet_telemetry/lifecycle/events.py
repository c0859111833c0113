"""The outbound events' retention: published rows of the ``fleet_events`` outbox past
``FLEET_EVENTS_RETENTION_DAYS`` are removed, so the outbox does not grow for ever.

Only rows the broker acknowledged go (``published_at`` set, older than the cutoff); an
event still waiting to be published stays whatever its age. Subscribers keep the stream
itself, and the ids of removed events never come back: a replay of readings that old
finds its facts recorded already (trips, transitions, alerts), or past the raw
retention, records nothing.
"""

from __future__ import annotations

from datetime import timedelta

from fleet_telemetry.lifecycle.context import PassContext

_COUNT = "SELECT count(*) FROM fleet_events WHERE published_at < $1"
_REMOVE = "DELETE FROM fleet_events WHERE published_at < $1"


async def remove_old_events(ctx: PassContext) -> None:
    """Removes the published events older than the retention (counts them in a dry run)."""
    days = ctx.policy.events_retention_days
    if not days:
        return
    cutoff = ctx.now - timedelta(days=days)
    if ctx.dry_run:
        ctx.report.events_removed = int(await ctx.conn.fetchval(_COUNT, cutoff))
        return
    # Publishers lock unpublished rows only, so this never waits for a worker.
    status = await ctx.conn.execute(_REMOVE, cutoff)
    ctx.report.events_removed = int(status.rsplit(" ", 1)[-1])
