"""``fleet demo``: the whole pipeline on the local stack, with a live view.

Starts what is missing of the local stack (``fleet services up``), applies the
migrations, creates the topics, then runs a simulated fleet and a consumer worker side
by side in this process and shows, every second, readings per second published and
stored, duplicates, dead letters by reason and consumer lag. Ctrl-C (or SIGTERM) stops
the simulator, lets the worker read what was published (a second Ctrl-C, or
FLEET_SHUTDOWN_TIMEOUT_SECONDS, cuts that short), finish and commit its in-flight
batches, prints a summary and exits 130 (0 after SIGTERM or ``--duration``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any, TextIO

from fleet_telemetry.cli.parsing import add_command, seconds_arg
from fleet_telemetry.cli.simulate import add_fleet_options, check
from fleet_telemetry.core.metrics import PipelineMetrics, serve
from fleet_telemetry.consumers.worker import Worker
from fleet_telemetry.core.logs import configure_logging
from fleet_telemetry.core.reading import REASONS
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.core.stopping import StopSignals
from fleet_telemetry.ingest.simulate import SimulationStats, simulate
from fleet_telemetry.ingest.topics import ensure_topics


class LiveView:
    """Renders the pipeline's numbers: one refreshed line on a terminal, a line per interval otherwise."""

    def __init__(self, metrics: PipelineMetrics, stats: SimulationStats, out: TextIO = sys.stderr) -> None:
        self.metrics = metrics
        self.stats = stats
        self.out = out
        self.tty = out.isatty()
        self.started = time.monotonic()
        self._last = (self.started, 0, 0.0)

    def _lag(self) -> int:
        total = 0.0
        for family in self.metrics.registry.collect():
            if family.name == "fleet_consumer_lag":
                total += sum(sample.value for sample in family.samples)
        return int(total)

    def line(self) -> str:
        now = time.monotonic()
        m = self.metrics
        stored = m.value("fleet_readings_total", outcome="stored")
        then, sent_before, stored_before = self._last
        dt = max(now - then, 1e-6)
        sent_rate = (self.stats.sent - sent_before) / dt
        stored_rate = (stored - stored_before) / dt
        self._last = (now, self.stats.sent, stored)
        letters = ", ".join(
            f"{reason} {int(m.value('fleet_dead_letters_total', reason=reason))}"
            for reason in REASONS if m.value("fleet_dead_letters_total", reason=reason)
        ) or "none"
        return (
            f"[{now - self.started:6.0f}s] in {sent_rate:7.0f}/s | stored {stored_rate:7.0f}/s "
            f"(total {int(stored):,}) | duplicates {int(m.value('fleet_readings_total', outcome='duplicate')):,} "
            f"| dead letters: {letters} | lag {self._lag():,}"
        )

    def show(self) -> None:
        text = self.line()
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")
        self.out.flush()


async def demo(settings: Settings, *, vehicles: int, rate: float, bad_ratio: float,
               duration: float | None, interval: float, start_stack: bool) -> int:
    if start_stack:
        from fleet_telemetry.deploy.stack import up

        if await up(settings, timeout=120) != 0:
            return 1
    from fleet_telemetry.schema.migrate import apply_migrations

    applied = await apply_migrations(settings.database_url)
    if applied:
        print(f"demo: applied {len(applied)} migrations", file=sys.stderr)
    await ensure_topics(settings, [settings.telemetry_topic, settings.dlq_topic])
    await ensure_topics(settings, [settings.events_topic], partitions=settings.events_topic_partitions)

    stop, hurry = asyncio.Event(), asyncio.Event()
    signals = StopSignals(lambda: hurry.set() if stop.is_set() else stop.set()).install()

    worker = Worker(settings)
    if settings.metrics_port:
        serve(worker.metrics, settings.metrics_port, settings.metrics_address)
    stats = SimulationStats()
    view = LiveView(worker.metrics, stats)
    metrics_host = "127.0.0.1" if settings.metrics_address in ("0.0.0.0", "") else settings.metrics_address
    print(
        f"demo: {vehicles} simulated vehicles at {rate:g} readings/s ({bad_ratio:.0%} bad) -> "
        f"{settings.telemetry_topic} -> PostgreSQL {settings.database_url_masked}, Redis "
        f"{settings.redis_url_masked}"
        + (f"; metrics on http://{metrics_host}:{settings.metrics_port}/metrics" if settings.metrics_port else "")
        + ". Ctrl-C stops.",
        file=sys.stderr,
    )
    worker_task = asyncio.create_task(worker.run(), name="fleet-demo-worker")
    sim_task = asyncio.create_task(
        simulate(settings, vehicles=vehicles, rate=rate, duration=duration, bad_ratio=bad_ratio,
                 stop=stop, stats=stats),
        name="fleet-demo-simulator",
    )
    try:
        while not stop.is_set() and not worker_task.done() and not sim_task.done():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            view.show()
    finally:
        stop.set()
        view.finish()
        await sim_task  # raises if the simulator failed
        if not worker_task.done():
            await _catch_up(worker, worker_task, stats.sent, settings.shutdown_timeout_seconds, hurry)
            worker.stop()
        code = await worker_task
    m = worker.metrics
    print(
        f"demo: published {stats.sent:,} readings; stored {int(m.value('fleet_readings_total', outcome='stored')):,}, "
        f"duplicates {int(m.value('fleet_readings_total', outcome='duplicate')):,}, dead-lettered "
        f"{int(m.value('fleet_readings_total', outcome='dead_lettered')):,}; stopped cleanly"
        if code == 0 else "demo: the worker stopped with an error (see the log above)",
        file=sys.stderr,
    )
    return signals.status(code)


async def _catch_up(worker: Worker, running: "asyncio.Task[int]", published: int, timeout: float,
                    hurry: asyncio.Event) -> None:
    """Blocks until the worker has read every reading published, it stopped, ``timeout``
    passed or ``hurry`` is set."""
    deadline = time.monotonic() + timeout
    while (worker.metrics.value("fleet_messages_total") < published and not running.done()
           and not hurry.is_set() and time.monotonic() < deadline):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(hurry.wait(), 0.1)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.verbose:
        # The live view is the demo's output; only problems interrupt it.
        configure_logging(settings.log_format, "warning")
    check(args)
    return asyncio.run(demo(settings, vehicles=args.vehicles, rate=args.rate, bad_ratio=args.bad_ratio,
                            duration=args.duration, interval=args.interval, start_stack=not args.no_services))


SUMMARY = "the whole pipeline on the local stack with a simulated fleet and a live view"
DESCRIPTION = (
    "Start the local stack if needed, migrate, then run a simulated fleet and a consumer "
    "worker with a live view of readings in and stored, dead letters and lag. Ctrl-C stops it cleanly."
)


def register(sub: Any) -> None:
    parser = add_command(sub, "demo", SUMMARY, DESCRIPTION, run)
    add_fleet_options(parser, vehicles=200, rate=1000, bad_ratio=0.01)
    parser.add_argument("--interval", type=seconds_arg, default=1.0, metavar="SECONDS",
                        help="refresh of the live view (default 1)")
    parser.add_argument("--verbose", action="store_true", help="show the workers' info logs under the live view")
    parser.add_argument("--no-services", action="store_true", help="do not run `fleet services up` first")
