"""Applying the numbered SQL files in ``schema/migrations`` in order (``fleet migrate``).

Rules (schema/README.md, "Migrations"): files are named ``NNNN_what.sql`` and applied in
number order, each in a transaction of its own, and recorded with the SHA-256 of their
bytes in ``schema_migrations``. Migrations are append-only: a file already applied must
never change; a change is a new file. A session-level advisory lock serialises
concurrent runs, so two ``fleet migrate`` started at once apply each file exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
import structlog

from fleet_telemetry.core.errors import FleetError, UsageError, unavailable
from fleet_telemetry.core.settings import mask_url

log = structlog.get_logger(__name__)

# Key of the session-level advisory lock held for a whole run ("fleetmig" in ASCII).
ADVISORY_LOCK_KEY = 0x666C6565746D6967
# Extensions the migrations create; checked when a CREATE EXTENSION fails.
REQUIRED_EXTENSIONS = ("postgis", "btree_gist", "uuid-ossp")
CONNECT_TIMEOUT_SECONDS = 10.0

_FILE_NAME = re.compile(r"^(?P<number>\d{4})_[a-z0-9_]+\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    """One migration file: ``version`` is the file name without ``.sql``."""

    version: str
    filename: str
    sql: str
    checksum: str


def load_migrations() -> list[Migration]:
    """The packaged migration files, in the order they apply.

    Raises :class:`FleetError` if a file is misnamed or two files share a number, which
    is a packaging mistake that must not reach a database.
    """
    folder = resources.files("fleet_telemetry.schema").joinpath("migrations")
    migrations: list[Migration] = []
    numbers: dict[str, str] = {}
    for entry in folder.iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(name)
        if match is None:
            raise FleetError(
                f"migration file {name} is misnamed: expected NNNN_lower_case_words.sql"
            )
        number = match["number"]
        if number in numbers:
            raise FleetError(f"migration files {numbers[number]} and {name} share number {number}")
        numbers[number] = name
        data = entry.read_bytes()
        migrations.append(
            Migration(
                version=name.removesuffix(".sql"),
                filename=name,
                sql=data.decode("utf-8"),
                checksum=hashlib.sha256(data).hexdigest(),
            )
        )
    return sorted(migrations, key=lambda migration: migration.version)


def postgis_install_hint(server_version_num: int) -> str:
    """The Debian/Ubuntu package command that installs PostGIS for this server version."""
    major = server_version_num // 10000
    return f"apt-get install postgresql-{major}-postgis-3"


async def apply_migrations(
    database_url: str, *, on_applied: Callable[[str], None] | None = None
) -> list[str]:
    """Applies every migration not yet recorded; returns the versions applied, in order.

    Creates the database first if it does not exist. Blocks while another run holds the
    migration lock. Each migration commits on its own, so a failure leaves the earlier
    ones applied and the failing one rolled back. ``on_applied`` is called with each
    version right after its commit. Re-running is a no-op that returns ``[]``.

    Raises :class:`ServiceUnavailable` if PostgreSQL cannot be reached, and
    :class:`FleetError` if an applied file has changed, PostGIS is not installed, or a
    migration fails (with the file name and PostgreSQL's message).
    """
    migrations = load_migrations()
    conn = await _connect_creating_database(database_url)
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY):
            log.info("waiting for another fleet migrate to finish")
            await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
        try:
            return await _apply_locked(conn, migrations, database_url, on_applied)
        finally:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    except (OSError, asyncpg.exceptions.ConnectionDoesNotExistError) as exc:
        raise unavailable(
            "PostgreSQL",
            mask_url(database_url),
            exc,
            hint="the migration in progress was rolled back; run fleet migrate again",
        ) from None
    finally:
        if not conn.is_closed():
            await conn.close()


async def _apply_locked(
    conn: asyncpg.Connection,
    migrations: list[Migration],
    database_url: str,
    on_applied: Callable[[str], None] | None,
) -> list[str]:
    await conn.execute(_CREATE_LEDGER)
    recorded: dict[str, str] = {
        row["version"]: row["checksum"]
        for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
    }
    for migration in migrations:
        stored = recorded.get(migration.version)
        if stored is not None and stored != migration.checksum:
            raise FleetError(
                f"migration {migration.filename} was changed after it was applied to"
                f" {mask_url(database_url)}; migrations are append-only: restore the file"
                " and put the change in a new numbered file"
            )
    unknown = sorted(set(recorded) - {migration.version for migration in migrations})
    if unknown:
        log.warning("database has migrations this version does not know", versions=unknown)

    applied: list[str] = []
    for migration in migrations:
        if migration.version in recorded:
            continue
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
        except (
            asyncpg.exceptions.FeatureNotSupportedError,
            asyncpg.exceptions.UndefinedFileError,
        ) as exc:
            raise await _extension_failure(conn, migration, database_url, exc) from None
        except asyncpg.PostgresError as exc:
            raise _migration_failed(migration, exc) from None
        applied.append(migration.version)
        log.debug("migration applied", version=migration.version)
        if on_applied is not None:
            on_applied(migration.version)
    return applied


async def _extension_failure(
    conn: asyncpg.Connection, migration: Migration, database_url: str, exc: asyncpg.PostgresError
) -> FleetError:
    """Why a migration failed for want of a server extension: PostGIS (with the package
    to install), another extension, or the migration's own error."""
    missing = await _missing_extensions(conn)
    if "postgis" in missing:
        version_num = int(await conn.fetchval("SHOW server_version_num"))
        return FleetError(
            f"PostgreSQL at {mask_url(database_url)} has no PostGIS extension:"
            f" install it with `{postgis_install_hint(version_num)}`"
            " or run `fleet services up`, then run fleet migrate again"
        )
    if missing:
        return FleetError(
            f"PostgreSQL at {mask_url(database_url)} lacks the extension(s)"
            f" {', '.join(missing)} needed by {migration.filename}:"
            " install the server's contrib modules, then run fleet migrate again"
        )
    return _migration_failed(migration, exc)


async def _missing_extensions(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch(
        "SELECT wanted FROM unnest($1::text[]) AS wanted"
        " WHERE NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = wanted)",
        list(REQUIRED_EXTENSIONS),
    )
    return [row["wanted"] for row in rows]


def _migration_failed(migration: Migration, exc: asyncpg.PostgresError) -> FleetError:
    return FleetError(
        f"migration {migration.filename} failed and was rolled back:"
        f" {_first_line(exc)} (SQLSTATE {exc.sqlstate})"
    )


async def _connect_creating_database(database_url: str) -> asyncpg.Connection:
    try:
        return await _connect(database_url)
    except asyncpg.exceptions.InvalidCatalogNameError:
        pass
    if await create_database(database_url):
        log.info("database created", database=database_name(database_url))
    return await _connect(database_url)


def database_name(url: str) -> str:
    """The database a PostgreSQL URL names: its path, else its user, else ``postgres``."""
    parts = urlsplit(url)
    return unquote(parts.path.lstrip("/")) or unquote(parts.username or "") or "postgres"


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead, options kept."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def create_database(database_url: str) -> bool:
    """Creates the database ``database_url`` names, connecting to the server's
    ``postgres`` database. Returns False when it exists already (created meanwhile by a
    concurrent run). Raises :class:`ServiceUnavailable` if the server cannot be reached
    and :class:`FleetError` if this user may not create databases."""
    name = database_name(database_url)
    conn = await _connect(with_database(database_url, "postgres"))
    try:
        await conn.execute(f"CREATE DATABASE {quote_identifier(name)}")
        return True
    except asyncpg.exceptions.DuplicateDatabaseError:
        return False
    except asyncpg.exceptions.InsufficientPrivilegeError:
        raise FleetError(
            f"database {name} does not exist at {mask_url(database_url)} and this user may"
            f" not create it: ask an administrator to run CREATE DATABASE {name}"
        ) from None
    finally:
        await conn.close()


async def _connect(url: str) -> asyncpg.Connection:
    """Opens a connection, turning "cannot reach" into one readable error."""
    masked = mask_url(url)
    try:
        return await asyncpg.connect(
            url,
            timeout=CONNECT_TIMEOUT_SECONDS,
            server_settings={"application_name": "fleet migrate"},
        )
    except asyncpg.exceptions.InvalidCatalogNameError:
        raise
    except asyncpg.exceptions.InvalidAuthorizationSpecificationError as exc:
        raise FleetError(
            f"PostgreSQL at {masked} refused the login ({_first_line(exc)}):"
            " check the user and password in FLEET_DATABASE_URL"
        ) from None
    except asyncpg.exceptions.ClientConfigurationError as exc:
        raise UsageError(f"FLEET_DATABASE_URL {masked} is not usable: {_first_line(exc)}") from None
    except (
        OSError,
        asyncio.TimeoutError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.TooManyConnectionsError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
    ) as exc:
        raise unavailable("PostgreSQL", masked, exc) from None


def _first_line(exc: BaseException) -> str:
    """The first line of a server's error: a login, configuration or SQL error, which
    holds no password."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
