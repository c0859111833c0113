"""The whole benchmark, phase by phase: dataset, contestants, latency, preload, codecs, report.

Every contestant gets a database of its own, created and migrated for it, and a
consumer group of its own on one pre-produced topic, so they all ingest the same bytes
into the same table definition. Databases, topics and the fleet's Redis statuses are
removed at the end unless ``keep`` is set.

The pipeline's runs on the empty table are sampled by py-spy when it is installed, and
each gets a per-stage breakdown of its CPU (:mod:`bench.breakdown`). The latency phase
is :mod:`bench.latency`, the codec probe :mod:`bench.compression`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from bench import breakdown, compression, databases, dataset, latency, report
from bench.databases import with_database
from bench.measure import (READY_LOG, BackendCpu, KafkaTarget, ProcessRun, free_ports, profile_path, py_spy,
                           run_contestant)
from fleet_telemetry.consumers.status import status_key
from fleet_telemetry.core.errors import ServiceUnavailable
from fleet_telemetry.ingest.producer import DEFAULT_COMPRESSION
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.topics import ensure_topics
from fleet_telemetry.schema.migrate import apply_migrations

CONTESTANTS = ("ceiling", "peer", "naive", "pipeline", "pipeline-arrays", "pipeline-x2")
PIPELINES = ("pipeline", "pipeline-arrays", "pipeline-x2")
DESCRIPTIONS = {
    "ceiling": "asyncpg binary COPY of the rows, in memory, straight into vehicle_telemetry",
    "peer": "Quix Streams application with its PostgreSQL sink",
    "naive": "aiokafka + asyncpg executemany per fetched batch, commit after each",
    "pipeline": "fleet consume: validation, COPY, Redis status",
    "pipeline-arrays": f"fleet consume, the readings sent as JSON arrays of {dataset.GATEWAY_ARRAY} per message"
                       " keyed by the gateway: validation, COPY, Redis status",
    "pipeline-x2": "fleet consume --workers 2: validation, COPY, Redis status",
}
BREAKDOWN_RATE = 250
"""py-spy samples per second for the per-stage breakdown."""


@dataclass
class Options:
    readings: int = 1_000_000
    vehicles: int = 5_000
    partitions: int = 8
    seed: int = 7
    span_hours: float = 2.0
    contestants: tuple[str, ...] = CONTESTANTS
    workers: int = 1
    idle_seconds: float = 3.0
    geofences: str = "on"
    geofence_count: int = 1000
    latency_seconds: float = 30.0
    latency_warmup: float = 5.0
    latency_rate: float | None = None
    preload: int = 2_000_000
    ceiling_batch: int | None = None
    timeout: float | None = None
    pipeline_env: dict[str, str] = field(default_factory=dict)
    profile: str | None = None
    breakdown: bool = True
    codecs: tuple[str, ...] = ("gzip", "lz4", "zstd", "none")
    keep: bool = False


def peer_missing() -> str | None:
    """Why the Quix Streams peer cannot run here, or ``None`` if it can."""
    for module, package in (("quixstreams", "quixstreams"), ("psycopg2", "psycopg2-binary")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install '.[bench]')"
    return None


def conditions(pg_version: str) -> dict[str, Any]:
    """The machine the numbers come from."""
    model = "?"
    memory_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu_model": model, "cpus": os.cpu_count(), "memory_gb": memory_gb,
        "os": platform.platform(), "python": platform.python_version(), "postgresql": pg_version,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


class Bench:
    """One invocation of the benchmark. :meth:`run` returns the report."""

    def __init__(self, settings: Settings, options: Options, progress: Callable[[str], None]) -> None:
        self.s = settings
        self.o = options
        self.say = progress
        self.tag = uuid.uuid4().hex[:8]
        self.databases: list[str] = []
        self.topics: list[str] = []
        self.admin_url = with_database(settings.database_url, "postgres")
        self.spec = dataset.DatasetSpec(
            readings=options.readings, vehicles=options.vehicles, seed=options.seed,
            end=dataset.window_ending_now(timedelta(hours=options.span_hours)),
            span=timedelta(hours=options.span_hours),
        )
        self.fleet = dataset.fleet_ids(self.spec)
        self.geofences_on = options.geofences != "off"
        self.timeout = options.timeout or 120 + options.readings / 500
        self.workdir = Path(tempfile.gettempdir())

    # --- resources ----------------------------------------------------------

    async def preflight(self) -> str:
        """Checks PostgreSQL, Redis and the broker answer; returns PostgreSQL's version.

        Raises :class:`ServiceUnavailable` naming the one that does not.
        """
        s = self.s
        hint = "start the local stack (fleet services up) or set"
        try:
            conn = await asyncpg.connect(self.admin_url, timeout=10)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
            raise ServiceUnavailable(f"PostgreSQL at {s.database_url_masked} is not answering"
                                     f" ({type(exc).__name__}); {hint} FLEET_DATABASE_URL") from None
        try:
            version = "PostgreSQL " + str(await conn.fetchval("SHOW server_version")).split()[0]
        finally:
            await conn.close()
        client = aioredis.Redis.from_url(s.redis_url, socket_connect_timeout=5)
        try:
            await client.ping()
        except (OSError, RedisError) as exc:
            raise ServiceUnavailable(f"Redis at {s.redis_url_masked} is not answering"
                                     f" ({type(exc).__name__}); {hint} FLEET_REDIS_URL") from None
        finally:
            await client.aclose()
        admin = AIOKafkaAdminClient(**s.kafka_client_options())  # type: ignore[arg-type]
        quiet = logging.getLogger("aiokafka")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # the one line below says it better
        try:
            await admin.start()
        except KafkaError as exc:
            raise ServiceUnavailable(f"the Kafka broker at {s.kafka_bootstrap} is not answering"
                                     f" ({type(exc).__name__}); {hint} FLEET_KAFKA_BOOTSTRAP") from None
        finally:
            quiet.setLevel(level)
            await admin.close()
        return version

    async def fresh_database(self, label: str, *, geofences: bool = False) -> str:
        """A new database named for this run, migrated, with the fleet registered."""
        name = f"fleet_bench_{self.tag}_{label}"
        url = with_database(self.s.database_url, name)
        self.databases.append(name)
        await apply_migrations(url)
        conn = await asyncpg.connect(url)
        try:
            await dataset.register_fleet(conn, self.fleet)
            if geofences:
                await dataset.create_geofences(conn, self.o.geofence_count, self.o.seed)
        finally:
            await conn.close()
        return url

    async def copy_database(self, source_url: str, label: str) -> str:
        """A file-level copy of ``source_url``'s database (nobody may be connected to it)."""
        name = f"fleet_bench_{self.tag}_{label}"
        source = unquote(urlsplit(source_url).path.lstrip("/"))
        await databases.create(self.admin_url, name, template=source, strategy="FILE_COPY")
        self.databases.append(name)
        return with_database(self.s.database_url, name)

    async def count_rows(self, url: str) -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM vehicle_telemetry"))
        finally:
            await conn.close()

    async def new_topic(self, label: str) -> str:
        name = f"bench.{self.tag}.{label}"
        await ensure_topics(self.s, [name], partitions=self.o.partitions)
        self.topics.append(name)
        return name

    async def clear_statuses(self) -> None:
        """Removes the fleet's Redis statuses, so every pipeline run does the same Redis work."""
        client = aioredis.Redis.from_url(self.s.redis_url)
        try:
            keys = [status_key(vid) for vid in self.fleet]
            for start in range(0, len(keys), 1000):
                await client.delete(*keys[start:start + 1000])
        finally:
            await client.aclose()

    async def cleanup(self) -> None:
        if self.o.keep:
            self.say(f"kept databases {', '.join(self.databases)} and topics {', '.join(self.topics)}")
            return
        await databases.drop(self.admin_url, *self.databases)
        try:
            await self.clear_statuses()
        except Exception as exc:  # best effort: the statuses expire anyway
            self.say(f"could not clear Redis statuses: {type(exc).__name__}")
        admin = AIOKafkaAdminClient(**self.s.kafka_client_options())  # type: ignore[arg-type]
        try:
            await admin.start()
            await admin.delete_topics(self.topics)
        except Exception as exc:  # best effort: some brokers refuse DeleteTopics
            self.say(f"topics not deleted ({type(exc).__name__}): {', '.join(self.topics)}")
        finally:
            await admin.close()

    # --- contestants ------------------------------------------------------------

    def child_env(self, **overrides: str) -> dict[str, str]:
        """The environment of a contestant process: ours, with this checkout importable first."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env.update(overrides)
        return env

    def pipeline_command(self, workers: int | None = None) -> list[str]:
        return [sys.executable, "-m", "fleet_telemetry.cli", "consume",
                "--stop-when-idle", str(self.o.idle_seconds), "--workers", str(workers or self.o.workers)]

    def pipeline_env(self, url: str, topic: str, group: str, port: int) -> dict[str, str]:
        return self.child_env(
            FLEET_DATABASE_URL=url, FLEET_REDIS_URL=self.s.redis_url, FLEET_KAFKA_BOOTSTRAP=self.s.kafka_bootstrap,
            FLEET_TELEMETRY_TOPIC=topic, FLEET_DLQ_TOPIC=topic + ".dlq", FLEET_CONSUMER_GROUP=group,
            FLEET_METRICS_PORT=str(port), FLEET_LOG_FORMAT="json", FLEET_LOG_LEVEL="info",
            FLEET_RULES_ENABLED="true" if self.geofences_on else "false",
            **self.o.pipeline_env,
        )

    async def measure(self, name: str, url: str, cmd: list[str], env: dict[str, str], *,
                      kafka: KafkaTarget | None, expected_rows: int, readings: int,
                      ready_marker: str | None = None, ports: list[int] | None = None,
                      profile: str | None = None, profile_rate: int = 100,
                      **hooks: Any) -> tuple[dict[str, Any], ProcessRun]:
        database = unquote(urlsplit(url).path.lstrip("/"))
        run = await run_contestant(
            cmd, env, kafka=kafka, ready_marker=ready_marker, metrics_ports=ports,
            backend_cpu=BackendCpu(self.admin_url, database), timeout=self.timeout, profile_out=profile,
            profile_rate=profile_rate, **hooks,
        )
        rows = await self.count_rows(url)
        failure = run.failure
        if run.exit_code not in (0, None) or run.timed_out:
            tail = " | ".join(line[:300] for line in run.stderr_tail[-5:])
            failure = (failure or f"exited with status {run.exit_code}") + (f"; stderr: {tail}" if tail else "")
        extra: dict[str, Any] = {}
        if ports:
            extra["internals"] = report.pipeline_internals(run.metrics_text)
        result = report.contestant_result(
            name, DESCRIPTIONS.get(name.split("@")[0], name), readings=readings, rows=rows,
            expected_rows=expected_rows, wall_s=run.wall_s, startup_s=run.startup_s,
            cpu_s=run.cpu_s, peak_rss_mb=run.peak_rss_mb, db_cpu_s=run.db_cpu_s, exit_code=run.exit_code,
            failure=failure, extra=extra,
        )
        self.say(f"{name}: {result['status']}, {_fmt_rate(result)} readings/s, {rows:,} rows"
                 + (f" ({result['reason']})" if result["reason"] else ""))
        return result, run

    async def run_ceiling(self, url: str, path: Path, expected: int, label: str = "ceiling") -> dict[str, Any]:
        batch = self.o.ceiling_batch or self.s.batch_max_readings
        cmd = [sys.executable, "-m", "bench.contestants", "ceiling", "--database-url", url,
               "--dataset", str(path), "--batch", str(batch)]
        result, _ = await self.measure(label, url, cmd, self.child_env(), kafka=None,
                                       expected_rows=expected, readings=self.o.readings)
        result["batch_rows"] = batch
        return result

    async def run_kafka_contestant(self, name: str, url: str, topic: str, ends: dict[int, int],
                                   workdir: Path) -> dict[str, Any]:
        group = f"bench-{self.tag}-{name}"
        cmd = [sys.executable, "-m", "bench.contestants", name, "--database-url", url,
               "--bootstrap", self.s.kafka_bootstrap, "--topic", topic, "--group", group,
               "--idle", str(self.o.idle_seconds), "--state-dir", str(workdir / f"state-{name}")]
        result, _ = await self.measure(name, url, cmd, self.child_env(),
                                       kafka=KafkaTarget(self.s.kafka_bootstrap, topic, group, dict(ends)),
                                       expected_rows=self.o.readings, readings=self.o.readings)
        return result

    async def run_pipeline(self, label: str, url: str, topic: str, ends: dict[int, int], expected: int, *,
                           workers: int | None = None, stage_breakdown: bool = False) -> dict[str, Any]:
        """One ``fleet consume`` run over ``topic``; with ``stage_breakdown``, sampled for the breakdown."""
        workers = workers or self.o.workers
        await self.clear_statuses()
        await ensure_topics(self.s, [topic + ".dlq"], partitions=1)
        self.topics.append(topic + ".dlq")
        group = f"bench-{self.tag}-{label}"
        port = free_ports(workers)
        stacks = None
        if stage_breakdown and py_spy() is not None:
            stacks = str(self.workdir / f"stacks-{label}.txt")
        elif self.o.profile and label == "pipeline" and not self.o.breakdown:
            stacks = self.o.profile
        result, run = await self.measure(
            label, url, self.pipeline_command(workers), self.pipeline_env(url, topic, group, port),
            kafka=KafkaTarget(self.s.kafka_bootstrap, topic, group, dict(ends)), expected_rows=expected,
            readings=self.o.readings, ready_marker=READY_LOG, ports=list(range(port, port + workers)),
            profile=stacks, profile_rate=BREAKDOWN_RATE if stage_breakdown else 100,
        )
        result["workers"] = workers
        result["geofences"] = self.o.geofence_count if self.geofences_on else 0
        if self.geofences_on:
            result["description"] += f", geofence checks against {self.o.geofence_count:,} geofences, alert rules"
        if stage_breakdown:
            result["breakdown"] = self.stage_breakdown(label, stacks, result, run)
        return result

    def stage_breakdown(self, label: str, stacks: str | None, result: dict[str, Any],
                        run: ProcessRun) -> dict[str, Any]:
        """The run's CPU per reading by stage from its py-spy stacks (kept at ``--profile`` if asked)."""
        if stacks is None:
            return {"status": "skipped", "reason": "py-spy is not installed (pip install '.[bench]')"}
        path = Path(stacks)
        text = path.read_text() if path.exists() else ""
        if not text.strip():
            return {"status": "skipped", "reason": "py-spy recorded no samples (is ptrace allowed here?)"}
        if self.o.profile:
            keep = Path(profile_path(self.o.profile, label.removeprefix("pipeline").lstrip("-")))
            keep.write_text(text)
        out = breakdown.breakdown(breakdown.parse_collapsed(text), result.get("cpu_us_per_reading"))
        return {"status": "ok", "reason": None, "rate_hz": BREAKDOWN_RATE,
                "profiler_cpu_s": None if run.profiler_cpu_s is None else round(run.profiler_cpu_s, 2), **out}

    # --- the whole run ---------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        o = self.o
        pg_version = await self.preflight()
        result: dict[str, Any] = {
            "benchmark": "fleet telemetry ingestion",
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "conditions": conditions(pg_version),
            "settings": {
                "workers": o.workers, "batch_max_readings": self.s.batch_max_readings,
                "batch_max_age_ms": self.s.batch_max_age_ms, "max_batches_in_flight": self.s.max_batches_in_flight,
                "idle_seconds": o.idle_seconds, "pipeline_env": o.pipeline_env,
                "geofences": self.o.geofence_count if self.geofences_on else 0,
                "producer_compression": compression.producer_codec_name(DEFAULT_COMPRESSION),
            },
            "contestants": {}, "ratios": {}, "failures": [],
        }
        if o.breakdown and py_spy() is None:
            result["breakdown_skipped"] = "py-spy is not installed (pip install '.[bench]'): no per-stage breakdown"
            self.say(result["breakdown_skipped"])
        with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
            self.workdir = Path(tmp)
            path = self.workdir / "dataset.jsonl"
            try:
                topics = await self.prepare_dataset(path, result)
                await self.run_contestants(path, topics, result)
                pipeline = result["contestants"].get("pipeline")
                if pipeline is not None and pipeline["status"] == "ok" and o.latency_seconds > 0:
                    rate = o.latency_rate or pipeline["readings_per_s"] / 2
                    result["latency"] = await latency.run_latency(self, rate)
                if pipeline is not None and pipeline["status"] == "ok" and o.preload > 0:
                    result["preload"] = await self.run_preload(path, topics["telemetry"][0], topics["telemetry"][1],
                                                               pipeline, result["contestants"].get("ceiling"))
                if o.codecs:
                    result["codecs"] = await compression.measure_codecs(self, path, o.codecs)
            finally:
                await self.cleanup()
        result["conditions"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        self.collect_failures(result)
        result["goals"] = report.goals(result)
        result["ok"] = not result["failures"]
        return result

    async def prepare_dataset(self, path: Path, result: dict[str, Any]) -> dict[str, tuple[str, dict[int, int]]]:
        """Writes the dataset and produces it: ``{"telemetry": (topic, ends)}``, and ``"arrays"`` when
        the gateway-batch contestant runs."""
        o = self.o
        started = time.monotonic()
        size = dataset.write_dataset(self.spec, path)
        generated_s = time.monotonic() - started
        self.say(f"dataset: {o.readings:,} readings, {size / 1e6:.0f} MB, generated in {generated_s:.1f} s")
        topic = await self.new_topic("telemetry")
        started = time.monotonic()
        ends = await dataset.produce_file(self.s, topic, path)
        produced_s = time.monotonic() - started
        self.say(f"dataset: produced to {topic} in {produced_s:.1f} s")
        result["dataset"] = {
            "readings": o.readings, "vehicles": o.vehicles, "partitions": o.partitions, "seed": o.seed,
            "window_start": self.spec.start.isoformat(), "window_end": self.spec.end.isoformat(),
            "bytes": size, "generated_s": round(generated_s, 2), "produced_s": round(produced_s, 2),
            "partition_ends": {str(p): n for p, n in sorted(ends.items())},
        }
        if sum(ends.values()) != o.readings:
            raise RuntimeError(f"the broker acknowledged {sum(ends.values())} of {o.readings} readings")
        topics = {"telemetry": (topic, ends)}
        if "pipeline-arrays" in o.contestants:
            arrays = await self.new_topic("arrays")
            array_ends = await dataset.produce_file(self.s, arrays, path, arrays_of=dataset.GATEWAY_ARRAY,
                                                    vehicles=o.vehicles)
            result["dataset"]["array_messages"] = sum(array_ends.values())
            self.say(f"dataset: {sum(array_ends.values()):,} arrays of up to {dataset.GATEWAY_ARRAY} readings"
                     f" produced to {arrays}")
            topics["arrays"] = (arrays, array_ends)
        return topics

    async def run_contestants(self, path: Path, topics: dict[str, tuple[str, dict[int, int]]],
                              result: dict[str, Any]) -> None:
        """Every contestant asked for, in :data:`CONTESTANTS` order, then the throughput ratios."""
        o = self.o
        contestants: dict[str, dict[str, Any]] = result["contestants"]
        topic, ends = topics["telemetry"]
        for name in CONTESTANTS:
            if name not in o.contestants:
                continue
            if name == "peer" and (missing := peer_missing()):
                contestants[name] = report.skipped(name, DESCRIPTIONS[name], missing)
                self.say(f"peer: skipped: {missing}")
                continue
            self.say(f"{name}: running")
            url = await self.fresh_database(name.replace("-", "_"), geofences=name in PIPELINES and self.geofences_on)
            if name == "ceiling":
                contestants[name] = await self.run_ceiling(url, path, o.readings)
            elif name in PIPELINES:
                source, source_ends = topics["arrays"] if name == "pipeline-arrays" else (topic, ends)
                contestants[name] = await self.run_pipeline(
                    name, url, source, source_ends, o.readings, workers=2 if name == "pipeline-x2" else None,
                    stage_breakdown=o.breakdown)
            else:
                contestants[name] = await self.run_kafka_contestant(name, url, topic, ends, self.workdir)
        pipeline = contestants.get("pipeline")
        for other in ("ceiling", "peer", "naive"):
            if other in contestants:
                result["ratios"][f"pipeline/{other}"] = report.ratio(pipeline, contestants[other])
        for variant in ("pipeline-arrays", "pipeline-x2"):
            if variant in contestants and "ceiling" in contestants:
                result["ratios"][f"{variant}/ceiling"] = report.ratio(contestants[variant], contestants["ceiling"])

    @staticmethod
    def collect_failures(result: dict[str, Any]) -> None:
        for name, r in list(result["contestants"].items()) + [
                (f"{k} (preloaded)", v) for k, v in result.get("preload", {}).get("runs", {}).items()]:
            if r["status"] == "failed":
                result["failures"].append(f"{name}: {r['reason']}")
        for phase in ("latency", "preload"):
            if result.get(phase, {}).get("status") == "failed":
                result["failures"].append(f"{phase}: {result[phase]['reason']}")
        for codec, r in result.get("codecs", {}).items():
            if r["status"] == "failed":
                result["failures"].append(f"codec {codec}: {r['reason']}")

    async def run_preload(self, path: Path, topic: str, ends: dict[int, int], empty: dict[str, Any],
                          ceiling_empty: dict[str, Any] | None) -> dict[str, Any]:
        o = self.o
        url = await self.fresh_database("preload", geofences=self.geofences_on)
        self.say(f"preload: inserting {o.preload:,} older readings of the same fleet")
        conn = await asyncpg.connect(url)
        try:
            seconds = await dataset.preload(conn, o.preload, self.spec.end, progress=self.say)
        finally:
            await conn.close()
        ceiling_url = None
        if ceiling_empty is not None and ceiling_empty["status"] == "ok":
            ceiling_url = await self.copy_database(url, "preload_ceiling")
        out: dict[str, Any] = {"rows": o.preload, "preload_s": round(seconds, 1), "runs": {}}
        expected = o.preload + o.readings
        out["runs"]["pipeline"] = await self.run_pipeline("pipeline@preload", url, topic, ends, expected)
        if ceiling_url is not None:
            self.say("ceiling@preload: running")
            out["runs"]["ceiling"] = await self.run_ceiling(ceiling_url, path, expected, "ceiling@preload")
        failed = [k for k, r in out["runs"].items() if r["status"] != "ok"]
        if failed:
            out.update(status="failed", reason=f"{', '.join(failed)} failed on the preloaded table")
            return out
        out["status"] = "ok"
        out["throughput_change"] = round(out["runs"]["pipeline"]["readings_per_s"] / empty["readings_per_s"] - 1, 4)
        if "ceiling" in out["runs"] and ceiling_empty is not None:
            out["ceiling_change"] = round(
                out["runs"]["ceiling"]["readings_per_s"] / ceiling_empty["readings_per_s"] - 1, 4)
        return out


def _fmt_rate(result: dict[str, Any]) -> str:
    rate = result.get("readings_per_s")
    return "-" if rate is None else f"{rate:,.0f}"
