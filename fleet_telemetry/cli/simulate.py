"""``fleet simulate``: publishes a simulated fleet's telemetry until Ctrl-C or ``--duration``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson

from fleet_telemetry.cli.parsing import add_command
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.core.stopping import StopSignals
from fleet_telemetry.ingest.simulate import simulate


SUMMARY = "publish a simulated fleet's telemetry"
DESCRIPTION = (
    "Publish plausible telemetry from a simulated fleet to FLEET_TELEMETRY_TOPIC. "
    "The vehicles are registered in PostgreSQL first. Ctrl-C (exit 130) or SIGTERM (exit 0) stops it; "
    "then a summary line tells what was sent."
)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = add_command(sub, "simulate", SUMMARY, DESCRIPTION, run)
    add_fleet_options(parser, vehicles=100, rate=200, bad_ratio=0)
    parser.add_argument("--seed", type=int, default=1, help="fleet seed; the same seed gives the same vehicles")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object on stdout (and no progress lines)")


def add_fleet_options(parser: argparse.ArgumentParser, *, vehicles: int, rate: float, bad_ratio: float) -> None:
    """The simulated fleet's options, shared by ``fleet simulate`` and ``fleet demo``."""
    parser.add_argument("--vehicles", type=int, default=vehicles, help=f"fleet size (default {vehicles})")
    parser.add_argument("--rate", type=float, default=float(rate),
                        help=f"readings per second in total (default {rate:g})")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="stop after this long (default: until Ctrl-C)")
    parser.add_argument("--bad-ratio", type=float, default=float(bad_ratio), metavar="SHARE",
                        help=f"share of malformed or invalid messages, 0 to 1 (default {bad_ratio:g})")


def check(args: argparse.Namespace) -> None:
    """Raises :class:`UsageError` for an option out of its range."""
    if args.vehicles < 1:
        raise UsageError("--vehicles must be 1 or more")
    if args.rate <= 0:
        raise UsageError("--rate must be above 0 readings per second")
    if not 0 <= args.bad_ratio <= 1:
        raise UsageError("--bad-ratio must be between 0 and 1")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be above 0 seconds")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Publishes until ``--duration`` has passed or SIGINT/SIGTERM, then prints a summary."""
    check(args)
    return asyncio.run(_simulate_until_stopped(args, settings))


async def _simulate_until_stopped(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    signals = StopSignals(stop.set).install()
    started = time.monotonic()
    stats = await simulate(settings, vehicles=args.vehicles, rate=args.rate, duration=args.duration,
                           bad_ratio=args.bad_ratio, seed=args.seed, stop=stop, progress=not args.json)
    if args.json:
        print(orjson.dumps({"sent": stats.sent, "vehicles": args.vehicles, "topic": settings.telemetry_topic,
                            "bad": dict(sorted(stats.bad.items())), "seconds": round(time.monotonic() - started, 3),
                            "interrupted": signals.interrupted}).decode())
    else:
        bad = ", ".join(f"{kind} {n}" for kind, n in sorted(stats.bad.items())) or "none"
        print(f"simulate: sent {stats.sent} readings from {args.vehicles} vehicles to "
              f"{settings.telemetry_topic}; bad: {bad}" + ("; interrupted" if signals.interrupted else ""),
              file=sys.stderr)
    return signals.status(0)
