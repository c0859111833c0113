"""Every metric the project exports, in one place: the consumer's, ``fleet maintain``'s and
the command consumer's.

Each worker owns a :class:`PipelineMetrics` on a registry of its own, so tests (and the
demo's live view) can read one worker's numbers; ``serve`` exposes that registry on
``/metrics`` in the Prometheus text format, on the address ``FLEET_METRICS_ADDRESS`` names.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60, 300, 3600)
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)


class PipelineMetrics:
    """The consumer's metrics. Names and labels are part of the contract (CONTRACT.md)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.readings = Counter(
            "fleet_readings", "Readings by what became of them.", ["outcome"], registry=r
        )
        self.dead_letters = Counter(
            "fleet_dead_letters", "Readings sent to the dead-letter topic, by reason.", ["reason"], registry=r
        )
        self.ingest_latency = Histogram(
            "fleet_ingest_latency_seconds",
            "From a reading's event time to its batch committed in PostgreSQL.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "fleet_batch_size", "Readings per written batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.consumer_lag = Gauge(
            "fleet_consumer_lag", "Records between the committed offset and the partition's end.",
            ["topic", "partition"], registry=r,
        )
        self.alerts = Counter(
            "fleet_alerts", "Alerts raised and resolved.", ["type", "action"], registry=r
        )
        self.geofence_transitions = Counter(
            "fleet_geofence_transitions", "Geofence enters and exits confirmed.", ["kind"], registry=r
        )
        self.rule_duration = Histogram(
            "fleet_rule_evaluation_seconds",
            "Time to evaluate geofences and alert rules for one batch, state writes included.",
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.late_readings = Counter(
            "fleet_late_readings",
            "Readings stored but not evaluated by the rules: older than the vehicle's newest.", registry=r,
        )
        self.geofences_active = Gauge(
            "fleet_geofences_active", "Active geofences in this worker's index.", registry=r
        )
        self.copy_duration = Histogram(
            "fleet_copy_duration_seconds", "Time to write one batch into PostgreSQL (COPY and commit).",
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.commit_duration = Histogram(
            "fleet_offset_commit_duration_seconds", "Time to commit offsets to Kafka.",
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.status_duration = Histogram(
            "fleet_status_update_duration_seconds", "Time to write one batch's statuses to Redis.",
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.paused_partitions = Gauge(
            "fleet_paused_partitions", "Partitions paused because the writer is behind.", registry=r
        )
        self.batches_in_flight = Gauge(
            "fleet_batches_in_flight", "Batches handed to the writer and not yet committed.", registry=r
        )
        self.retries = Counter(
            "fleet_retries", "Retries after a transient failure, by dependency.", ["dependency"], registry=r
        )
        self.status_updates_skipped = Counter(
            "fleet_status_updates_skipped",
            "Vehicle status updates skipped because Redis was unreachable.", registry=r,
        )
        self.messages = Counter(
            "fleet_messages", "Kafka records consumed.", registry=r
        )
        self.committed_batches = Counter(
            "fleet_batches_committed", "Batches written and whose offsets were committed.", registry=r
        )
        # Pre-create the label sets an operator alerts on, so they read 0 rather than
        # being absent before the first event.
        for outcome in ("stored", "duplicate", "dead_lettered"):
            self.readings.labels(outcome=outcome)
        for dependency in ("postgresql", "kafka", "redis"):
            self.retries.labels(dependency=dependency)
        for kind in ("enter", "exit"):
            self.geofence_transitions.labels(kind=kind)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (``fleet_readings_total``, ...), 0 if absent."""
        result = self.registry.get_sample_value(name, labels or None)
        return float(result or 0.0)


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe`` for many values at once.

    prometheus-client takes a lock and walks the buckets on every ``observe``; for the
    per-reading latency of a 5,000-reading batch that is a visible share of the
    consumer's time. This counts the buckets locally and adds each once.
    """
    buckets = getattr(histogram, "_upper_bounds", None)
    counters = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or counters is None or total is None:  # a different client version
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(buckets)
    for value in values:
        counts[bisect_left(buckets, value)] += 1
    for counter, count in zip(counters, counts):
        if count:
            counter.inc(count)
    total.inc(sum(values))


class MaintainMetrics:
    """Metrics of ``fleet maintain``, on a registry of their own (served with ``--every``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.passes = Counter("fleet_maintain_passes", "Maintenance passes by outcome.", ["outcome"], registry=r)
        self.last_success = Gauge(
            "fleet_maintain_last_success_timestamp_seconds", "When the last successful pass ended (Unix time).",
            registry=r,
        )
        self.pass_duration = Histogram(
            "fleet_maintain_pass_duration_seconds", "Duration of a maintenance pass.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900), registry=r,
        )
        self.partitions_created = Counter(
            "fleet_maintain_partitions_created", "Partitions created, by table.", ["table"], registry=r
        )
        self.partitions_dropped = Counter(
            "fleet_maintain_partitions_dropped", "Partitions detached and dropped, by table.", ["table"], registry=r
        )
        self.rows_moved = Counter(
            "fleet_maintain_default_rows_moved", "Rows moved out of a default partition.", registry=r
        )
        self.hours_rolled_up = Counter(
            "fleet_maintain_rollup_recomputes", "Hours recomputed into vehicle_telemetry_hourly from raw rows.",
            registry=r,
        )
        self.rollup_lag = Gauge(
            "fleet_maintain_rollup_lag_seconds",
            "Age of the oldest hour marked dirty and not yet rolled up, after the last pass (0: none).",
            registry=r,
        )
        self.rollup_pending = Gauge(
            "fleet_maintain_rollup_pending", "Hours marked dirty and not yet rolled up, after the last pass.",
            registry=r,
        )
        self.deferred = Counter(
            "fleet_maintain_deferred_steps", "Steps left to the next pass because a lock stayed busy.", registry=r
        )
        for outcome in ("success", "failure"):
            self.passes.labels(outcome=outcome)
        for table in ("vehicle_telemetry", "audit_logs"):
            self.partitions_created.labels(table=table)
        self.partitions_dropped.labels(table="vehicle_telemetry")

    def value(self, name: str, **labels: str) -> float:
        result = self.registry.get_sample_value(name, labels or None)
        return float(result or 0.0)


class CommandMetrics:
    """The command consumer's metrics, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.commands = Counter("fleet_commands", "Commands by what became of them.",
                                ["outcome"], registry=self.registry)
        self.rejections = Counter("fleet_command_rejections", "Dead-lettered commands, by reason.",
                                  ["reason"], registry=self.registry)
        self.retries = Counter("fleet_command_retries", "Retries after transient failures.",
                               ["dependency"], registry=self.registry)


DEFAULT_ADDRESS = "0.0.0.0"
"""Every interface: what a container needs (``FLEET_METRICS_ADDRESS`` narrows it)."""


class HasRegistry(Protocol):
    """Any of the metric sets above."""

    @property
    def registry(self) -> CollectorRegistry: ...


def serve(metrics: HasRegistry, port: int, addr: str = DEFAULT_ADDRESS) -> WSGIServer | None:
    """Exposes ``metrics`` on ``http://addr:port/metrics`` from a daemon thread; port 0
    turns it off (then ``None``). Returns the server (``shutdown()`` stops it); raises
    OSError when the address cannot be bound."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return server
