"""The documents' steps of a pass: expiry alerts, and cleaning the bucket.

``check_document_expiry`` raises and resolves ``document_expiring`` alerts
(:mod:`fleet_telemetry.documents.expiry`); ``clean_document_storage`` removes what no
document needs any more (:mod:`fleet_telemetry.documents.cleanup`). A storage that does
not answer (or was never set up) skips the cleaning with a warning and a line in the
report: the telemetry's upkeep never waits for it, and the next pass cleans instead.
"""

from __future__ import annotations

from datetime import timedelta

import structlog

from fleet_telemetry.core.errors import FleetError
from fleet_telemetry.core.retry import is_transient
from fleet_telemetry.documents.cleanup import clean_bucket
from fleet_telemetry.documents.expiry import check_expiry
from fleet_telemetry.documents.storage import Storage
from fleet_telemetry.lifecycle.context import PassContext

log = structlog.get_logger(__name__)


async def check_document_expiry(ctx: PassContext) -> None:
    """Raises the expiry alerts due and resolves the settled ones (not in a dry run)."""
    if ctx.dry_run or ctx.settings is None:
        return
    raised, resolved = await check_expiry(ctx.conn, today=ctx.now.date(), days=ctx.settings.document_expiry_days)
    ctx.report.documents.alerts_raised += raised
    ctx.report.documents.alerts_resolved += resolved


async def clean_document_storage(ctx: PassContext) -> None:
    """Removes deleted documents' and orphaned objects and aborts stale multipart uploads."""
    settings = ctx.settings
    if settings is None:
        return
    try:
        async with Storage.open(settings, attempts=1) as storage:  # the next pass is the retry
            await clean_bucket(
                ctx.conn, storage, ctx.report.documents, now=ctx.now, dry_run=ctx.dry_run,
                orphan_grace=timedelta(hours=settings.document_orphan_grace_hours),
                deleted_grace=timedelta(days=settings.document_deleted_grace_days),
            )
    except FleetError as exc:
        ctx.report.documents.skipped = str(exc)
    except Exception as exc:
        if not is_transient(exc):
            raise
        ctx.report.documents.skipped = f"object storage at {settings.s3_endpoint} failed ({type(exc).__name__})"
    if ctx.report.documents.skipped:
        log.warning("document storage not cleaned this pass", reason=ctx.report.documents.skipped)
