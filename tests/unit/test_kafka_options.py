"""The broker's security settings (FLEET_KAFKA_SECURITY_PROTOCOL, FLEET_KAFKA_SASL_*,
FLEET_KAFKA_SSL_CAFILE) reach every Kafka client the project builds.

No SASL or TLS broker runs here: each client's connection options are read where every
aiokafka client (consumer, producer, admin) hands them to its ``AIOKafkaClient``, and
the first connection attempt is refused there. Each entry point is driven as a command
would drive it.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import aiokafka.client
import pytest

from fleet_telemetry.consumers import worker as worker_module
from fleet_telemetry.consumers.worker import Worker, open_outputs
from fleet_telemetry.core.errors import ServiceUnavailable
from fleet_telemetry.core.metrics import PipelineMetrics
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.deploy.stack.probe import probe_broker
from fleet_telemetry.fleetops import commands
from fleet_telemetry.fleetops.commands import CommandConsumer
from fleet_telemetry.ingest.producer import TelemetryProducer, start_producer
from fleet_telemetry.ingest.topics import ensure_topics
from fleet_telemetry.replay.kafka_source import KafkaRange, KafkaSource
from tests.unit.test_stages import FakeDeadLetters, FakeSink

# A throwaway certificate authority (CN=fleet-test-ca): only loaded, never used to connect.
CA = """-----BEGIN CERTIFICATE-----
MIIBiDCCAS2gAwIBAgIUOMArlUy1y73ChiyhzgsumEQ6IG8wCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNZmxlZXQtdGVzdC1jYTAgFw0yNjExMjkxNjEzMjVaGA8yMTI2
MTEwNTE2MTMyNVowGDEWMBQGA1UEAwwNZmxlZXQtdGVzdC1jYTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABFM8fOgNojJSmTWwXk7d6QPY3cmY/1QGO1/VYjp5xaDk
eI9AAWQq0j7R27KvGFcClo48LYFja9+vXa1Djv3Nh2SjUzBRMB0GA1UdDgQWBBRY
aTbTjIwNy8KGF6sdwWFwOZ7uTjAfBgNVHSMEGDAWgBRYaTbTjIwNy8KGF6sdwWFw
OZ7uTjAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCx2VrzTiln
XAXHyGWw4zmnFKvdS1Gv+T3hrGv8N5KVlgIhAODMQ0l/R/DCfd9s2fnTJMjUTJ59
WE2MV+kVmDqt350C
-----END CERTIFICATE-----
"""


class Refused(Exception):
    """The first connection attempt of a recorded client (not transient: nothing retries it)."""


class Clients:
    """The connection options of every aiokafka client built, in order."""

    def __init__(self) -> None:
        self.built: list[dict[str, Any]] = []


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> Clients:
    seen = Clients()
    build = aiokafka.client.AIOKafkaClient.__init__

    def record(self: Any, **options: Any) -> None:
        seen.built.append(options)
        build(self, **options)

    async def refuse(self: Any) -> None:
        raise Refused()

    monkeypatch.setattr(aiokafka.client.AIOKafkaClient, "__init__", record)
    monkeypatch.setattr(aiokafka.client.AIOKafkaClient, "bootstrap", refuse)
    return seen


SECURED = {
    "sasl-ssl": {"FLEET_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "FLEET_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                 "FLEET_KAFKA_SASL_USERNAME": "fleet", "FLEET_KAFKA_SASL_PASSWORD": "s3cret"},
    "ssl": {"FLEET_KAFKA_SECURITY_PROTOCOL": "SSL"},
    "sasl-plaintext": {"FLEET_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "FLEET_KAFKA_SASL_USERNAME": "fleet",
                       "FLEET_KAFKA_SASL_PASSWORD": "s3cret"},
}


@pytest.fixture(params=list(SECURED))
def secured(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """Settings read from the environment as a deployment sets them."""
    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    cafile = tmp_path / "ca.pem"
    cafile.write_text(CA)
    env = {"FLEET_KAFKA_BOOTSTRAP": "broker.example:9093", "FLEET_KAFKA_SSL_CAFILE": str(cafile),
           "FLEET_METRICS_PORT": "0", **SECURED[request.param]}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def check(options: dict[str, Any], settings: Settings) -> None:
    """The options one client was built with carry the broker's address and security settings."""
    protocol = settings.kafka_security_protocol
    assert options["bootstrap_servers"] == "broker.example:9093"
    assert options["security_protocol"] == protocol
    if protocol.startswith("SASL_"):
        assert options["sasl_mechanism"] == (settings.kafka_sasl_mechanism or "PLAIN")
        assert options["sasl_plain_username"] == "fleet"
        assert options["sasl_plain_password"] == "s3cret"
    context = options["ssl_context"]
    if protocol.endswith("SSL"):
        assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
        subjects = [dict(field[0] for field in cert["subject"]) for cert in context.get_ca_certs()]
        assert {"commonName": "fleet-test-ca"} in subjects  # FLEET_KAFKA_SSL_CAFILE was loaded
    else:
        assert context is None


