"""observe_many must leave a histogram exactly as one observe per value would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from fleet_telemetry.core.metrics import PipelineMetrics, observe_many


@given(st.lists(st.floats(min_value=-10, max_value=1e5, allow_nan=False), max_size=60))
def test_observe_many_equals_observe_one_by_one(values: list[float]) -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    buckets = (0.01, 0.1, 1, 10, 100)
    h1 = Histogram("h", "h", buckets=buckets, registry=one)
    h2 = Histogram("h", "h", buckets=buckets, registry=many)
    for v in values:
        h1.observe(v)
    observe_many(h2, values)
    def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples
                if not s.name.endswith("_created")]

    assert samples(one) == samples(many)


def test_every_contract_metric_is_declared() -> None:
    text = generate_latest(PipelineMetrics().registry).decode()
    for name in ("fleet_readings_total", "fleet_dead_letters_total", "fleet_ingest_latency_seconds",
                 "fleet_batch_size", "fleet_consumer_lag", "fleet_alerts_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in text
