"""What the fault soak runs on, set up for one run and removed afterwards.

- PostgreSQL: a private cluster the soak crashes and restarts (``private``), or a
  database of its own on ``FLEET_DATABASE_URL``'s server, reached by the workers through
  a proxy whose link the soak cuts (``proxy``); never a restart of that server.
- Redis: a private ``redis-server`` (``private``) or ``FLEET_REDIS_URL`` (``shared``),
  reached by the workers through a proxy the soak freezes (unresponsive) or cuts.
- The broker: ``FLEET_KAFKA_BOOTSTRAP`` (``shared``), which the soak does not restart, so
  that fault is left out with a note; or a private Tansu keeping its data in a private
  S3 (``private``), which the soak restarts.

The workers get the proxied addresses; the soak's own producer and checks talk to the
servers directly. Each run has its own database, topics, consumer group and vehicles.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from bench import databases, dataset
from bench.soak_proxy import LinkProxy
from bench.soak_servers import PrivateBroker, PrivatePostgres, PrivateRedis, postgres_bindir
from fleet_telemetry.consumers.status import status_key
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.topics import ensure_topics
from fleet_telemetry.schema.migrate import apply_migrations

Say = Callable[[str], None]


@dataclass(frozen=True)
class RigOptions:
    postgres: str = "auto"
    """``private``, ``proxy`` or ``auto`` (private when initdb and PostGIS are here)."""
    redis: str = "auto"
    """``private``, ``shared`` or ``auto`` (private when redis-server is here)."""
    redis_fault: str = "freeze"
    """``freeze`` (unresponsive) or ``cut`` (connections dropped, new ones refused)."""
    broker: str = "shared"
    """``shared`` (not restarted) or ``private`` (restarted)."""
    partitions: int = 4
    geofences: int = 300
    seed: int = 7
    keep: bool = False


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by 127.0.0.1:``port``, the rest kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"))


def _target(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


@dataclass
class Rig:
    """One run's servers, proxies, database and topics, and the faults it can cause."""

    tag: str
    folder: Path
    settings: Settings
    """The soak's own clients: its database, Redis and broker directly, its topics and group."""
    worker_env: dict[str, str] = field(default_factory=dict)
    conditions: dict[str, str] = field(default_factory=dict)
    """What each fault is here, in words (for the report)."""
    notes: list[str] = field(default_factory=list)
    postgres: PrivatePostgres | None = None
    postgres_proxy: LinkProxy | None = None
    redis_proxy: LinkProxy | None = None
    redis_fault: str = "freeze"
    redis_private: bool = False
    broker: PrivateBroker | None = None
    keep_folder: bool = False
    """Keep :attr:`folder` (the logs) after the run; set when the run failed."""

    @property
    def can_restart_broker(self) -> bool:
        return self.broker is not None

    async def postgres_outage(self, seconds: float) -> None:
        if self.postgres is not None:
            await self.postgres.crash()
            await asyncio.sleep(seconds)
            await self.postgres.up()
        else:
            assert self.postgres_proxy is not None
            await self.postgres_proxy.cut()
            await asyncio.sleep(seconds)
            await self.postgres_proxy.restore()

    async def redis_outage(self, seconds: float) -> None:
        assert self.redis_proxy is not None
        if self.redis_fault == "cut":
            await self.redis_proxy.cut()
            await asyncio.sleep(seconds)
            await self.redis_proxy.restore()
        else:
            self.redis_proxy.freeze()
            await asyncio.sleep(seconds)
            self.redis_proxy.thaw()

    async def broker_outage(self, seconds: float) -> None:
        assert self.broker is not None
        await self.broker.down()
        await asyncio.sleep(seconds)
        await self.broker.up()

    async def prepare(self, fleet: list[UUID], geofences: int, seed: int) -> None:
        """Registers the fleet and creates ``geofences`` active geofences around its cities."""
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            await dataset.register_fleet(conn, fleet)
            await dataset.create_geofences(conn, geofences, seed)
        finally:
            await conn.close()


async def _postgres(rig: Rig, base: Settings, options: RigOptions, stack: AsyncExitStack,
                    say: Say) -> tuple[str, str]:
    """Sets up PostgreSQL; returns (the soak's database URL, the workers' one)."""
    mode = options.postgres
    bindir = postgres_bindir()
    if mode == "auto":
        mode = "private" if bindir is not None else "proxy"
    name = f"fleet_soak_{rig.tag}"
    if mode == "private":
        if bindir is None:
            raise UsageError("--postgres private needs initdb and PostGIS under /usr/lib/postgresql")
        rig.postgres = PrivatePostgres(rig.folder, bindir)
        stack.push_async_callback(rig.postgres.close)
        say("PostgreSQL: starting a private cluster (initdb)")
        await rig.postgres.start()
        admin, url = rig.postgres.url(), rig.postgres.url(name)
        rig.conditions["postgres"] = "crash (pg_ctl stop -m immediate) and restart of the soak's own server"
        worker_url = url
    else:
        admin = databases.with_database(base.database_url, "postgres")
        url = databases.with_database(base.database_url, name)
        rig.postgres_proxy = LinkProxy(*_target(base.database_url, 5432))
        await rig.postgres_proxy.start()
        stack.push_async_callback(rig.postgres_proxy.close)
        if not options.keep:
            stack.push_async_callback(databases.drop, admin, name)
        rig.conditions["postgres"] = "proxy cut between the workers and FLEET_DATABASE_URL's server"
        worker_url = via(url, rig.postgres_proxy.port)
    await databases.create(admin, name)
    await apply_migrations(url)
    return url, worker_url


