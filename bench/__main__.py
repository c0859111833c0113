"""``python -m bench``: the ingestion benchmark, every contestant side by side in one run.

Generates a seeded dataset, pre-produces it to a fresh topic, and runs against the
same table definition, each into a freshly migrated database of its own:

- ``ceiling``: asyncpg binary COPY of the same rows straight into the table;
- ``peer``: a Quix Streams application with its PostgreSQL sink;
- ``naive``: aiokafka + asyncpg ``executemany``, commit after each batch;
- ``pipeline``: ``fleet consume`` in full (validation, COPY, Redis status; geofence
  checks against 1,000 active geofences and every alert rule);
- ``pipeline-arrays``: the same, with the same readings sent as gateways send them,
  JSON arrays of 50 per message keyed by the gateway;
- ``pipeline-x2``: the same as ``pipeline`` with ``fleet consume --workers 2``.

The pipeline runs are sampled with py-spy (when installed) for a per-stage breakdown of
their CPU per reading. Then the pipeline's end-to-end latency at half its measured
maximum, its throughput into a table already holding ``--preload`` readings, and what
each producer codec costs the consumer. Prints a table, writes the same as JSON, and
exits 1 if any contestant stored fewer or more rows than it was given (2 for bad
usage). Configuration (PostgreSQL, Redis, Kafka) comes from the usual ``FLEET_*``
settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import NoReturn, Sequence

import orjson

from bench.compression import CODECS
from bench.suite import CONTESTANTS, Bench, Options
from bench import report
from fleet_telemetry.core.errors import FleetError, ServiceUnavailable, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--readings", type=int, default=1_000_000, help="readings in the dataset (default 1,000,000)")
    p.add_argument("--vehicles", type=int, default=5_000, help="vehicles in the fleet (default 5,000)")
    p.add_argument("--partitions", type=int, default=8, help="partitions of the topic (default 8)")
    p.add_argument("--seed", type=int, default=7, help="dataset seed (default 7)")
    p.add_argument("--span-hours", type=float, default=2.0,
                   help="the readings' event times cover this many hours before now (default 2)")
    p.add_argument("--contestants", default=",".join(CONTESTANTS),
                   help=f"comma-separated subset of {','.join(CONTESTANTS)} (default all)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes of the pipeline and pipeline-arrays runs (fleet consume --workers;"
                        " pipeline-x2 always runs 2)")
    p.add_argument("--idle-seconds", type=float, default=3.0,
                   help="Kafka contestants stop after this long without records (default 3)")
    p.add_argument("--geofences", choices=("on", "off"), default="on",
                   help="create --geofence-count active geofences for the pipeline (default on)")
    p.add_argument("--geofence-count", type=int, default=1000, help="active geofences (default 1,000)")
    p.add_argument("--latency-seconds", type=float, default=30.0,
                   help="length of the fixed-rate latency phase; 0 skips it (default 30)")
    p.add_argument("--latency-warmup", type=float, default=5.0,
                   help="seconds at the start of the latency phase left out of the quantiles (default 5)")
    p.add_argument("--latency-rate", type=float, default=None,
                   help="offered readings/s in the latency phase (default: half the pipeline's measured rate)")
    p.add_argument("--preload", type=int, default=2_000_000,
                   help="readings already in the table for the second pipeline run; 0 skips it "
                        "(default 2,000,000; the published figures use 20,000,000)")
    p.add_argument("--ceiling-batch", type=int, default=None,
                   help="rows per COPY transaction of the ceiling (default FLEET_BATCH_MAX_READINGS)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds one contestant may take (default 120 + readings / 500)")
    p.add_argument("--pipeline-env", action="append", default=[], metavar="FLEET_NAME=VALUE",
                   help="extra setting for the pipeline's workers, e.g. FLEET_BATCH_MAX_AGE_MS=200 (repeatable)")
    p.add_argument("--breakdown", choices=("on", "off"), default="on",
                   help="sample the pipeline runs with py-spy for the per-stage breakdown (default on;"
                        " the sampling costs the runs some CPU, reported beside it)")
    p.add_argument("--codecs", default="gzip,lz4,zstd,none",
                   help="producer codecs whose cost to the consumer is measured, comma-separated from "
                        "gzip,lz4,zstd,snappy,none; empty skips it (default gzip,lz4,zstd,none)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="keep the py-spy collapsed stacks of the breakdown: the pipeline's in FILE, the others'"
                        " in FILE-arrays and FILE-x2; and sample the latency phase into FILE-latency. With"
                        " --breakdown off, the pipeline's run alone is sampled, into FILE (.svg flame graph,"
                        " .json speedscope, else collapsed stacks); costs the runs some CPU")
    p.add_argument("--json-out", default="bench-results.json", help="JSON report path (default bench-results.json)")
    p.add_argument("--keep", action="store_true", help="keep the databases and topics for inspection")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def options_from(args: argparse.Namespace) -> Options:
    """Checked options; raises :class:`UsageError` for values that cannot work."""
    contestants = tuple(c.strip() for c in args.contestants.split(",") if c.strip())
    unknown = [c for c in contestants if c not in CONTESTANTS]
    if unknown or not contestants:
        raise UsageError(f"--contestants takes names from {', '.join(CONTESTANTS)}; got {args.contestants!r}")
    for flag in ("readings", "vehicles", "partitions", "workers"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be 1 or more")
    if args.vehicles > args.readings:
        raise UsageError("--vehicles must not exceed --readings")
    for flag in ("preload", "geofence_count", "latency_seconds", "latency_warmup"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must not be negative")
    if args.latency_seconds and args.latency_warmup >= args.latency_seconds:
        raise UsageError("--latency-warmup must be shorter than --latency-seconds")
    if not 0 < args.span_hours <= 24 * 29:
        raise UsageError("--span-hours must be above 0 and inside the 30-day retention")
    env = {}
    for item in args.pipeline_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("FLEET_"):
            raise UsageError(f"--pipeline-env takes FLEET_NAME=VALUE, got {item!r}")
        env[name] = value
    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    if any(c not in CODECS for c in codecs):
        raise UsageError(f"--codecs takes names from {','.join(CODECS)}; got {args.codecs!r}")
    if args.profile:
        from bench.measure import py_spy

        if py_spy() is None:
            raise UsageError("--profile needs py-spy (pip install py-spy)")
        if args.breakdown == "on" and args.profile.endswith((".svg", ".json")):
            raise UsageError("--profile keeps the breakdown's collapsed stacks: name a FILE without .svg or .json,"
                             " or add --breakdown off")
        args.profile = str(Path(args.profile).resolve())
    return Options(
        readings=args.readings, vehicles=args.vehicles, partitions=args.partitions, seed=args.seed,
        span_hours=args.span_hours, contestants=contestants, workers=args.workers, idle_seconds=args.idle_seconds,
        geofences=args.geofences, geofence_count=args.geofence_count, latency_seconds=args.latency_seconds,
        latency_warmup=args.latency_warmup, latency_rate=args.latency_rate, preload=args.preload,
        ceiling_batch=args.ceiling_batch, timeout=args.timeout, pipeline_env=env, profile=args.profile,
        breakdown=args.breakdown == "on", codecs=codecs, keep=args.keep,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from fleet_telemetry.cli.main import load_settings
        from fleet_telemetry.core.logs import configure_logging

        options = options_from(args)
        settings = load_settings()
        configure_logging("console", "warning")

        def progress(line: str) -> None:
            if not args.quiet:
                print(f"bench: {line}", file=sys.stderr, flush=True)

        try:
            result = asyncio.run(Bench(settings, options, progress).run())
        except OSError as exc:
            raise ServiceUnavailable(
                f"a service is not answering ({type(exc).__name__}: {exc}); start the local stack"
                " (fleet services up) or set FLEET_DATABASE_URL, FLEET_REDIS_URL, FLEET_KAFKA_BOOTSTRAP"
            ) from None
    except FleetError as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted\n")
        return 130
    print(report.render(result))
    if args.json_out:
        Path(args.json_out).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    if not result["ok"]:
        sys.stderr.write("bench: FAILED: " + "; ".join(result["failures"]) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
