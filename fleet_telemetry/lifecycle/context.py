"""What every step of a pass works with: the connection, the policy, the moment, the report."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

import asyncpg
import structlog

from fleet_telemetry.lifecycle.locks import in_lock_timeout
from fleet_telemetry.lifecycle.policy import LifecyclePolicy
from fleet_telemetry.lifecycle.report import PassReport

if TYPE_CHECKING:
    from fleet_telemetry.core.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass
class PassContext:
    """One pass over one connection at the moment ``now``; with ``dry_run`` steps only read."""

    conn: asyncpg.Connection
    policy: LifecyclePolicy
    now: datetime
    dry_run: bool = False
    force_stats: bool = False
    """Refresh the reporting view whether or not its nightly run is due."""
    schema: str = "public"
    """Schema of ``vehicle_telemetry``, where the partitions live."""
    settings: "Settings | None" = None
    """The settings of steps that reach beyond the database (the documents' bucket); None
    skips those steps."""
    report: PassReport = field(init=False)

    def __post_init__(self) -> None:
        self.report = PassReport(now=self.now, dry_run=self.dry_run)

    async def locked(self, step: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> tuple[bool, T | None]:
        """Runs ``work`` with short lock waits (:func:`in_lock_timeout`), committing it.

        Returns ``(True, result)``, or ``(False, None)`` when the lock stayed busy: then
        ``step`` is reported as deferred to the next pass.
        """
        done, result = await in_lock_timeout(
            self.conn, work, timeout=self.policy.lock_timeout_seconds, patience=self.policy.lock_patience_seconds
        )
        if not done:
            self.report.deferred.append(step)
            log.warning("lock busy, step deferred to the next pass", step=step,
                        lock_timeout_s=self.policy.lock_timeout_seconds)
        return done, result