async def refused(attempt: Awaitable[Any]) -> None:
    """Runs an entry point up to the refused connection (as ``Refused`` itself or as the
    "not answering" error it becomes)."""
    with pytest.raises((Refused, ServiceUnavailable)):
        await asyncio.wait_for(attempt, 5)


class FakePool:
    async def close(self) -> None:
        pass


class FakeProducer:
    async def stop(self) -> None:
        pass


@contextlib.asynccontextmanager
async def fake_outputs(*args: Any) -> AsyncIterator[Any]:
    from fleet_telemetry.consumers.pipeline import Outputs

    yield Outputs(FakeSink(), FakeDeadLetters(), None, None)  # type: ignore[arg-type]


async def test_the_telemetry_workers_consumer(clients: Clients, secured: Settings,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "open_outputs", fake_outputs)
    await refused(Worker(secured).run())
    (consumer,) = clients.built
    check(consumer, secured)
    assert consumer["client_id"].startswith("aiokafka")


async def test_the_telemetry_workers_dead_letter_producer(clients: Clients, secured: Settings,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    async def pool(*args: Any, **kwargs: Any) -> FakePool:
        return FakePool()

    monkeypatch.setattr(worker_module, "create_pool", pool)

    async def open_them() -> None:
        async with open_outputs(secured, PipelineMetrics(), asyncio.Event()):
            pass

    await refused(open_them())
    (producer,) = clients.built
    check(producer, secured)


async def test_the_command_consumer_and_its_dead_letter_producer(clients: Clients, secured: Settings,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_database(*args: Any) -> None:
        pass

    monkeypatch.setattr(commands, "_check_schema", no_database)  # no PostgreSQL in a unit test
    await refused(CommandConsumer(secured).run())  # the producer connects first
    (producer,) = clients.built
    check(producer, secured)

    async def started(*args: Any, **kwargs: Any) -> FakeProducer:
        return FakeProducer()

    monkeypatch.setattr(commands, "start_producer", started)
    await refused(CommandConsumer(secured).run())
    consumer = clients.built[-1]
    assert len(clients.built) == 2
    check(consumer, secured)


async def test_the_gateway_producer_of_simulate_replay_and_the_command_sender(
        clients: Clients, secured: Settings) -> None:
    await refused(TelemetryProducer(secured).start())
    await refused(start_producer(secured))
    assert len(clients.built) == 2
    for producer in clients.built:
        check(producer, secured)


async def test_the_admin_clients_that_create_topics_and_probe_the_broker(clients: Clients, secured: Settings) -> None:
    await refused(ensure_topics(secured, ["t"]))
    with pytest.raises(Refused):
        await probe_broker(secured, timeout=5)
    assert len(clients.built) == 2
    for admin in clients.built:
        check(admin, secured)


async def test_the_kafka_replay_source(clients: Clients, secured: Settings) -> None:
    source = KafkaSource(secured, KafkaRange(topic="fleet.telemetry.v1"), chunk_records=100)

    async def read() -> None:
        async for _ in source.chunks(None):
            pass

    await refused(read())
    (consumer,) = clients.built
    check(consumer, secured)


async def test_the_consumer_lag_of_fleet_status(clients: Clients, secured: Settings) -> None:
    from fleet_telemetry.views.consumer_lag import group_lag

    await refused(group_lag(secured, "fleet.telemetry.v1", "fleet-telemetry", 0))
    (admin,) = clients.built
    check(admin, secured)


# Every module of the project that builds an aiokafka client; each is driven above.
BUILDERS = {"consumers/kafka_loop.py", "ingest/producer.py", "ingest/topics.py", "deploy/stack/probe.py",
            "fleet_telemetry/views/consumer_lag.py"}
CLIENT_CLASSES = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient", "AIOKafkaClient"}


def _builds_a_client(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in CLIENT_CLASSES:
                return True
    return False


def test_every_module_that_builds_a_kafka_client_is_one_driven_here() -> None:
    root = Path(__file__).resolve().parents[2]
    found = set()
    for folder, dirs, files in os.walk(root):  # the package's linked folders are not followed
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"bench", "tests", "node_modules"}]
        for name in files:
            path = Path(folder, name)
            if name.endswith(".py") and _builds_a_client(path):
                found.add(str(path.relative_to(root)))
    assert found == BUILDERS


def test_without_security_settings_clients_connect_in_plaintext() -> None:
    options = Settings(_env_file=None, kafka_security_protocol="PLAINTEXT").kafka_client_options()  # type: ignore[call-arg]
    assert options["security_protocol"] == "PLAINTEXT"
    assert not {"sasl_mechanism", "sasl_plain_username", "sasl_plain_password", "ssl_context"} & set(options)

