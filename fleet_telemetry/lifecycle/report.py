"""What one pass did, and how it is told: lines for people, JSON, log fields, metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from fleet_telemetry.core.metrics import MaintainMetrics
from fleet_telemetry.documents.cleanup import CleanupReport
from fleet_telemetry.lifecycle.policy import REPORT_VIEWS
from fleet_telemetry.lifecycle.rollups import RollupReport


@dataclass
class ScoresReport:
    """What one :func:`fleet_telemetry.lifecycle.driver_scores.refresh_driver_scores` did."""

    days: int = 0
    """Days whose rows were recomputed."""
    hours: int = 0
    """Hours whose distances were recomputed."""
    rows_changed: int = 0
    """Driver-day rows inserted, changed or removed."""
    days_past_retention: int = 0
    """Days with marked hours left as they were: their raw readings are gone."""
    claim_deferred: bool = False
    """The marks could not be claimed within the lock timeout (retried next time)."""
    pending_hours: int = 0
    """Hours still marked or queued when it finished."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
    telemetry_partitions_until: datetime | None = None
    """End of the telemetry partitions following on from today without a gap, after the pass."""
    rollups: RollupReport = field(default_factory=RollupReport)
    driver_scores: ScoresReport = field(default_factory=ScoresReport)
    raw_partitions_dropped: list[str] = field(default_factory=list)
    raw_partitions_kept: dict[str, str] = field(default_factory=dict)
    """Partition past retention -> why it was kept this time."""
    trip_vehicles_recomputed: int = 0
    """Vehicles whose trips and stops were recomputed after late readings."""
    trips_rewritten: int = 0
    """Trips those recomputations found (written only where they changed)."""
    trips_expired: int = 0
    """Vehicles silent for the gap whose trip (or idling) was ended at their last reading."""
    trip_vehicles_pending: int = 0
    """With ``dry_run``: vehicles waiting for that recomputation."""
    hourly_rows_removed: int = 0
    daily_rows_removed: int = 0
    events_removed: int = 0
    """Published outbound events past ``FLEET_EVENTS_RETENTION_DAYS`` removed from the outbox."""
    stats_refreshed: bool = False
    """The reporting views (:data:`REPORT_VIEWS`) were refreshed."""
    deferred: list[str] = field(default_factory=list)
    """Steps whose lock stayed busy past the lock timeout; the next pass retries them."""
    documents: CleanupReport = field(default_factory=CleanupReport)
    """Expiry alerts and what was removed from the documents' bucket."""
    duration_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """One human line per thing done (or planned); the last line sums up."""
        out = [*self._partition_lines(), *self._rollup_lines(), *self._trip_lines(), *self._score_lines(),
               *self._retention_lines()]
        if self.stats_refreshed:
            out.extend(f"{self._say('refreshed', 'would refresh')} {view}" for view in REPORT_VIEWS)
        out.extend(self._document_lines())
        out.extend(f"deferred {step}: its lock stayed busy; the next pass retries" for step in self.deferred)
        out.append(self._summary())
        return out

    def _trip_lines(self) -> list[str]:
        if self.dry_run:
            return ([f"would recompute the trips of {self.trip_vehicles_pending} vehicles touched by late readings"]
                    if self.trip_vehicles_pending else [])
        out = ([f"recomputed the trips of {self.trip_vehicles_recomputed} vehicles touched by late readings"
                f" ({self.trips_rewritten} trips)"] if self.trip_vehicles_recomputed else [])
        if self.trips_expired:
            out.append(f"ended the trips of {self.trips_expired} vehicles silent for the trip gap")
        return out

    def _say(self, done: str, planned: str) -> str:
        return planned if self.dry_run else done

    def _partition_lines(self) -> list[str]:
        say = self._say
        out = [f"{say('moved', 'would move')} {rows} default-partition rows into {partition}"
               for partition, rows in self.rows_moved.items()]
        if self.late_hours_marked:
            out.append(f"{say('marked', 'would mark')} {self.late_hours_marked} hours of late rows"
                       " past the raw retention for folding into the rollups")
        out.extend(f"{say('created', 'would create')} partition {name}"
                   for name in self.telemetry_partitions_created + self.audit_partitions_created)
        return out

    def _rollup_lines(self) -> list[str]:
        r = self.rollups
        if self.dry_run:
            if r.pending_hours:
                return [f"would roll up {r.pending_hours} dirty hours (oldest marked {r.lag_seconds:.0f} s ago)"]
        elif r.hours or r.days or r.late_hours:
            text = f"rolled up {r.hours} hours and {r.days} days"
            if r.late_hours:
                text += f", folded {r.folded_readings} late readings of {r.late_hours} hours past the raw retention"
            return [text]
        return []

    def _score_lines(self) -> list[str]:
        s = self.driver_scores
        if self.dry_run:
            return [f"would recompute the driver scores of {s.pending_hours} hours"] if s.pending_hours else []
        if s.days:
            return [f"recomputed the driver scores of {s.days} days ({s.hours} hours, {s.rows_changed} rows changed)"]
        return []

    def _retention_lines(self) -> list[str]:
        say = self._say
        out = [f"{say('dropped', 'would drop')} partition {name} (past the raw retention)"
               for name in self.raw_partitions_dropped]
        out.extend(f"kept partition {name} past the raw retention: {why}"
                   for name, why in self.raw_partitions_kept.items())
        if self.hourly_rows_removed:
            out.append(f"{say('removed', 'would remove')} {self.hourly_rows_removed} hourly rollup rows past retention")
        if self.daily_rows_removed:
            out.append(f"{say('removed', 'would remove')} {self.daily_rows_removed} daily rollup rows past retention")
        if self.events_removed:
            out.append(f"{say('removed', 'would remove')} {self.events_removed} published events past retention")
        return out

    def _document_lines(self) -> list[str]:
        d, say = self.documents, self._say
        out = []
        if d.alerts_raised or d.alerts_resolved:
            out.append(f"document expiry alerts: {d.alerts_raised} raised, {d.alerts_resolved} resolved")
        if d.deleted_objects_removed:
            out.append(f"{say('removed', 'would remove')} {d.deleted_objects_removed} objects of deleted documents")
        if d.orphans_removed:
            out.append(f"{say('removed', 'would remove')} {d.orphans_removed} objects no document refers to")
        if d.uploads_aborted:
            out.append(f"{say('aborted', 'would abort')} {d.uploads_aborted} stale multipart uploads")
        if d.skipped:
            out.append(f"document storage not cleaned: {d.skipped}")
        return out

    def _summary(self) -> str:
        if self.dry_run:
            return "dry run: nothing was changed"
        r = self.rollups
        lag = f"; {r.pending_hours} hours left to roll up, lag {r.lag_seconds:.0f} s" if r.pending_hours else ""
        return f"pass done in {self.duration_seconds:.2f} s{lag}"

    def log_fields(self) -> dict[str, Any]:
        """The fields of the ``maintenance pass`` log event."""
        return {
            "partitions_created": len(self.telemetry_partitions_created) + len(self.audit_partitions_created),
            "rows_moved": sum(self.rows_moved.values()),
            "hours_rolled_up": self.rollups.hours,
            "score_days": self.driver_scores.days,
            "partitions_dropped": len(self.raw_partitions_dropped),
            "rollup_lag_s": round(self.rollups.lag_seconds, 1),
            "deferred": self.deferred,
        }


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
    metrics.score_days.inc(report.driver_scores.days)
    metrics.deferred.inc(len(report.deferred))
    documents = report.documents
    metrics.document_objects_removed.labels(reason="deleted").inc(documents.deleted_objects_removed)
    metrics.document_objects_removed.labels(reason="orphan").inc(documents.orphans_removed)
    metrics.document_objects_removed.labels(reason="multipart").inc(documents.uploads_aborted)
    metrics.document_alerts.labels(action="raised").inc(documents.alerts_raised)
    metrics.document_alerts.labels(action="resolved").inc(documents.alerts_resolved)
    if report.telemetry_partitions_until is not None:
        metrics.partitions_until.set(report.telemetry_partitions_until.timestamp())
