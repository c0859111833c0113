"""Whether PostgreSQL, Redis, the broker and the object storage answer at an address, and
waiting until they do.

A probe never raises for a service that is down: it returns what it found, with the
failure kept so that an error can name its class.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.deploy.stack.addresses import first_line, scrub
from fleet_telemetry.schema.migrate import with_database

PROBE_TIMEOUT_SECONDS = 3.0

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Probe:
    answers: bool
    error: str = ""
    """One line: why nothing answers, or why what answers cannot be used."""
    failure: BaseException | None = dataclasses.field(default=None, compare=False, repr=False)
    """The exception behind ``error``, if any."""

    def failure_or_error(self) -> BaseException:
        """The failure to name in an error message (a ConnectionError if none was kept)."""
        return self.failure if self.failure is not None else ConnectionError(self.error)


@dataclasses.dataclass(frozen=True)
class PostgresProbe(Probe):
    server_version_num: int | None = None
    postgis: str | None = None
    """The PostGIS version the server can install with CREATE EXTENSION, if any."""
    database_exists: bool = False


def _not_answering(exc: BaseException, text: str) -> Probe:
    return Probe(answers=False, error=first_line(text) or type(exc).__name__, failure=exc)


async def probe_postgres(url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> PostgresProbe:
    """Connects to ``url`` (or to its server's ``postgres`` database when ``url``'s
    database does not exist yet) and asks for the server version and PostGIS."""
    import asyncpg

    not_answering = (
        OSError,
        asyncio.TimeoutError,
        asyncpg.CannotConnectNowError,
        asyncpg.ConnectionDoesNotExistError,
    )
    database_exists = True
    try:
        try:
            conn = await asyncpg.connect(url, timeout=timeout)
        except asyncpg.InvalidCatalogNameError:
            database_exists = False
            conn = await asyncpg.connect(with_database(url, "postgres"), timeout=timeout)
    except not_answering as exc:
        message = first_line(scrub(str(exc), url)) or type(exc).__name__
        return PostgresProbe(answers=False, error=message, failure=exc)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = first_line(scrub(str(exc), url))
        return PostgresProbe(answers=True, error=f"refused the connection: {message}", failure=exc)
    try:
        version = await conn.fetchval("SELECT current_setting('server_version_num')::int")
        postgis = await conn.fetchval(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'postgis'"
        )
    finally:
        await conn.close()
    return PostgresProbe(
        answers=True,
        server_version_num=version,
        postgis=postgis,
        database_exists=database_exists,
    )


async def probe_redis(url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> Probe:
    """A PING at ``url``."""
    from redis.exceptions import AuthenticationError, RedisError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from fleet_telemetry.core.redis_client import connect_redis

    client = connect_redis(url, timeout=timeout)
    try:
        await client.ping()
    except AuthenticationError as exc:
        return Probe(answers=True, error=f"refused the login: {first_line(str(exc))}", failure=exc)
    except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError) as exc:
        return _not_answering(exc, str(exc))
    except RedisError as exc:
        return Probe(answers=True, error=f"refused PING: {first_line(str(exc))}", failure=exc)
    finally:
        await client.aclose()
    return Probe(answers=True)


@contextlib.contextmanager
def _quiet_kafka_client() -> Iterator[None]:
    """aiokafka logs every refused connection; a probe reports it once, itself."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def probe_broker(settings: Settings, timeout: float = PROBE_TIMEOUT_SECONDS) -> Probe:
    """A real metadata round trip (bootstrap + list topics), not just a TCP connect."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    with _quiet_kafka_client():
        admin = AIOKafkaAdminClient(
            **settings.kafka_client_options(),  # type: ignore[arg-type]
            client_id="fleet-services",
            request_timeout_ms=int(timeout * 1000),
        )
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.list_topics(), timeout)
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            return _not_answering(exc, str(exc))
        finally:
            await admin.close()
    return Probe(answers=True)


@dataclasses.dataclass(frozen=True)
class StorageProbe(Probe):
    bucket_exists: bool = False


async def probe_storage(settings: Settings, timeout: float = PROBE_TIMEOUT_SECONDS) -> StorageProbe:
    """A signed ``HeadBucket`` of ``FLEET_S3_BUCKET`` with the configured keys: answers
    (bucket there or not), refuses the keys, or does not answer (also while it answers
    5xx, as a SeaweedFS still starting does)."""
    from fleet_telemetry.core.s3_client import connect_s3, error_code, is_not_found, is_s3_transient

    try:
        async with connect_s3(settings, connect_timeout=timeout, attempts=1) as client:
            await asyncio.wait_for(client.head_bucket(Bucket=settings.s3_bucket), timeout)
    except Exception as exc:
        if is_not_found(exc):
            return StorageProbe(answers=True)
        if is_s3_transient(exc) or isinstance(exc, (OSError, asyncio.TimeoutError)):
            return StorageProbe(answers=False, error=first_line(str(exc)) or type(exc).__name__, failure=exc)
        if error_code(exc):
            return StorageProbe(answers=True, error=f"refused the keys ({error_code(exc)}); check"
                                " FLEET_S3_ACCESS_KEY and FLEET_S3_SECRET_KEY", failure=exc)
        raise
    return StorageProbe(answers=True, bucket_exists=True)


async def create_bucket(settings: Settings) -> None:
    """Creates ``FLEET_S3_BUCKET`` (nothing happens when this user has it already)."""
    from fleet_telemetry.core.s3_client import connect_s3, error_code

    async with connect_s3(settings) as client:
        try:
            await client.create_bucket(Bucket=settings.s3_bucket)
        except Exception as exc:
            if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    ready: Callable[[T], bool],
    timeout: float,
    *,
    still_running: Callable[[], bool] = lambda: True,
    interval: float = 0.5,
) -> T:
    """Probes every ``interval`` seconds until ``ready``, until ``timeout`` seconds have
    passed or until ``still_running`` says the process waited for has died; returns the
    last probe either way. The one polling loop of the stack manager."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if ready(result) or time.monotonic() >= deadline or not still_running():
            return result
        await asyncio.sleep(interval)
