"""Every metric the project exports, in one place: the consumer's, ``fleet maintain``'s and
the command consumer's.

Each worker owns a :class:`PipelineMetrics` on a registry of its own, so tests (and the
demo's live view) can read one worker's numbers; ``serve`` exposes that registry on
``/metrics`` in the Prometheus text format, on the address ``FLEET_METRICS_ADDRESS`` names,
and a worker's ``/healthz`` and ``/readyz`` beside it (:mod:`fleet_telemetry.core.health`).
"""

from __future__ import annotations

import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from fleet_telemetry.core.errors import FleetError
from fleet_telemetry.core.health import Health

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60, 300, 3600)
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)


class MetricSet:
    """Metrics on a registry of their own, so a test (or the demo's live view) reads one
    worker's numbers and ``serve`` exposes exactly them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, buckets=buckets, registry=self.registry)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (``fleet_readings_total``, ...), 0 if absent."""
        result = self.registry.get_sample_value(name, labels or None)
        return float(result or 0.0)


class PipelineMetrics(MetricSet):
    """The consumer's metrics. Names and labels are part of the interface (docs/interface.md, "Metrics")."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        # What became of the readings, and how late.
        self.readings = self._counter("fleet_readings", "Readings by what became of them.", "outcome")
        self.dead_letters = self._counter(
            "fleet_dead_letters", "Readings sent to the dead-letter topic, by reason.", "reason")
        self.ingest_latency = self._histogram(
            "fleet_ingest_latency_seconds", "From a reading's event time to its batch committed in PostgreSQL.",
            _LATENCY_BUCKETS)
        self.batch_size = self._histogram("fleet_batch_size", "Readings per written batch.", _BATCH_BUCKETS)
        self.consumer_lag = self._gauge(
            "fleet_consumer_lag", "Records between the committed offset and the partition's end.",
            "topic", "partition")
        self.consumer_lag_seconds = self._gauge(
            "fleet_consumer_lag_seconds",
            "Age of the oldest record not yet committed, by its Kafka timestamp (0: caught up).",
            "topic", "partition")
        # The rules stage.
        self.alerts = self._counter("fleet_alerts", "Alerts raised and resolved.", "type", "action")
        self.geofence_transitions = self._counter(
            "fleet_geofence_transitions", "Geofence enters and exits confirmed.", "kind")
        self.rule_duration = self._histogram(
            "fleet_rule_evaluation_seconds",
            "Time to evaluate geofences and alert rules for one batch, state writes included.", _DURATION_BUCKETS)
        self.late_readings = self._counter(
            "fleet_late_readings",
            "Readings the rules skipped: not newer than the vehicle's newest evaluated one (late data, repeats).")
        self.geofences_active = self._gauge("fleet_geofences_active", "Active geofences in this worker's index.")
        # The trips stage.
        self.trips = self._counter("fleet_trips", "Trips and stops started and ended.", "kind", "action")
        self.trip_duration = self._histogram(
            "fleet_trip_stage_seconds", "Time to run one batch through the trips stage, its writes included.",
            _DURATION_BUCKETS)
        # How the worker spends its time, and what holds it back.
        self.copy_duration = self._histogram(
            "fleet_copy_duration_seconds", "Time to write one batch into PostgreSQL (COPY and commit).",
            _DURATION_BUCKETS)
        self.commit_duration = self._histogram(
            "fleet_offset_commit_duration_seconds", "Time to commit offsets to Kafka.", _DURATION_BUCKETS)
        self.status_duration = self._histogram(
            "fleet_status_update_duration_seconds", "Time to write one batch's statuses to Redis.",
            _DURATION_BUCKETS)
        self.paused_partitions = self._gauge(
            "fleet_paused_partitions", "Partitions paused because the writer is behind.")
        self.batches_in_flight = self._gauge(
            "fleet_batches_in_flight", "Batches handed to the writer and not yet committed.")
        self.retries = self._counter(
            "fleet_retries", "Retries after a transient failure, by dependency.", "dependency")
        self.status_updates_skipped = self._counter(
            "fleet_status_updates_skipped", "Vehicle status updates skipped because Redis was unreachable.")
        self.messages = self._counter("fleet_messages", "Kafka records consumed.")
        self.committed_batches = self._counter(
            "fleet_batches_committed", "Batches written and whose offsets were committed.")
        # The outbound events (docs/interface.md, "Outbound events").
        self.events_published = self._counter(
            "fleet_events_published", "Outbound events published to the events topic, by type.", "type")
        self.events_publish_duration = self._histogram(
            "fleet_events_publish_duration_seconds",
            "Time to publish one round of outbox rows and mark them (the broker's acks included).",
            _DURATION_BUCKETS)
        self.events_backlog = self._gauge(
            "fleet_events_outbox_backlog", "Outbox events not yet published, as last counted by this worker.")
        # Pre-create the label sets an operator alerts on, so they read 0 rather than
        # being absent before the first event.
        for outcome in ("stored", "duplicate", "dead_lettered"):
            self.readings.labels(outcome=outcome)
        for dependency in ("postgresql", "kafka", "redis", "events"):
            self.retries.labels(dependency=dependency)
        for kind in ("enter", "exit"):
            self.geofence_transitions.labels(kind=kind)
        for kind in ("trip", "stop"):
            for action in ("started", "ended"):
                self.trips.labels(kind=kind, action=action)


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


class MaintainMetrics(MetricSet):
    """Metrics of ``fleet maintain``, on a registry of their own (served with ``--every``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.passes = self._counter("fleet_maintain_passes", "Maintenance passes by outcome.", "outcome")
        self.last_success = self._gauge(
            "fleet_maintain_last_success_timestamp_seconds", "When the last successful pass ended (Unix time).")
        self.pass_duration = self._histogram(
            "fleet_maintain_pass_duration_seconds", "Duration of a maintenance pass.",
            (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900))
        self.partitions_created = self._counter(
            "fleet_maintain_partitions_created", "Partitions created, by table.", "table")
        self.partitions_dropped = self._counter(
            "fleet_maintain_partitions_dropped", "Partitions detached and dropped, by table.", "table")
        self.rows_moved = self._counter(
            "fleet_maintain_default_rows_moved", "Rows moved out of a default partition.")
        self.hours_rolled_up = self._counter(
            "fleet_maintain_rollup_recomputes", "Hours recomputed into vehicle_telemetry_hourly from raw rows.")
        self.rollup_lag = self._gauge(
            "fleet_maintain_rollup_lag_seconds",
            "Age of the oldest hour marked dirty and not yet rolled up, after the last pass (0: none).")
        self.rollup_pending = self._gauge(
            "fleet_maintain_rollup_pending", "Hours marked dirty and not yet rolled up, after the last pass.")
        self.score_days = self._counter(
            "fleet_maintain_score_days", "Days whose driver scores were recomputed.")
        self.partitions_until = self._gauge(
            "fleet_maintain_telemetry_partitions_until_timestamp_seconds",
            "End of the telemetry partitions that follow on from today without a gap, as far as a"
            " pass creates them, after the last pass (Unix time).")
        self.deferred = self._counter(
            "fleet_maintain_deferred_steps", "Steps left to the next pass because a lock stayed busy.")
        self.document_objects_removed = self._counter(
            "fleet_maintain_document_objects_removed",
            "Objects removed from the documents' bucket, by reason (deleted, orphan, multipart).", "reason")
        self.document_alerts = self._counter(
            "fleet_maintain_document_alerts", "document_expiring alerts raised and resolved.", "action")
        for outcome in ("success", "failure"):
            self.passes.labels(outcome=outcome)
        for table in ("vehicle_telemetry", "audit_logs"):
            self.partitions_created.labels(table=table)
        self.partitions_dropped.labels(table="vehicle_telemetry")
        for reason in ("deleted", "orphan", "multipart"):
            self.document_objects_removed.labels(reason=reason)
        for action in ("raised", "resolved"):
            self.document_alerts.labels(action=action)


class CommandMetrics(MetricSet):
    """The command consumer's metrics, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.commands = self._counter("fleet_commands", "Commands by what became of them.", "outcome")
        self.rejections = self._counter("fleet_command_rejections", "Dead-lettered commands, by reason.", "reason")
        self.retries = self._counter("fleet_command_retries", "Retries after transient failures.", "dependency")


class NotifyMetrics(MetricSet):
    """``fleet notify``'s metrics, on a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.sent = self._counter("fleet_notify_sent", "Events delivered to the webhook, by type.", "type")
        self.failed = self._counter(
            "fleet_notify_failed", "Failed delivery attempts, by reason (status_5xx, status_4xx, timeout, ...).",
            "reason")
        self.retried = self._counter("fleet_notify_retried", "Delivery attempts after a failed one.")
        self.dead_lettered = self._counter(
            "fleet_notify_dead_lettered", "Events given up and sent to the notify dead-letter topic, by reason.",
            "reason")
        self.skipped = self._counter(
            "fleet_notify_skipped", "Events not sent: filtered out by --type, or delivered before.", "why")
        self.request_duration = self._histogram(
            "fleet_notify_request_seconds", "Duration of one webhook request, failed ones included.",
            _DURATION_BUCKETS)
        self.retries = self._counter(
            "fleet_notify_dependency_retries", "Retries after a transient failure of Kafka or Redis.", "dependency")
        for why in ("filtered", "duplicate"):
            self.skipped.labels(why=why)


DEFAULT_ADDRESS = "0.0.0.0"
"""Every interface: what a container needs (``FLEET_METRICS_ADDRESS`` narrows it)."""


def serve(metrics: MetricSet, port: int, addr: str = DEFAULT_ADDRESS,
          setting: str = "FLEET_METRICS_PORT", *, health: Health | None = None) -> WSGIServer | None:
    """Exposes ``metrics`` on ``http://addr:port/metrics`` from a daemon thread, and with
    ``health`` a worker's ``/healthz`` and ``/readyz``; port 0 turns it off (then
    ``None``). Returns the server (``shutdown()`` stops it); raises
    :class:`~fleet_telemetry.core.errors.FleetError` naming the address and ``setting``
    (the port's) when the address cannot be bound (taken, or not this host's)."""
    if not port:
        return None
    try:
        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = _family(addr, port)

        server = make_server(addr, port, _application(metrics, health), Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise FleetError(
            f"cannot serve metrics on {addr}:{port} ({exc.strerror or type(exc).__name__}):"
            f" set {setting} to a free port (0 turns the endpoint off) or FLEET_METRICS_ADDRESS"
        ) from None
    threading.Thread(target=server.serve_forever, name="fleet-metrics", daemon=True).start()
    return server


_StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _application(metrics: MetricSet, health: Health | None) -> Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]:
    """``/healthz`` and ``/readyz`` from ``health``; everything else is the Prometheus exposition."""
    exposition = make_wsgi_app(metrics.registry)

    def application(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if health is not None and path in ("/healthz", "/readyz"):
            ok, body = health.live() if path == "/healthz" else health.ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        result: Iterable[bytes] = exposition(environ, start_response)
        return result

    return application


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per request (scrapes and probes come every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _family(addr: str, port: int) -> socket.AddressFamily:
    """IPv4 or IPv6, whichever ``addr`` resolves to first."""
    infos = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]
