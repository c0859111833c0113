"""What an operator sees when something is wrong: the real ``fleet`` command, run as a
subprocess against the real services, ends every failure with one line on stderr and an
exit status (1 failed, 2 bad usage, 130 Ctrl-C), never a traceback.

Each family of commands meets each kind of trouble: a database that does not exist, an
empty database nobody migrated, a broker at a closed port, a metrics port taken, a Redis
that refuses, and a Ctrl-C while it runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from fleet_telemetry.core.settings import Settings
from tests.databases import create_database, drop_database, with_database
from tests.integration.streams import publish, worker_env

pytestmark = pytest.mark.integration

CLI = (sys.executable, "-m", "fleet_telemetry.cli")
INTERRUPTED = (130, -signal.SIGINT)
"""Exit status after a Ctrl-C: 130, or (when the signal lands while Python is shutting
down) death by SIGINT, which a shell reports as 130 too."""


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``fleet`` subprocess using ``settings``' services and names."""
    return worker_env(settings, **{
        "FLEET_COMMANDS_TOPIC": f"{settings.telemetry_topic}.commands",
        "FLEET_COMMANDS_DLQ_TOPIC": f"{settings.telemetry_topic}.commands.dlq",
        "FLEET_COMMANDS_GROUP": f"{settings.consumer_group}-commands",
        "FLEET_MAINTAIN_METRICS_PORT": "0", "FLEET_LOG_FORMAT": "json", **extra,
    })


