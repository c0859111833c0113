"""``fleet migrate`` against the real PostgreSQL: fresh databases, re-runs, tampering, failures.

Each test works in a database of its own (created by the code under test, dropped here).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest
import pytest_asyncio

from fleet_telemetry.cli.main import main
from fleet_telemetry.core.errors import FleetError
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.schema import migrate
from fleet_telemetry.schema.migrate import Migration, apply_migrations, load_migrations
from tests.databases import drop_database, with_database

pytestmark = pytest.mark.integration

ALL_VERSIONS = [migration.version for migration in load_migrations()]


@pytest_asyncio.fixture
async def fresh_url(base_settings: Settings) -> AsyncIterator[str]:
    """The URL of a database that does not exist yet; dropped after the test."""
    name = f"fleet_migrate_{uuid.uuid4().hex[:10]}"
    yield with_database(base_settings.database_url, name)
    await drop_database(base_settings.database_url, name)


@pytest.fixture
def fresh_url_sync(base_settings: Settings) -> Iterator[str]:
    """Like ``fresh_url`` for tests that run the CLI (which starts its own event loop)."""
    name = f"fleet_migrate_{uuid.uuid4().hex[:10]}"
    yield with_database(base_settings.database_url, name)
    asyncio.run(drop_database(base_settings.database_url, name))


async def test_creates_the_database_applies_everything_then_is_a_no_op(fresh_url: str) -> None:
    announced: list[str] = []

    applied = await apply_migrations(fresh_url, on_applied=announced.append)

    assert applied == ALL_VERSIONS
    assert announced == ALL_VERSIONS
    assert await apply_migrations(fresh_url) == []
    conn = await asyncpg.connect(fresh_url)
    try:
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [(r["version"], r["checksum"]) for r in rows] == [
        (m.version, m.checksum) for m in load_migrations()
    ]


async def test_concurrent_runs_apply_each_migration_once(fresh_url: str, base_settings: Settings) -> None:
    # The database must exist before two runs race (creating it is not what is tested).
    admin = await asyncpg.connect(with_database(base_settings.database_url, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{urlsplit(fresh_url).path.lstrip("/")}"')
    finally:
        await admin.close()

    first, second = await asyncio.gather(apply_migrations(fresh_url), apply_migrations(fresh_url))

    assert sorted([first, second]) == [[], ALL_VERSIONS]


async def test_an_edited_applied_migration_is_refused(fresh_url: str) -> None:
    await apply_migrations(fresh_url)
    conn = await asyncpg.connect(fresh_url)
    try:
        await conn.execute(
            "UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = $1",
            ALL_VERSIONS[1],
        )
    finally:
        await conn.close()

    with pytest.raises(FleetError) as caught:
        await apply_migrations(fresh_url)

    message = str(caught.value)
    assert f"{ALL_VERSIONS[1]}.sql" in message
    assert "append-only" in message
    assert "new numbered file" in message


async def test_a_server_without_postgis_gets_the_install_command(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: the first migration asks for an extension the server does not have, and
    # the availability check reports PostGIS missing, as on a server without the package.
    sql = "CREATE EXTENSION fleet_no_such_extension"
    monkeypatch.setattr(
        migrate,
        "load_migrations",
        lambda: [Migration("0001_extensions", "0001_extensions.sql", sql, "0" * 64)],
    )

    async def postgis_missing(conn: asyncpg.Connection) -> list[str]:
        return ["postgis"]

    monkeypatch.setattr(migrate, "_missing_extensions", postgis_missing)

    with pytest.raises(FleetError) as caught:
        await apply_migrations(fresh_url)

    probe = await asyncpg.connect(fresh_url)
    try:
        major = int(await probe.fetchval("SHOW server_version_num")) // 10000
        ledger = await probe.fetchval("SELECT count(*) FROM schema_migrations")
    finally:
        await probe.close()
    assert "PostGIS" in str(caught.value)
    assert f"apt-get install postgresql-{major}-postgis-3" in str(caught.value)
    assert ledger == 0


def test_cli_migrate_prints_applied_versions(
    fresh_url_sync: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEET_DATABASE_URL", fresh_url_sync)

    assert main(["migrate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ALL_VERSIONS

    assert main(["migrate"]) == 0
    assert capsys.readouterr().out.strip() == "schema is up to date"

    assert main(["migrate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_migrate_against_an_unreachable_server_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEET_DATABASE_URL", "postgresql://fleet:s3cret@127.0.0.1:1/fleet")

    assert main(["migrate"]) == 1

    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "PostgreSQL" in lines[0]
    assert "postgresql://fleet:***@127.0.0.1:1/fleet" in lines[0]
    assert "fleet services up" in lines[0]
    assert "s3cret" not in captured.err + captured.out
