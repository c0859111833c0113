"""``fleet replay``: backfills and dead-letter replays (the run is :mod:`fleet_telemetry.replay.run`).

Exit status 0: everything stored or duplicate; 1: something rejected or failed; 2: bad
usage; 130: interrupted (Ctrl-C or SIGTERM), with a checkpoint the same command resumes
from. A first Ctrl-C stops after the chunks in flight, a second one at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
from typing import Any, Final

import orjson

from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.reading import REASONS
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.replay.kafka_source import KafkaRange, parse_time
from fleet_telemetry.replay.results import DIRECT, VIA_KAFKA
from fleet_telemetry.replay.progress import Summary
from fleet_telemetry.replay.run import Replay, ReplayOptions
from fleet_telemetry.replay.sources import FORMATS

EXIT_INTERRUPTED: Final = 130


def options_from_args(args: argparse.Namespace, settings: Settings) -> ReplayOptions:
    """Checks the command line; raises :class:`UsageError` with one line on misuse."""
    _check_source(args)
    mode = DIRECT if args.direct else VIA_KAFKA
    kafka = None if args.file else _kafka_range(args, settings)
    if args.rate is not None and not (args.rate > 0 and math.isfinite(args.rate)):
        raise UsageError("--rate must be a positive number of readings per second")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be 1 or more")
    if args.workers is not None and args.workers > 1 and mode == VIA_KAFKA:
        raise UsageError("--via-kafka publishes from one process, in order; leave --workers out")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be 1 or more")
    return ReplayOptions(
        mode=mode, file=args.file, fmt=args.format, kafka=kafka, dry_run=args.dry_run, rate=args.rate,
        rejects=args.rejects, restart=args.restart, workers=args.workers, batch_size=args.batch_size,
        as_json=args.json,
    )


def _check_source(args: argparse.Namespace) -> None:
    """Exactly one source, and only the options that apply to it."""
    kafka_flags = {
        "--partition": args.partition, "--from-offset": args.from_offset, "--to-offset": args.to_offset,
        "--since": args.since, "--until": args.until, "--reason": args.reason,
    }
    sources = [name for name, given in (("FILE", args.file), ("--topic", args.topic),
                                         ("--dead-letters", args.dead_letters)) if given]
    if len(sources) != 1:
        raise UsageError("give exactly one source: FILE, --topic TOPIC or --dead-letters"
                         + (f" (got {', '.join(sources)})" if sources else ""))
    if args.file:
        used = [name for name, value in kafka_flags.items() if value not in (None, [], ())]
        if used:
            raise UsageError(f"{', '.join(used)}: only for a --topic or --dead-letters source")
    elif args.format:
        raise UsageError("--format only applies to a FILE source")
    if args.reason and not args.dead_letters:
        raise UsageError("--reason only applies to --dead-letters")


def _kafka_range(args: argparse.Namespace, settings: Settings) -> KafkaRange:
    """The records of ``--topic`` or ``--dead-letters`` the options select."""
    for reason in args.reason or ():
        if reason not in REASONS:
            raise UsageError(f"--reason {reason!r} is not one of {', '.join(REASONS)}")
    for flag, value in (("--from-offset", args.from_offset), ("--to-offset", args.to_offset)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be 0 or more")
    if args.from_offset is not None and args.to_offset is not None and args.to_offset <= args.from_offset:
        raise UsageError("--to-offset must be greater than --from-offset (it is exclusive)")
    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    if since and until and until <= since:
        raise UsageError("--until must be later than --since")
    return KafkaRange(
        topic=settings.dlq_topic if args.dead_letters else args.topic,
        partitions=tuple(sorted(set(args.partition or ()))),
        from_offset=args.from_offset, to_offset=args.to_offset, since=since, until=until,
        reasons=tuple(args.reason or ()), dead_letters=bool(args.dead_letters),
    )


async def main(args: argparse.Namespace, settings: Settings) -> int:
    """The command: 0 all stored (or duplicates), 1 something rejected or failed, 130 interrupted."""
    options = options_from_args(args, settings)
    stop = asyncio.Event()
    replay = Replay(options, settings, stop=stop)
    summary = await _run_until_signalled(replay, stop)
    resume = f"run the same command to resume (checkpoint {replay.checkpoint.path})"
    if summary is None:
        sys.stderr.write(f"fleet replay: stopped at once; {resume}\n")
        return EXIT_INTERRUPTED
    if options.as_json:
        sys.stdout.write(orjson.dumps(summary.to_json()).decode() + "\n")
    else:
        sys.stdout.write(summary.text() + "\n")
    sys.stdout.flush()
    rejected = sum(summary.counts.rejected.values())
    if summary.status == "interrupted":
        sys.stderr.write(f"fleet replay: interrupted; {resume}\n")
        return EXIT_INTERRUPTED
    if rejected:
        sys.stderr.write(f"fleet replay: {rejected:,} readings rejected; see {summary.rejects_file}\n")
        return 1
    return 0


async def _run_until_signalled(replay: Replay, stop: asyncio.Event) -> Summary | None:
    """Runs the replay; the first SIGINT or SIGTERM sets ``stop``, the second cancels the
    run at once (then ``None``)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(replay.run())
    forced = False

    def on_signal() -> None:
        nonlocal forced
        if stop.is_set():
            forced = True
            task.cancel()
            return
        stop.set()
        sys.stderr.write("\nfleet replay: stopping after the chunks in flight (Ctrl-C again to stop at once)\n")

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    try:
        return await task
    except asyncio.CancelledError:
        if not forced:
            raise
        return None
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def register(sub: Any) -> None:
    """Adds ``fleet replay`` to the command's subparsers."""
    parser = sub.add_parser(
        "replay",
        help="backfill from files, Kafka ranges and the dead-letter topic",
        description="Re-ingest readings, idempotently: from an NDJSON or CSV file (plain or gzip), a range "
        "of a Kafka topic, or the dead-letter topic. --direct writes through the consumer's decoding and sink "
        "into PostgreSQL (readings older than the raw retention go to the rollups only); --via-kafka publishes "
        "to FLEET_TELEMETRY_TOPIC. Rejected readings go to a rejects file and the run goes on. Ctrl-C stops "
        "with a checkpoint; the same command resumes. Exit 0: everything stored or duplicate; 1: something "
        "rejected (see the rejects file) or failed; 2: bad usage; 130: interrupted. See docs/replay.md.",
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="an NDJSON or CSV file, plain or gzip")
    parser.add_argument("--format", choices=FORMATS, help="the FILE's format (default: from its name)")
    parser.add_argument("--topic", help="replay a range of this Kafka topic")
    parser.add_argument("--dead-letters", action="store_true", help="replay the dead-letter topic (FLEET_DLQ_TOPIC)")
    parser.add_argument("--partition", type=int, action="append", metavar="N",
                        help="only this partition (repeatable; default all)")
    parser.add_argument("--from-offset", type=int, metavar="N", help="first offset, in each selected partition")
    parser.add_argument("--to-offset", type=int, metavar="N",
                        help="stop before this offset (exclusive; default: the end when the replay starts)")
    parser.add_argument("--since", metavar="TIME", help="records with a timestamp at or after TIME (RFC 3339 or epoch ms)")
    parser.add_argument("--until", metavar="TIME", help="records with a timestamp before TIME (exclusive)")
    parser.add_argument("--reason", action="append", metavar="REASON",
                        help=f"dead letters with this reason only (repeatable: {', '.join(REASONS)})")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--direct", action="store_true", help="write straight into PostgreSQL through the sink")
    mode.add_argument("--via-kafka", action="store_true", help="publish to the telemetry topic for the consumers")
    parser.add_argument("--dry-run", action="store_true",
                        help="read and validate everything, report what would happen, write nothing")
    parser.add_argument("--rate", type=float, metavar="N", help="at most N readings per second")
    parser.add_argument("--rejects", metavar="PATH",
                        help="rejects file (default fleet-replay-<id>.rejects.ndjson here); an existing file is "
                        "replaced only if it holds the rejects of an earlier replay, a pipe or device is written to; "
                        "the checkpoint is PATH.checkpoint (for a pipe or device, fleet-replay-<id>.checkpoint here)")
    parser.add_argument("--restart", action="store_true", help="ignore a checkpoint and start from the beginning")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes decoding and writing (default: the CPU count, up to 4, for a file "
                        "with --direct; otherwise 1)")
    parser.add_argument("--batch-size", type=int, default=5000, metavar="N",
                        help="lines or records per chunk (default 5000)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=main)