def fleet(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's own line: the last one on stderr (log lines, JSON, come before it)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines, f"nothing on stderr (exit {result.returncode}); stdout: {result.stdout[-500:]}"
    assert not lines[-1].startswith("{"), result.stderr[-2000:]
    return lines[-1]


def only_line(result: subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one line."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# Commands of every family that need the database, each as it would be typed.
NEEDS_THE_DATABASE = {
    "vehicles list": ["vehicles", "list"],
    "drivers add": ["drivers", "add", "--name", "Ada"],
    "geofences list": ["geofences", "list"],
    "dashboard --refresh": ["dashboard", "--refresh"],
    "maintain": ["maintain"],
    "simulate": ["simulate", "--duration", "1", "--vehicles", "2", "--rate", "10"],
    "consume": ["consume", "--stop-when-idle", "2"],
    "commands consume": ["commands", "consume", "--stop-when-idle", "2"],
    "replay --direct": ["replay", "{file}", "--direct", "--rejects", "{rejects}"],
}


def typed(argv: list[str], folder: Path) -> list[str]:
    """``argv`` with ``{file}`` a small NDJSON file in ``folder`` and ``{rejects}`` beside it."""
    reading = {"vehicle_id": str(uuid.uuid4()), "time": datetime.now(timezone.utc).isoformat(), "lat": 1, "lon": 1}
    source = folder / "readings.ndjson"
    source.write_text(json.dumps(reading) + "\n")
    return [a.format(file=source, rejects=folder / "rejects.ndjson") for a in argv]


@pytest_asyncio.fixture
async def empty_database(base_settings: Settings) -> AsyncIterator[str]:
    """An empty database nobody migrated."""
    name = f"fleet_test_empty_{uuid.uuid4().hex[:8]}"
    try:
        yield await create_database(base_settings.database_url, name)
    finally:
        await drop_database(base_settings.database_url, name)


@pytest.mark.parametrize("argv", NEEDS_THE_DATABASE.values(), ids=NEEDS_THE_DATABASE.keys())
def test_a_database_that_does_not_exist_is_one_line_saying_so(settings: Settings, argv: list[str],
                                                              tmp_path: Path) -> None:
    name = f"fleet_nowhere_{uuid.uuid4().hex[:8]}"
    url = with_database(settings.database_url, name)
    result = fleet(*typed(argv, tmp_path), env=env_for(settings, FLEET_DATABASE_URL=url))
    assert result.returncode == 1, result.stderr[-2000:]
    line = last_line(result)
    assert f'database "{name}" does not exist' in line
    assert line.endswith("create it or run fleet migrate")
    assert "not answering" not in line  # it answered: the advice is fleet migrate, not fleet services up


@pytest.mark.parametrize("argv", NEEDS_THE_DATABASE.values(), ids=NEEDS_THE_DATABASE.keys())
def test_an_empty_database_is_one_line_saying_run_fleet_migrate(
    settings: Settings, empty_database: str, argv: list[str], tmp_path: Path
) -> None:
    result = fleet(*typed(argv, tmp_path), env=env_for(settings, FLEET_DATABASE_URL=empty_database))
    assert result.returncode == 1, result.stderr[-2000:]
    line = last_line(result)
    assert "is not migrated" in line and "does not exist" in line
    assert line.endswith("run fleet migrate")


@pytest.mark.parametrize("argv", [["vehicles", "list"], ["geofences", "list"], ["simulate", "--duration", "1"]],
                         ids=["vehicles", "geofences", "simulate"])
def test_postgresql_at_a_closed_port_is_one_line(settings: Settings, argv: list[str]) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/fleet"
    result = fleet(*argv, env=env_for(settings, FLEET_DATABASE_URL=url))
    assert result.returncode == 1
    line = only_line(result)
    assert f"PostgreSQL at {url} is not answering" in line and "FLEET_DATABASE_URL" in line


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that takes connections and never says a word."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield int(server.getsockname()[1])


@pytest.mark.parametrize("argv", [["vehicles", "list"], ["geofences", "list"]], ids=["vehicles", "geofences"])
def test_a_postgresql_that_never_answers_is_one_line(settings: Settings, silent_port: int, argv: list[str]) -> None:
    url = f"postgresql://postgres@127.0.0.1:{silent_port}/fleet"
    result = fleet(*argv, env=env_for(settings, FLEET_DATABASE_URL=url))
    assert result.returncode == 1
    assert f"PostgreSQL at {url} is not answering (TimeoutError)" in only_line(result)


@pytest.mark.parametrize("argv", [["vehicles", "list"], ["geofences", "list"], ["migrate"]],
                         ids=["vehicles", "geofences", "migrate"])
def test_ctrl_c_while_a_command_waits_for_postgresql_is_one_line_and_130(
    settings: Settings, silent_port: int, argv: list[str]
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{silent_port}/fleet"
    process = subprocess.Popen([*CLI, *argv], env=env_for(settings, FLEET_DATABASE_URL=url),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.5)  # started, and waiting inside asyncio.run for the server's answer
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode in INTERRUPTED, err
    assert err.strip() == f"fleet {argv[0]}: interrupted"


@pytest.mark.parametrize(("variables", "message"), [
    ({"FLEET_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "FLEET_KAFKA_SASL_MECHANISM": "KERBEROS5"},
     "fleet commands: invalid configuration FLEET_KAFKA_SASL_MECHANISM: Input should be"),
    ({"FLEET_KAFKA_SECURITY_PROTOCOL": "SSL", "FLEET_KAFKA_SSL_CAFILE": "/nowhere/ca.pem"},
     "fleet commands: invalid configuration FLEET_KAFKA_SSL_CAFILE: cannot load /nowhere/ca.pem"
     " (No such file or directory)"),
], ids=["sasl mechanism", "ca file"])
def test_a_misconfigured_kafka_client_is_one_line_and_2(settings: Settings, variables: dict[str, str],
                                                        message: str) -> None:
    result = fleet("commands", "send", "vehicle.register", "--data", "{}", env=env_for(settings, **variables))
    assert result.returncode == 2
    assert only_line(result).startswith(message)


@pytest.mark.parametrize("argv", [
    ["simulate", "--duration", "1", "--vehicles", "2", "--rate", "10"],
    ["commands", "send", "vehicle.register", "--data", "{}"],
], ids=["simulate", "commands send"])
def test_kafka_at_a_closed_port_is_one_line(settings: Settings, argv: list[str]) -> None:
    bootstrap = f"127.0.0.1:{closed_port()}"
    result = fleet(*argv, env=env_for(settings, FLEET_KAFKA_BOOTSTRAP=bootstrap))
    assert result.returncode == 1
    line = only_line(result)
    assert line.endswith(f"Kafka at {bootstrap} is not answering (KafkaConnectionError);"
                         " start it (fleet services up) or set FLEET_KAFKA_BOOTSTRAP")


@pytest.mark.parametrize("argv", [["consume"], ["commands", "consume"]], ids=["consume", "commands consume"])
def test_stop_when_idle_gives_up_on_a_broker_that_never_answers(settings: Settings, argv: list[str]) -> None:
    bootstrap = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = fleet(*argv, "--stop-when-idle", "2", env=env_for(settings, FLEET_KAFKA_BOOTSTRAP=bootstrap),
                   timeout=60)
    assert result.returncode == 1
    assert f"Kafka at {bootstrap} is not answering" in last_line(result)
    assert time.monotonic() - started < 30


def test_ctrl_c_while_the_broker_is_away_is_one_line_and_130(settings: Settings) -> None:
    bootstrap = f"127.0.0.1:{closed_port()}"
    process = subprocess.Popen([*CLI, "consume"], env=env_for(settings, FLEET_KAFKA_BOOTSTRAP=bootstrap),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        seen = ""
        assert process.stderr is not None
        while "kafka not reachable, retrying" not in seen and time.monotonic() < deadline:
            seen += process.stderr.readline()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode in INTERRUPTED, err[-2000:]
    assert "Traceback" not in seen + err
    assert err.strip().splitlines()[-1].endswith("; interrupted")


def test_a_metrics_port_taken_is_one_line_naming_the_address_and_setting(topics: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = fleet("consume", "--stop-when-idle", "2",
                       env=env_for(topics, FLEET_METRICS_PORT=str(port), FLEET_METRICS_ADDRESS="127.0.0.1"))
        maintain = fleet("maintain", "--every", "1h",
                         env=env_for(topics, FLEET_MAINTAIN_METRICS_PORT=str(port), FLEET_METRICS_ADDRESS="127.0.0.1"))
    assert result.returncode == 1
    line = last_line(result)
    assert f"cannot serve metrics on 127.0.0.1:{port} (Address already in use)" in line
    assert "FLEET_METRICS_PORT" in line and "FLEET_METRICS_ADDRESS" in line
    assert maintain.returncode == 1
    assert "FLEET_MAINTAIN_METRICS_PORT" in last_line(maintain)


def test_a_worker_process_whose_metrics_port_is_taken_says_so_and_the_run_fails(topics: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = fleet("consume", "--workers", "2", "--stop-when-idle", "2", timeout=120,
                       env=env_for(topics, FLEET_METRICS_PORT=str(port), FLEET_METRICS_ADDRESS="127.0.0.1"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert f"fleet consume (worker 0): cannot serve metrics on 127.0.0.1:{port} (Address already in use):" \
        " set FLEET_METRICS_PORT to a free port (0 turns the endpoint off) or FLEET_METRICS_ADDRESS" in lines
    assert lines[-1].startswith("consume: stored 0 readings")  # worker 1 ran and stopped once idle


def test_a_redis_that_refuses_is_one_line(settings: Settings) -> None:
    url = settings.redis_url.rsplit("/", 1)[0] + "/999"
    result = fleet("dashboard", env=env_for(settings, FLEET_REDIS_URL=url))
    assert result.returncode == 1
    assert only_line(result) == f"fleet dashboard: Redis at {url} refused: DB index is out of range"


def test_commands_do_not_announce_the_broker_s_producer_mode(settings: Settings) -> None:
    result = fleet("commands", "send", "vehicle.register", "--data", "{}", "--json",
                   env=env_for(settings, FLEET_LOG_LEVEL="info"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the idempotent-producer notice is a debug line now
    assert set(json.loads(result.stdout)) == {"command_id", "topic"}


# --- Ctrl-C and the summaries of the long-running commands ----------------------------------------


def readings(vehicles: list[uuid.UUID], n: int) -> list[tuple[bytes, object]]:
    start = datetime.now(timezone.utc) - timedelta(minutes=30)
    return [(str(v).encode(), {"vehicle_id": str(v), "time": (start + timedelta(seconds=i)).isoformat(),
                               "lat": 48.0, "lon": 11.0}) for i in range(n) for v in vehicles]


async def run_until(env: dict[str, str], argv: list[str], ready: str, *, group: bool = False,
                    timeout: float = 60) -> tuple[int, str, str]:
    """Starts ``fleet ARGV``, waits for a stderr line containing ``ready``, sends SIGINT
    (to the whole process group with ``group``, as a terminal does) and returns the
    exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(*CLI, *argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE, start_new_session=group)
    assert process.stderr is not None and process.stdout is not None
    err = ""
    try:
        async with asyncio.timeout(timeout):
            while ready not in err:
                line = await process.stderr.readline()
                if not line:
                    break
                err += line.decode()
            if group:
                os.killpg(process.pid, signal.SIGINT)
            else:
                process.send_signal(signal.SIGINT)
            out, rest = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return int(process.returncode or 0), out.decode(), err + rest.decode()


async def test_ctrl_c_stops_fleet_consume_cleanly_with_a_summary_and_130(topics, producer, make_vehicles) -> None:
    vehicles = await make_vehicles(2)
    await publish(producer, topics.telemetry_topic, readings(vehicles, 5))
    status, _, err = await run_until(env_for(topics), ["consume"], "partitions assigned")
    assert status in INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("consume: stored ") and summary.endswith("; interrupted")


async def test_ctrl_c_at_the_terminal_stops_every_worker_process(topics) -> None:
    status, out, err = await run_until(env_for(topics), ["consume", "--workers", "2", "--json"],
                                       "partitions assigned", group=True)
    assert status in INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    summary = json.loads(out)
    assert summary["workers"] == 2 and summary["interrupted"] is True and summary["exit_status"] == 130


async def test_consume_ends_with_what_it_stored_duplicates_and_dead_letters(topics, producer, make_vehicles) -> None:
    vehicles = await make_vehicles(2)
    await publish(producer, topics.telemetry_topic, [*readings(vehicles, 3), (b"x", b"not json")])
    text = await asyncio.to_thread(fleet, "consume", "--stop-when-idle", "2", env=env_for(topics), timeout=120)
    assert text.returncode == 0, text.stderr[-2000:]
    line = last_line(text)
    assert line.startswith("consume: stored 6 readings, 0 duplicates, dead letters: malformed_json 1; ")

    other_group = env_for(topics, FLEET_CONSUMER_GROUP=topics.consumer_group + "-again")
    again = await asyncio.to_thread(fleet, "consume", "--stop-when-idle", "2", "--json", env=other_group,
                                    timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout)
    assert (summary["stored"], summary["duplicates"], summary["dead_letters_by_reason"]) == \
        (0, 6, {"malformed_json": 1})
    assert summary["workers"] == 1 and summary["seconds"] > 0


async def test_simulate_json_summary(topics, db) -> None:
    result = await asyncio.to_thread(fleet, "simulate", "--vehicles", "2", "--rate", "20", "--duration", "1",
                                     "--json", env=env_for(topics))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["sent"] > 0 and summary["vehicles"] == 2 and summary["topic"] == topics.telemetry_topic
    assert summary["interrupted"] is False
    assert "simulate: sent" not in result.stderr


async def test_ctrl_c_stops_fleet_simulate_with_its_summary_and_130(topics, db) -> None:
    process = await asyncio.create_subprocess_exec(*CLI, "simulate", "--vehicles", "2", "--rate", "20",
                                                   env=env_for(topics), stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(4)  # registered, topics made, publishing
        process.send_signal(signal.SIGINT)
        _, raw = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    err = raw.decode()
    assert process.returncode in INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("; interrupted")


@pytest_asyncio.fixture
async def migrated_database(base_settings: Settings) -> AsyncIterator[str]:
    """A database of this test's own, migrated: its partitions span 31 days back."""
    name = f"fleet_test_dry_{uuid.uuid4().hex[:8]}"
    try:
        yield await create_database(base_settings.database_url, name, migrate=True)
    finally:
        await drop_database(base_settings.database_url, name)


async def test_ctrl_c_stops_fleet_maintain_every_with_130(settings: Settings, migrated_database: str) -> None:
    status, _, err = await run_until(env_for(settings, FLEET_DATABASE_URL=migrated_database),
                                     ["maintain", "--every", "1h"], "maintenance pass")
    assert status in INTERRUPTED, err[-2000:]
    assert "Traceback" not in err


# --- maintain --dry-run ----------------------------------------------------------------------------


async def test_maintain_dry_run_lists_the_partitions_it_would_drop_and_changes_nothing(
    settings: Settings, migrated_database: str
) -> None:
    state = ("SELECT (SELECT array_agg(relname ORDER BY relname) FROM pg_class WHERE relname LIKE 'vehicle_telemetry_p%'),"
             " (SELECT row_to_json(l)::text FROM telemetry_lifecycle l)")
    conn = await asyncpg.connect(migrated_database)
    try:
        before = tuple(await conn.fetchrow(state))
        old = datetime.now(timezone.utc).date() - timedelta(days=31)
        assert f"vehicle_telemetry_p{old:%Y%m%d}" in before[0]
        result = await asyncio.to_thread(fleet, "maintain", "--dry-run",
                                         env=env_for(settings, FLEET_DATABASE_URL=migrated_database))
        after = tuple(await conn.fetchrow(state))
    finally:
        await conn.close()
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert f"would drop partition vehicle_telemetry_p{old:%Y%m%d} (past the raw retention)" in lines
    assert lines[-1] == "dry run: nothing was changed"
    assert after == before

