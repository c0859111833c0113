"""The latency phase: the pipeline consuming a live stream at a fixed offered rate.

A producer sends the fleet's readings, timed now, at ``rate`` readings per second for
``--latency-seconds``, starting once the worker is ready and serves its metrics. The
latency from a reading's time to its committed row comes from the worker's
``fleet_ingest_latency_seconds`` histogram, scraped after the warm-up and at the end, so
the quantiles cover only what was sent after the warm-up.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson

from bench import report
from bench.measure import (READY_LOG, KafkaTarget, ProcessRun, free_ports, profile_path, run_contestant, scrape,
                           wait_for_metrics)
from fleet_telemetry.ingest.producer import TelemetryProducer
from fleet_telemetry.ingest.simulate import make_fleet
from fleet_telemetry.ingest.topics import ensure_topics

if TYPE_CHECKING:
    from bench.suite import Bench

_HISTOGRAM = "fleet_ingest_latency_seconds"


class _LiveStream:
    """Sends readings at ``rate`` per second and notes how many, and the metrics at the warm-up."""

    def __init__(self, bench: "Bench", topic: str, target: KafkaTarget, ports: list[int], rate: float) -> None:
        self.bench, self.topic, self.target, self.ports, self.rate = bench, topic, target, ports, rate
        self.sent = self.warm_sent = 0
        self.warm: list[str] | None = None
        self.measured_s = 1e-9
        self.fleet = make_fleet(bench.o.vehicles, bench.o.seed)

    async def run(self) -> None:
        """Sends what is due every few milliseconds, as one record batch per partition (aiokafka's
        batch API: a fraction of the CPU of one ``send`` per reading, so the offered load leaves
        the machine's CPU to the pipeline). A vehicle always goes to the same partition."""
        o = self.bench.o
        partitions = o.partitions
        keys = [str(v.id).encode() for v in self.fleet]
        async with TelemetryProducer(self.bench.s, topic=self.topic) as producer:
            kafka = producer.producer
            started = warm_at = time.monotonic()
            cursor = 0
            while (elapsed := time.monotonic() - started) < o.latency_seconds:
                due = int(self.rate * elapsed) - self.sent
                if due > 0:
                    now = datetime.now(timezone.utc)
                    batches: dict[int, Any] = {}
                    for _ in range(due):
                        index = cursor % len(self.fleet)
                        cursor += 1
                        partition = index % partitions
                        batch = batches.get(partition)
                        if batch is None:
                            batch = batches[partition] = kafka.create_batch()
                        value = orjson.dumps(self.fleet[index].step(now))
                        if batch.append(key=keys[index], value=value, timestamp=None) is None:  # full
                            await self._send(kafka, batch, partition)
                            batch = batches[partition] = kafka.create_batch()
                            batch.append(key=keys[index], value=value, timestamp=None)
                    for partition, batch in batches.items():
                        await self._send(kafka, batch, partition)
                    self.sent += due
                if self.warm is None and elapsed >= o.latency_warmup:
                    self.warm = await asyncio.to_thread(lambda: [scrape(p) for p in self.ports])
                    self.warm_sent = self.sent
                    warm_at = time.monotonic()
                await asyncio.sleep(0.005)
            self.measured_s = max(time.monotonic() - warm_at, 1e-9)
            await producer.flush()
        await asyncio.sleep(0)
        self.target.still_producing = False

    async def _send(self, kafka: Any, batch: Any, partition: int) -> None:
        if batch.record_count() == 0:
            return
        batch.close()
        future = await kafka.send_batch(batch, self.topic, partition=partition)
        count = batch.record_count()

        def note(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                meta = done.result()
                self.target.ends[partition] = max(self.target.ends[partition], meta.offset + count)

        future.add_done_callback(note)


async def run_latency(bench: "Bench", rate: float) -> dict[str, Any]:
    """The pipeline consuming a live stream at ``rate`` readings/s; quantiles after the warm-up."""
    o = bench.o
    url = await bench.fresh_database("latency", geofences=bench.geofences_on)
    topic = await bench.new_topic("live")
    await bench.clear_statuses()
    await ensure_topics(bench.s, [topic + ".dlq"], partitions=1)
    bench.topics.append(topic + ".dlq")
    group = f"bench-{bench.tag}-latency"
    port = free_ports(o.workers)
    ports = list(range(port, port + o.workers))
    target = KafkaTarget(bench.s.kafka_bootstrap, topic, group, {p: 0 for p in range(o.partitions)},
                         still_producing=True)
    stream = _LiveStream(bench, topic, target, ports, rate)
    tasks: list[asyncio.Task[None]] = []

    async def on_ready() -> None:
        await wait_for_metrics(ports, 30)
        tasks.append(asyncio.create_task(stream.run()))

    bench.say(f"latency: offering {rate:,.0f} readings/s for {o.latency_seconds:.0f} s")
    run = await run_contestant(
        bench.pipeline_command(), bench.pipeline_env(url, topic, group, port), kafka=target,
        ready_marker=READY_LOG, metrics_ports=ports, timeout=o.latency_seconds + bench.timeout, on_ready=on_ready,
        profile_out=profile_path(o.profile, "latency") if o.profile else None,
    )
    for task in tasks:
        await task
    return _outcome(bench, rate, run, stream, await bench.count_rows(url))


def _outcome(bench: "Bench", rate: float, run: ProcessRun, stream: _LiveStream, rows: int) -> dict[str, Any]:
    o = bench.o
    out: dict[str, Any] = {"offered_rate": round(rate, 1), "duration_s": o.latency_seconds,
                           "warmup_s": o.latency_warmup, "rows_stored": rows, "readings_sent": stream.sent}
    failure = None
    if run.exit_code != 0 or run.timed_out:
        failure = f"pipeline exited with status {run.exit_code}" + (" after the timeout" if run.timed_out else "")
    elif rows != stream.sent:
        failure = f"stored {rows} rows, expected {stream.sent}"
    elif not run.metrics_text or stream.warm is None:
        failure = "no metrics scraped after the warm-up (run longer than --latency-warmup)"
    if failure is not None or stream.warm is None:
        out.update(status="failed", reason=failure)
        return out
    h = report.histogram(run.metrics_text, _HISTOGRAM).minus(report.histogram(stream.warm, _HISTOGRAM))
    out.update(
        status="ok", reason=None, readings=int(h.count),
        achieved_rate=round((stream.sent - stream.warm_sent) / stream.measured_s, 1),
        p50_s=report.quantile(h, 0.50), p95_s=report.quantile(h, 0.95), p99_s=report.quantile(h, 0.99),
        mean_s=h.total / h.count if h.count else None,
        buckets_s=[le for le, _ in h.buckets if le != float("inf")],
        cpu_s=round(run.cpu_s, 3), peak_rss_mb=round(run.peak_rss_mb, 1),
        internals=report.pipeline_internals(run.metrics_text),
    )
    return out