async def _redis(rig: Rig, base: Settings, mode: str, stack: AsyncExitStack) -> tuple[str, str]:
    """Sets up Redis; returns (the soak's URL, the workers' one through the proxy)."""
    binary = PrivateRedis.binary_path()
    if mode == "auto":
        mode = "private" if binary is not None else "shared"
    if mode == "private":
        if binary is None:
            raise UsageError("--redis private needs redis-server")
        server = PrivateRedis(rig.folder, binary)
        stack.push_async_callback(server.close)
        await server.start()
        url = server.url
        rig.redis_private = True
    else:
        url = base.redis_url
    rig.redis_proxy = LinkProxy(*_target(url, 6379))
    await rig.redis_proxy.start()
    stack.push_async_callback(rig.redis_proxy.close)
    what = "unresponsive (proxy holds every byte)" if rig.redis_fault == "freeze" else "proxy cut"
    rig.conditions["redis"] = f"{what}, {'a private redis-server' if mode == 'private' else 'FLEET_REDIS_URL'}"
    return url, via(url, rig.redis_proxy.port)


async def _broker(rig: Rig, base: Settings, mode: str, stack: AsyncExitStack, say: Say) -> str:
    """Sets up the broker; returns its bootstrap address."""
    binaries = PrivateBroker.binaries()
    if mode == "private":
        if binaries is None:
            raise UsageError("--broker private needs the Tansu binary (the 'stack' extra) and moto_server (moto[server])")
        rig.broker = PrivateBroker(rig.folder, *binaries)
        stack.push_async_callback(rig.broker.close)
        say("broker: starting a private Tansu with its data in a private S3 (moto_server)")
        await rig.broker.start()
        rig.conditions["broker"] = "restart (SIGTERM, then start) of the soak's own Tansu, data kept in S3"
        return rig.broker.bootstrap
    rig.conditions["broker"] = "left out: the soak does not restart FLEET_KAFKA_BOOTSTRAP's broker"
    rig.notes.append("broker restart left out: the soak does not restart FLEET_KAFKA_BOOTSTRAP's broker, and a "
                     "local Tansu keeps its topics in memory only (--broker private: see --help)")
    return base.kafka_bootstrap


async def _drop_topics(settings: Settings, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    try:
        await admin.start()
        await admin.delete_topics(topics)
    except Exception:  # noqa: BLE001 - best effort: some brokers refuse DeleteTopics
        pass
    finally:
        await admin.close()


async def _clear_statuses(redis_url: str, fleet: list[UUID]) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        if fleet:
            await client.delete(*[status_key(v) for v in fleet])
    finally:
        await client.aclose()


def _remove_unless_kept(rig: Rig, keep: bool, say: Say) -> None:
    if keep or rig.keep_folder:
        say(f"kept {rig.folder} (worker log, server logs)")
    else:
        shutil.rmtree(rig.folder, ignore_errors=True)


def _worker_env(rig: Rig, worker_db: str, worker_redis: str) -> dict[str, str]:
    """The environment of ``fleet consume``: the proxied addresses, the run's topics and group."""
    s = rig.settings
    env = {
        **os.environ, "FLEET_DATABASE_URL": worker_db, "FLEET_REDIS_URL": worker_redis,
        "FLEET_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "FLEET_TELEMETRY_TOPIC": s.telemetry_topic,
        "FLEET_DLQ_TOPIC": s.dlq_topic, "FLEET_CONSUMER_GROUP": s.consumer_group, "FLEET_METRICS_PORT": "0",
        "FLEET_LOG_FORMAT": "json", "FLEET_LOG_LEVEL": "warning",
    }
    if rig.broker is not None:
        env["FLEET_KAFKA_SECURITY_PROTOCOL"] = "PLAINTEXT"
    return env


@asynccontextmanager
async def open_rig(base: Settings, options: RigOptions, fleet: list[UUID], say: Say,
                   tag: str | None = None) -> AsyncIterator[Rig]:
    """Everything set up and the fleet registered; all removed on exit. The folder with
    the logs stays when ``options.keep``, when ``rig.keep_folder`` was set, or when the
    run raised."""
    tag = tag or uuid.uuid4().hex[:8]
    rig = Rig(tag, Path(tempfile.mkdtemp(prefix=f"fleet-soak-{tag}-")), base, redis_fault=options.redis_fault)
    completed = False
    async with AsyncExitStack() as stack:
        stack.callback(lambda: _remove_unless_kept(rig, options.keep or not completed, say))
        db_url, worker_db = await _postgres(rig, base, options, stack, say)
        redis_url, worker_redis = await _redis(rig, base, options.redis, stack)
        bootstrap = await _broker(rig, base, options.broker, stack, say)
        update: dict[str, Any] = {
            "database_url": db_url, "redis_url": redis_url, "kafka_bootstrap": bootstrap,
            "telemetry_topic": f"soak.telemetry.{tag}", "dlq_topic": f"soak.dlq.{tag}",
            "consumer_group": f"soak-{tag}", "metrics_port": 0,
        }
        if rig.broker is not None:
            update["kafka_security_protocol"] = "PLAINTEXT"
        rig.settings = s = base.model_copy(update=update)
        topics = [s.telemetry_topic, s.dlq_topic]
        await ensure_topics(s, topics, partitions=options.partitions)
        if rig.broker is None and not options.keep:
            stack.push_async_callback(_drop_topics, s, topics)
        if not rig.redis_private and not options.keep:
            stack.push_async_callback(_clear_statuses, redis_url, fleet)
        rig.worker_env = _worker_env(rig, worker_db, worker_redis)
        await rig.prepare(fleet, options.geofences, options.seed)
        yield rig
        completed = True
