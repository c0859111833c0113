"""'python -m bench.faults': the pipeline under repeated faults, checked reading by reading.

Runs the real pipeline, 'fleet consume --workers 2' as a subprocess, on a database,
topics, consumer group and fleet of its own, while a producer streams live readings
from a simulated fleet with a share of broken messages, and causes these faults one at
a time at seeded random moments:

worker kill
    SIGKILL of one of the two worker processes. 'fleet consume --workers N' does not
    replace a dead worker (the survivor takes over its partitions; the command exits
    when every worker has), so the soak plays the operator: it lets the survivor run
    alone for --alone-seconds, stops the command with SIGTERM (the survivor finishes
    its batches, commits and leaves the group) and starts it again.
PostgreSQL outage
    With a private server ('--postgres private', the default when initdb and PostGIS
    are here): 'pg_ctl stop -m immediate' (a crash: no checkpoint, recovery on start),
    --postgres-outage seconds down, then started again. Otherwise ('proxy'): the
    workers reach FLEET_DATABASE_URL's server through a TCP proxy whose link is cut for
    that long (open connections dropped, new ones refused). The machine's own server is
    never restarted or reconfigured.
Redis outage
    The workers reach Redis (a private redis-server, or FLEET_REDIS_URL) through a TCP
    proxy that holds every byte for --redis-outage seconds ('freeze': Redis
    unresponsive, clients time out) or drops and refuses connections ('cut').
broker restart
    Only with a broker that keeps its data over a restart, which the local stack's
    Tansu does not (memory storage: a restart loses every topic), and the soak does not
    restart FLEET_KAFKA_BOOTSTRAP's broker; so by default this fault is left out with a
    note. --broker private runs a Tansu of the soak's own storing into a private S3
    (moto_server), stopped with SIGTERM and started again after --broker-outage
    seconds. With Tansu 0.6.0 that broker keeps every record, but after its restart it
    serves consumers that join the group afterwards far slower than the stream comes
    in, so the workers never catch up and the run fails on the broker's account: a way
    to try another broker build, not the default.

Then it compares what was sent with what is in the table and on the dead-letter topic
and prints one table: sent; stored; lost (a valid reading not stored, a broken message
not dead-lettered); duplicated (a reading stored twice, or stored and dead-lettered);
dead-lettered by reason, and dead letters repeated (dead letters are at least once: a
worker killed between sending them and committing sends them again; reported, not a
failure); misrouted (a broken message stored, a valid one dead-lettered, a wrong
reason); statuses right (Redis 'vehicle:{id}:status' holds each vehicle's newest
stored reading); alerts duplicated (two open alerts per vehicle, type and geofence; an
alert raised twice for one reading; two enters or two exits in a row); worker crashes
(a worker or the command exiting without being killed); time.

Exit status: 0 when nothing was lost, duplicated or misrouted, every status is right,
no alert is duplicated, no worker crashed and the workers caught up; 1 otherwise; 2
for bad usage. Configuration (the shared PostgreSQL, Redis and broker) comes from the
usual FLEET_* settings.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from bench.soak_plan import BROKER, KILL, POSTGRES, REDIS, Planned, plan_faults, run_plan
from bench.soak_report import failures, render
from bench.soak_rig import Rig, RigOptions, open_rig
from bench.soak_stream import READING, Ledger, Stream, StreamSpec, soak_fleet
from bench.soak_verdict import verdict
from bench.soak_workers import ConsumeCommand
from fleet_telemetry.core.errors import FleetError, ServiceUnavailable, UsageError
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.deploy.stack.probe import wait_until

WORKERS = 2
DEFAULT_READINGS = 60_000
DEFAULT_DURATION = 120.0


@dataclass(frozen=True)
class Options:
    readings: int
    vehicles: int
    rate: float
    duration: float
    kills: int
    seed: int
    bad_ratio: float
    alone_seconds: float
    postgres_outage: float
    redis_outage: float
    broker_outage: float
    rig: RigOptions


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = _Parser(prog="python -m bench.faults", description=doc.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readings", type=int, default=None,
                   help=f"messages to send, broken ones included (default {DEFAULT_READINGS:,})")
    p.add_argument("--vehicles", type=int, default=500, help="vehicles in the fleet (default 500)")
    p.add_argument("--rate", type=float, default=None, help="messages per second (default readings / duration)")
    p.add_argument("--duration", type=float, default=None,
                   help=f"seconds the stream lasts (default {DEFAULT_DURATION:g}, or readings / rate)")
    p.add_argument("--kills", type=int, default=4, help="worker kills (default 4)")
    p.add_argument("--seed", type=int, default=7, help="seed of the fleet, the broken messages and the faults (default 7)")
    p.add_argument("--bad-ratio", type=float, default=0.05, help="share of broken messages (default 0.05)")
    p.add_argument("--alone-seconds", type=float, default=3.0,
                   help="after a kill, seconds the surviving worker runs alone before the restart (default 3)")
    p.add_argument("--postgres", choices=("auto", "private", "proxy"), default="auto",
                   help="private: a server of the soak's own, crashed and restarted; proxy: a database on "
                        "FLEET_DATABASE_URL's server behind a cut link (default auto: private when possible)")
    p.add_argument("--postgres-outage", type=float, default=8.0, help="seconds PostgreSQL is away; 0: none (default 8)")
    p.add_argument("--redis", choices=("auto", "private", "shared"), default="auto",
                   help="private: a redis-server of the soak's own; shared: FLEET_REDIS_URL (default auto)")
    p.add_argument("--redis-fault", choices=("freeze", "cut"), default="freeze",
                   help="freeze: Redis unresponsive; cut: connections dropped and refused (default freeze)")
    p.add_argument("--redis-outage", type=float, default=8.0, help="seconds Redis is away; 0: none (default 8)")
    p.add_argument("--broker", choices=("shared", "private"), default="shared",
                   help="shared: FLEET_KAFKA_BOOTSTRAP, not restarted; private: Tansu on a private S3, restarted"
                        " (see 'broker restart' above; default shared)")
    p.add_argument("--broker-outage", type=float, default=5.0,
                   help="seconds the broker is down in its restart; 0: no restart (default 5)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the telemetry topic (default 4)")
    p.add_argument("--geofences", type=int, default=300, help="active geofences the rules check (default 300)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--keep", action="store_true", help="keep the database, topics and the folder with the logs")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _stream_shape(args: argparse.Namespace) -> tuple[int, float, float]:
    """(readings, rate, duration) from the ones given: any two fix the third."""
    readings, rate, duration = args.readings, args.rate, args.duration
    if rate is not None and duration is not None and readings is None:
        readings = round(rate * duration)
    readings = DEFAULT_READINGS if readings is None else readings
    if readings < 1:
        raise UsageError("--readings must be 1 or more")
    if rate is None:
        duration = DEFAULT_DURATION if duration is None else duration
        if duration <= 0:
            raise UsageError("--duration must be above 0")
        return readings, readings / duration, duration
    if rate <= 0:
        raise UsageError("--rate must be above 0")
    if duration is not None and abs(readings - rate * duration) > max(1.0, 0.01 * readings):
        raise UsageError("--readings, --rate and --duration disagree: give any two of them")
    return readings, rate, readings / rate


def options_from(args: argparse.Namespace) -> Options:
    """Checked options; raises :class:`UsageError` for values that cannot work."""
    readings, rate, duration = _stream_shape(args)
    for flag in ("vehicles", "partitions"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be 1 or more")
    if args.vehicles > readings:
        raise UsageError("--vehicles must not exceed --readings")
    for flag in ("kills", "geofences", "alone_seconds", "postgres_outage", "redis_outage", "broker_outage"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must not be negative")
    if not 0 <= args.bad_ratio < 1:
        raise UsageError("--bad-ratio must be at least 0 and below 1")
    return Options(
        readings=readings, vehicles=args.vehicles, rate=rate, duration=duration, kills=args.kills, seed=args.seed,
        bad_ratio=args.bad_ratio, alone_seconds=args.alone_seconds, postgres_outage=args.postgres_outage,
        redis_outage=args.redis_outage, broker_outage=args.broker_outage,
        rig=RigOptions(postgres=args.postgres, redis=args.redis, redis_fault=args.redis_fault, broker=args.broker,
                       partitions=args.partitions, geofences=args.geofences, seed=args.seed, keep=args.keep),
    )


async def caught_up(settings: Settings, ledger: Ledger, timeout: float) -> bool:
    """Blocks until the workers' group has committed every partition to its end (the
    larger of the broker's end offset and the last acknowledged send); False on timeout."""
    topic = settings.telemetry_topic
    ends: dict[TopicPartition, int] = {}
    for partition, offset in ledger.placed:
        tp = TopicPartition(topic, partition)
        ends[tp] = max(ends.get(tp, 0), offset + 1)
    watcher = AIOKafkaConsumer(group_id=settings.consumer_group, enable_auto_commit=False,
                               **settings.kafka_client_options())
    await watcher.start()
    try:
        for tp, end in (await watcher.end_offsets(list(ends))).items():
            ends[tp] = max(ends[tp], end)

        async def behind() -> int:
            committed = {tp: await watcher.committed(tp) for tp in ends}
            return sum(max(0, end - (committed[tp] or 0)) for tp, end in ends.items())

        return await wait_until(behind, lambda lag: lag == 0, timeout, interval=0.5) == 0
    finally:
        await watcher.stop()


