"""The metric declarations, observe_many (exactly one observe per value), and the endpoint's address."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from pydantic import ValidationError

from fleet_telemetry.core.metrics import MaintainMetrics, PipelineMetrics, observe_many, serve
from fleet_telemetry.core.settings import Settings


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


def test_the_metrics_address_is_a_setting_that_defaults_to_every_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).metrics_address == "0.0.0.0"  # type: ignore[call-arg]
    monkeypatch.setenv("FLEET_METRICS_ADDRESS", "127.0.0.1")
    assert Settings(_env_file=None).metrics_address == "127.0.0.1"  # type: ignore[call-arg]
    for bad in ("", "not an address", "http://127.0.0.1"):
        monkeypatch.setenv("FLEET_METRICS_ADDRESS", bad)
        with pytest.raises(ValidationError):
            Settings(_env_file=None)  # type: ignore[call-arg]


def _answers(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as answer:
            return b"fleet_maintain_passes_total" in answer.read()
    except OSError:
        return False


def test_an_endpoint_served_on_one_address_answers_there_and_nowhere_else() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    server = serve(MaintainMetrics(), port, "127.0.0.2")
    assert server is not None
    try:
        assert _answers("127.0.0.2", port)
        assert not _answers("127.0.0.1", port)
    finally:
        server.shutdown()
        server.server_close()
    assert serve(MaintainMetrics(), 0, "127.0.0.2") is None
