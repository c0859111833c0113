"""What an operator sees: the /metrics endpoint, and the command line's answers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from datetime import datetime, timezone

import pytest

from fleet_telemetry.core.metrics import serve
from fleet_telemetry.consumers.worker import Worker
from tests.integration.streams import publish

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_metrics_endpoint_passes_promtool_and_counts_the_stream(topics, producer, make_vehicles) -> None:
    (vid,) = await make_vehicles(1)
    now = datetime.now(timezone.utc).isoformat()
    await publish(producer, topics.telemetry_topic, [
        (str(vid).encode(), {"vehicle_id": str(vid), "time": now, "lat": 1.0, "lon": 1.0}),
        (b"x", b"not json"),
    ])
    worker = Worker(topics, stop_when_idle=2)
    port = free_port()
    serve(worker.metrics, port, addr="127.0.0.1")
    assert await worker.run() == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    assert 'fleet_readings_total{outcome="stored"} 1.0' in text
    assert 'fleet_readings_total{outcome="dead_lettered"} 1.0' in text
    assert 'fleet_dead_letters_total{reason="malformed_json"} 1.0' in text
    assert "fleet_ingest_latency_seconds_bucket" in text
    assert "fleet_batch_size_bucket" in text
    assert f'topic="{topics.telemetry_topic}"' in text.split("# TYPE fleet_consumer_lag gauge")[1].split("# HELP")[0]
    for name in ("fleet_copy_duration_seconds", "fleet_offset_commit_duration_seconds", "fleet_paused_partitions",
                 "fleet_retries_total", "fleet_status_updates_skipped_total"):
        assert name in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed to check the metrics format"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def fleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet_telemetry.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["consume", "--workers", "0"], "--workers must be 1 or more"),
        (["consume", "--workers", "two"], "invalid int value: 'two'"),
        (["simulate", "--bad-ratio", "1.5"], "--bad-ratio must be between 0 and 1"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
    ],
)
def test_bad_usage_gets_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = fleet(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_bad_configuration_gets_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    env = dict(os.environ, FLEET_METRICS_PORT="seventy")
    result = fleet("consume", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == "fleet consume: invalid configuration FLEET_METRICS_PORT: " \
        "Input should be a valid integer, unable to parse string as an integer"


def test_consume_against_an_unreachable_database_names_it_without_the_password() -> None:
    import os

    env = dict(os.environ, FLEET_DATABASE_URL=f"postgresql://fleet:s3cret-{uuid.uuid4().hex[:4]}@127.0.0.1:1/fleet",
               FLEET_METRICS_PORT="0")
    result = fleet("consume", env=env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "PostgreSQL at postgresql://fleet:***@127.0.0.1:1/fleet is not answering" in line
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://fleet:s3cret@127.0.0.1/fleet", "mysql://fleet:***@127.0.0.1/fleet is not a postgresql:// URL"),
        ("postgresql://fleet:s3cret@127.0.0.1:99999/fleet", "is not a valid URL"),
    ],
)
def test_a_malformed_database_url_gets_one_line_and_exit_2(url: str, message: str) -> None:
    import os

    result = fleet("consume", env=dict(os.environ, FLEET_DATABASE_URL=url))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fleet consume: invalid configuration FLEET_DATABASE_URL:")
    assert message in line
    assert "s3cret" not in result.stderr


def test_help_explains_every_command() -> None:
    result = fleet("--help")
    assert result.returncode == 0
    for command in ("services", "migrate", "consume", "simulate", "demo"):
        assert command in result.stdout
    consume = fleet("consume", "--help")
    assert "--workers" in consume.stdout and "SIGTERM" in consume.stdout
