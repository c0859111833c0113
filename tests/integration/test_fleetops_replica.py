"""Read/write splitting (seed 4.3) against a real streaming replica.

The fixture makes a streaming replica of the test server on loopback: ``pg_basebackup
-R`` into a temporary folder, started with ``pg_ctl`` on a free port, as the ``postgres``
OS user when the tests run as root. Given ``FLEET_DATABASE_REPLICA_URLS`` naming a dead
replica and the live one, reads go to the live replica, writes to the primary; when the
replica stops, the primary serves the reads; when it is back, reads return to it.

Server requirement: the test server must accept replication connections from
127.0.0.1. If it does not and its ``pg_hba.conf`` is writable here, the fixture appends
``host replication all 127.0.0.1/32 trust`` (once; the line is marked with a comment and
left in place for the next run) and reloads the configuration. ``wal_level`` must be
``replica`` or ``logical`` and ``max_wal_senders`` above 0 (PostgreSQL's defaults);
changing those needs a restart, which the fixture never does: it skips and says so.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from fleet_telemetry.fleetops import queries, vehicles
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.core.settings import Settings

pytestmark = pytest.mark.integration

HBA_MARK = "# fleet tests (tests/integration/test_fleetops_replica.py): streaming replica on loopback"
HBA_LINE = "host    replication     all             127.0.0.1/32            trust"
SLOT_PREFIX = "fleet_test_replica_"
# Hot standby refuses to start unless these are at least the primary's values.
MIRRORED = ("max_connections", "max_worker_processes", "max_wal_senders", "max_prepared_transactions",
            "max_locks_per_transaction")


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    url: str
    port: int
    data: Path
    pg_ctl: list[str]

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.pg_ctl, "-D", str(self.data), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._ctl("-l", str(self.data.parent / "replica.log"), "-w", "-t", "120", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    def log_tail(self, lines: int = 15) -> str:
        log = self.data.parent / "replica.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


async def wait_until(predicate, what: str, timeout: float = 60.0,  # type: ignore[no-untyped-def]
                     replica: "Replica | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await predicate():
                return
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.2)
    detail = f"; replica log:\n{replica.log_tail()}" if replica is not None else ""
    raise AssertionError(f"timed out waiting for {what}{detail}")


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest_asyncio.fixture(scope="module")
async def replica(database_url: str) -> AsyncIterator[Replica]:
    parts = urlsplit(database_url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip(f"the replica is made on this machine; FLEET_DATABASE_URL names host {parts.hostname}")
    admin = await asyncpg.connect(database_url)
    try:
        config = {name: await admin.fetchval(f"SHOW {name}") for name in
                  ("wal_level", "max_wal_senders", "hba_file", "server_version_num", *MIRRORED)}
        superuser = await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    finally:
        await admin.close()
    if config["wal_level"] == "minimal" or int(config["max_wal_senders"]) == 0:
        pytest.skip(f"the test server has wal_level={config['wal_level']}, max_wal_senders="
                    f"{config['max_wal_senders']}: streaming needs replica/above 0, which takes a restart")
    if not superuser:
        pytest.skip("the test server's user is not a superuser; pg_basebackup needs replication rights")
    major = int(config["server_version_num"]) // 10000
    bindir = Path(f"/usr/lib/postgresql/{major}/bin")
    tools = {name: (bindir / name if (bindir / name).exists() else shutil.which(name))
             for name in ("pg_basebackup", "pg_ctl", "psql")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"PostgreSQL {major} client tools not found: {', '.join(missing)}")
    as_postgres: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:  # the server refuses to run as root
        owner = pwd.getpwnam("postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]

    user = parts.username or "postgres"
    port = parts.port or 5432
    probe = [*as_postgres, str(tools["psql"]), "-X", "-At", "-c", "IDENTIFY_SYSTEM",
             f"host=127.0.0.1 port={port} user={user} dbname=postgres replication=true"]
    if _run(probe).returncode != 0:
        hba = Path(config["hba_file"])
        if not os.access(hba, os.W_OK):
            pytest.skip(f"the test server refuses replication connections from 127.0.0.1 and {hba} is not"
                        f" writable here; add '{HBA_LINE}' to it and reload")
        if HBA_LINE not in hba.read_text():
            with hba.open("a") as f:
                f.write(f"\n{HBA_MARK}\n{HBA_LINE}\n")
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute("SELECT pg_reload_conf()")
        finally:
            await admin.close()
        deadline = time.monotonic() + 10
        while _run(probe).returncode != 0:
            if time.monotonic() > deadline:
                pytest.skip(f"replication connections are still refused after adding '{HBA_LINE}' to {hba}")
            await asyncio.sleep(0.2)

    # A physical slot keeps the primary's WAL until the replica has it: without one, a
    # checkpoint between the backup and the replica's start can remove WAL it still needs.
    # Slots of earlier runs that died before their teardown are dropped after an hour.
    slot = f"{SLOT_PREFIX}{int(time.time())}_{uuid.uuid4().hex[:6]}"
    await _drop_stale_slots(database_url)
    folder = Path(tempfile.mkdtemp(prefix="fleet-replica-"))
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data = folder / "data"
    replica_port = free_port()
    pg_ctl = [*as_postgres, str(tools["pg_ctl"])]
    node = Replica(with_port(database_url, replica_port), replica_port, data, pg_ctl)
    started = False
    try:
        backup = await asyncio.to_thread(_run, [
            *as_postgres, str(tools["pg_basebackup"]), "-h", "127.0.0.1", "-p", str(port), "-U", user,
            "-D", str(data), "-R", "-X", "stream", "-c", "fast", "--no-sync", "-C", "-S", slot])
        assert backup.returncode == 0, backup.stderr
        settings = [f"port = {replica_port}", "listen_addresses = '127.0.0.1'",
                    f"unix_socket_directories = '{folder}'", "hot_standby = on", "fsync = off",
                    "logging_collector = off", "ssl = off", "shared_buffers = 32MB"]
        settings += [f"{name} = {config[name]}" for name in MIRRORED]
        (data / "postgresql.conf").write_text("\n".join(settings) + "\n")
        (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        (data / "pg_ident.conf").write_text("")
        if owner is not None:
            for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
                os.chown(data / name, owner.pw_uid, owner.pw_gid)
        await asyncio.to_thread(node.start)
        started = True

        async def in_recovery() -> bool:
            conn = await asyncpg.connect(node.url, timeout=2)
            try:
                return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
            finally:
                await conn.close()

        await wait_until(in_recovery, "the replica to accept connections in recovery", replica=node)
        yield node
    finally:
        if started:
            await asyncio.to_thread(_run, [*pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], 120)
        shutil.rmtree(folder, ignore_errors=True)
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                                " WHERE slot_name = $1 AND NOT active", slot)
        finally:
            await admin.close()


async def _drop_stale_slots(database_url: str) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        for row in await admin.fetch("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE $1"
                                     " AND NOT active", SLOT_PREFIX + "%"):
            created = row["slot_name"][len(SLOT_PREFIX):].split("_")[0]
            if created.isdigit() and time.time() - int(created) > 3600:
                await admin.execute("SELECT pg_drop_replication_slot($1)", row["slot_name"])
    finally:
        await admin.close()


async def test_reads_go_to_the_replica_writes_to_the_primary_and_a_down_replica_is_skipped(
    database_url: str, replica: Replica
) -> None:
    dead = with_port(database_url, free_port())  # nothing listens there
    # As FLEET_DATABASE_REPLICA_URLS reads it: comma-separated text.
    replica_urls: Any = f"{dead}, {replica.url}"
    settings = Settings(_env_file=None, database_url=database_url,  # type: ignore[call-arg]
                        database_replica_urls=replica_urls, replica_retry_seconds=3600)
    assert settings.database_replica_urls == (dead, replica.url)
    vehicle_type = f"rr-{uuid.uuid4().hex[:8]}"
    start = datetime(2096, 1, 1, tzinfo=timezone.utc)
    window = (start, start + timedelta(hours=2))

    async with Database.from_settings(settings) as db:
        async with db.write() as conn:
            assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            vehicle = await vehicles.register_vehicle(conn, actor="test", data={
                "vin": uuid.uuid4().hex[:17].upper(), "license_plate": f"RR-{uuid.uuid4().hex[:8]}",
                "type": vehicle_type})

        async def replicated() -> bool:
            async with db.read() as conn:
                rows = await queries.available_vehicles(conn, *window, vehicle_type=vehicle_type)
            return [r["id"] for r in rows] == [vehicle["id"]]

        await wait_until(replicated, "the new vehicle to reach the replica", replica=replica)
        for _ in range(4):  # every read, whoever's turn it is, lands on the live replica
            async with db.read() as conn:
                assert await conn.fetchval("SELECT pg_is_in_recovery()")
                assert await conn.fetchval("SELECT inet_server_port()") == replica.port
                with pytest.raises(asyncpg.exceptions.ReadOnlySQLTransactionError):
                    await conn.execute("UPDATE vehicles SET year = 2000 WHERE id = $1", uuid.UUID(vehicle["id"]))
        assert db.replicas_down() == [dead]

        await asyncio.to_thread(replica.stop)
        async with db.read() as conn:  # the pooled replica connection is dead: skipped, primary serves
            assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            rows = await queries.available_vehicles(conn, *window, vehicle_type=vehicle_type)
        assert [r["id"] for r in rows] == [vehicle["id"]]
        assert replica.url in db.replicas_down()
        async with db.write() as conn:  # writes never depended on the replica
            await vehicles.update_vehicle(conn, actor="test", vehicle_id=uuid.UUID(vehicle["id"]),
                                          changes={"year": 2021})

        await asyncio.to_thread(replica.start)

    # A process started now (fresh skip list) reads from the replica again, once it is back.
    async with Database.from_settings(settings) as db:
        async def caught_up() -> bool:
            async with db.read() as conn:
                return bool(await conn.fetchval("SELECT pg_is_in_recovery()")) and await conn.fetchval(
                    "SELECT year FROM vehicles WHERE id = $1", uuid.UUID(vehicle["id"])) == 2021

        await wait_until(caught_up, "reads to be served by the restarted replica with the primary's write",
                         replica=replica)