class Soak:
    """One run: rig, workers, stream and faults, then the verdict."""

    def __init__(self, settings: Settings, options: Options, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.o = options
        self.say = say
        self.rng = random.Random(options.seed)
        self.tag = uuid.uuid4().hex[:8]
        self.fleet = soak_fleet(options.vehicles, options.seed, self.tag)
        self._ledger = Ledger()
        self._started = time.monotonic()

    def since_start(self) -> float:
        return time.monotonic() - self._started

    async def run(self) -> dict[str, Any]:
        ids = [v.id for v in self.fleet]
        async with open_rig(self.settings, self.o.rig, ids, self.say, tag=self.tag) as rig:
            command = ConsumeCommand(rig.worker_env, WORKERS, rig.folder / "workers.log", self.since_start)
            try:
                self.say(f"workers: starting fleet consume --workers {WORKERS} (log: {command.log})")
                await command.start()
                result = await self._stream_under_faults(rig, command)
            finally:
                await command.close()
            stats = command.stats
            result["workers"] = {"starts": stats.starts, "kills": stats.kills,
                                 "crashes": [c.__dict__ for c in stats.crashes],
                                 "final_stop_code": stats.stop_codes[-1] if stats.stop_codes else None}
            self.say("checking: rows, dead letters, statuses, alerts")
            result["found"] = await verdict(rig.settings.database_url, rig.settings.redis_url, rig.settings,
                                            rig.settings.dlq_topic, self._ledger, ids)
            result["time"]["total_s"] = round(self.since_start(), 1)
            result["failures"] = failures(result)
            result["ok"] = not result["failures"]
            rig.keep_folder = not result["ok"]
            return result

    async def _stream_under_faults(self, rig: Rig, command: ConsumeCommand) -> dict[str, Any]:
        o = self.o
        stream = Stream(rig.settings, rig.settings.telemetry_topic, self.fleet,
                        StreamSpec(o.readings, o.rate, o.bad_ratio, o.seed), self.say)
        self._ledger = stream.ledger
        outages = {POSTGRES: o.postgres_outage, REDIS: o.redis_outage,
                   BROKER: o.broker_outage if rig.can_restart_broker else 0.0}
        plan = plan_faults(self.rng, o.duration, o.kills, o.alone_seconds, outages)
        for note in rig.notes:
            self.say(f"note: {note}")
        self.say(f"stream: {o.readings:,} messages from {o.vehicles:,} vehicles at {o.rate:,.0f}/s for"
                 f" {o.duration:.0f} s; faults planned: {', '.join(f'{f.kind} at {f.at_s:g} s' for f in plan)}")
        began = time.monotonic()
        streaming = asyncio.ensure_future(stream.run())
        faults = asyncio.ensure_future(run_plan(plan, lambda f: self._cause(f, rig, command),
                                                lambda: time.monotonic() - began, o.duration, self.say))
        try:
            await streaming
            done, left_out = await faults
        finally:
            faults.cancel()
        stream_s = time.monotonic() - began
        self.say(f"stream: done in {stream_s:.1f} s; waiting for the workers to commit everything")
        timeout = 60.0 + o.readings / 2000
        up_to_date = await caught_up(rig.settings, stream.ledger, timeout)
        catch_up_s = time.monotonic() - began - stream_s
        return {
            "conditions": self._conditions(rig),
            "sent": self._sent(stream.ledger),
            "faults": done, "faults_left_out": left_out,
            "caught_up": up_to_date,
            "time": {"stream_s": round(stream_s, 1), "catch_up_s": round(catch_up_s, 1) if up_to_date else None,
                     "catch_up_timeout_s": timeout},
        }

    async def _cause(self, fault: Planned, rig: Rig, command: ConsumeCommand) -> str:
        if fault.kind == KILL:
            pid = await command.kill_worker(self.rng, fault.seconds)
            if pid is None:
                return "no worker was running to kill; fleet consume started again"
            return (f"SIGKILL worker {pid}; the other ran alone {fault.seconds:g} s;"
                    " fleet consume stopped (SIGTERM) and started again")
        if fault.kind == POSTGRES:
            await rig.postgres_outage(fault.seconds)
            return rig.conditions["postgres"]
        if fault.kind == REDIS:
            await rig.redis_outage(fault.seconds)
            return rig.conditions["redis"]
        await rig.broker_outage(fault.seconds)
        return rig.conditions["broker"]

    def _conditions(self, rig: Rig) -> dict[str, Any]:
        o = self.o
        return {
            "readings": o.readings, "vehicles": o.vehicles, "rate_per_s": round(o.rate, 1),
            "duration_s": round(o.duration, 1), "partitions": o.rig.partitions, "geofences": o.rig.geofences,
            "bad_ratio": o.bad_ratio, "seed": o.seed, "kills": o.kills, "alone_seconds": o.alone_seconds,
            "postgres_outage_s": o.postgres_outage, "redis_outage_s": o.redis_outage,
            "broker_outage_s": o.broker_outage if rig.can_restart_broker else 0,
            "workers": f"fleet consume --workers {WORKERS}, restarted by the soak after each kill",
            "faults": dict(rig.conditions), "notes": list(rig.notes),
        }

    @staticmethod
    def _sent(ledger: Ledger) -> dict[str, Any]:
        kinds = ledger.kinds()
        readings = kinds.pop(READING, 0)
        return {"messages": len(ledger.messages), "readings": readings, "broken": sum(kinds.values()),
                "broken_by_kind": dict(sorted(kinds.items())), "sent_again": ledger.resent}


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """One soak as 'args' ask, progress on stderr unless '--quiet'; returns the result.
    Raises :class:`FleetError` for bad usage and for a service it cannot reach."""
    from fleet_telemetry.cli.main import load_settings
    from fleet_telemetry.core.logs import configure_logging

    options = options_from(args)
    settings = load_settings()
    configure_logging("console", "error")
    # The soak's own producer and readers meet the faults too; their retries are expected.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    def say(line: str) -> None:
        if not args.quiet:
            print(f"soak: {line}", file=sys.stderr, flush=True)

    try:
        return asyncio.run(Soak(settings, options, say).run())
    except OSError as exc:
        raise ServiceUnavailable(
            f"a connection failed ({type(exc).__name__}: {exc}); start the local stack"
            " (fleet services up) or set FLEET_DATABASE_URL, FLEET_REDIS_URL, FLEET_KAFKA_BOOTSTRAP"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = soak(args)
    except (FleetError, KeyboardInterrupt) as exc:  # Ctrl-C: the rig was removed on the way out
        sys.stderr.write(f"soak: {exc or 'interrupted'}\n")
        return exc.exit_code if isinstance(exc, FleetError) else 130
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    print(render(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
