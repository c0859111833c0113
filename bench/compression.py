"""What the producer's codec costs: the dataset produced with each codec, then read back.

For every codec aiokafka can use here, the benchmark publishes the dataset to a topic of
its own with that codec (timing the producer and its CPU), then runs the ``fetch`` probe
(:func:`bench.contestants.fetch`) over it: reading every record, decompressing and
parsing, touching the values and nothing else, so the difference between codecs is what
the consumer pays for decompression. It does so twice (:data:`REGIMES`): in the
dataset's big producer batches, where a codec's cost per batch is spread over thousands
of readings, and with one reading per batch, where it is not. The bytes on the wire are
measured by building the records into record batches with aiokafka's own batch builder.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import codec as aiokafka_codec
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from bench import dataset
from bench.measure import run_contestant

if TYPE_CHECKING:
    from bench.suite import Bench

CODECS = ("gzip", "lz4", "zstd", "snappy", "none")
WIRE_BATCH = 16 * 1024
"""Record batch size for the bytes-on-the-wire figure: aiokafka's default ``max_batch_size``."""

_ATTRIBUTES = {
    "none": DefaultRecordBatch.CODEC_NONE, "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY, "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}
_AVAILABLE = {
    "none": lambda: True, "gzip": aiokafka_codec.has_gzip, "snappy": aiokafka_codec.has_snappy,
    "lz4": aiokafka_codec.has_lz4, "zstd": aiokafka_codec.has_zstd,
}


def codec_missing(codec: str) -> str | None:
    """Why aiokafka cannot use ``codec`` here, or ``None`` if it can."""
    if codec not in _AVAILABLE:
        return f"unknown codec {codec!r}"
    if _AVAILABLE[codec]():
        return None
    return f"aiokafka needs cramjam for {codec} (pip install 'aiokafka[{codec}]')"


def producer_codec(codec: str) -> str | None:
    """The ``compression_type`` aiokafka takes for ``codec`` (``"none"`` is ``None``)."""
    return None if codec == "none" else codec


def producer_codec_name(compression_type: str | None) -> str:
    """The codec's name for a producer's ``compression_type`` (``None`` is ``"none"``)."""
    return compression_type or "none"


def wire_bytes(messages: Iterable[tuple[bytes, bytes]], codec: str, batch_size: int = WIRE_BATCH) -> int:
    """Bytes of ``messages`` as record batches of up to ``batch_size`` bytes compressed with ``codec``."""
    total = 0

    def builder() -> Any:
        return DefaultRecordBatchBuilder(magic=2, compression_type=_ATTRIBUTES[codec], is_transactional=0,
                                         producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                         batch_size=batch_size)

    batch, offset = builder(), 0
    for key, value in messages:
        if batch.append(offset, timestamp=None, key=key, value=value, headers=[]) is None:
            total += len(batch.build())
            batch, offset = builder(), 0
            batch.append(offset, timestamp=None, key=key, value=value, headers=[])
        offset += 1
    if offset:
        total += len(batch.build())
    return total


REGIMES = (
    # (name, readings at most, producer batch bytes, linger ms, wire batch bytes)
    ("dataset", None, 1024 * 1024, 50, WIRE_BATCH),
    ("one_per_batch", 20_000, 512, 5, 512),
)
"""How the probe produces: the dataset's big batches, and one reading per batch (what a
gateway sending its readings one at a time produces), on at most 20,000 readings."""


async def measure_codecs(bench: "Bench", path: Path, codecs: Iterable[str]) -> dict[str, Any]:
    """Each codec's producer and fetch cost over the dataset at ``path``, per regime of
    :data:`REGIMES`: ``{codec: {"status": ..., regime: result}}``."""
    out: dict[str, Any] = {}
    for codec in codecs:
        missing = codec_missing(codec)
        if missing is not None:
            out[codec] = {"status": "skipped", "reason": missing}
            bench.say(f"codec {codec}: skipped: {missing}")
            continue
        out[codec] = {"status": "ok", "reason": None}
        for regime, most, batch, linger, wire_batch in REGIMES:
            result = await _probe(bench, path, codec, regime, most, batch, linger, wire_batch)
            out[codec][regime] = result
            if result["status"] != "ok":
                out[codec].update(status="failed", reason=f"{regime}: {result['reason']}")
            bench.say(f"codec {codec}, {regime}: {result['wire_bytes_per_reading']} bytes/reading on the wire,"
                      f" producer {result['producer_cpu_us_per_reading']} us/reading, fetch"
                      f" {result['fetch_cpu_us_per_reading']} us/reading of CPU")
    return out


async def _probe(bench: "Bench", path: Path, codec: str, regime: str, most: int | None, batch: int, linger: int,
                 wire_batch: int) -> dict[str, Any]:
    readings = min(bench.o.readings, most or bench.o.readings)

    def messages() -> Iterable[tuple[bytes, bytes]]:
        for i, value in enumerate(dataset.read_dataset(path)):
            if i == readings:
                break
            yield dataset.reading_key(value), value

    size = wire_bytes(messages(), codec, wire_batch)
    topic = await bench.new_topic(f"codec-{codec}-{regime.replace('_', '-')}")
    cpu, started = time.process_time(), time.monotonic()
    ends = await dataset.produce(bench.s, topic, messages(), producer_codec(codec), linger_ms=linger,
                                 max_batch_size=batch)
    produce_s, produce_cpu = time.monotonic() - started, time.process_time() - cpu
    cmd = [sys.executable, "-m", "bench.contestants", "fetch", "--bootstrap", bench.s.kafka_bootstrap,
           "--topic", topic, "--ends", ",".join(f"{p}:{n}" for p, n in sorted(ends.items()))]
    run = await run_contestant(cmd, bench.child_env(), timeout=bench.timeout)
    done = next((e for e in run.events if e["event"] == "done"), {})
    result: dict[str, Any] = {
        "status": "ok", "reason": None, "readings": readings,
        "wire_bytes_per_reading": round(size / readings, 1),
        "produce_s": round(produce_s, 2),
        "producer_cpu_us_per_reading": round(produce_cpu / readings * 1e6, 2),
        "fetch_s": None if run.wall_s is None else round(run.wall_s, 3),
        "fetch_cpu_us_per_reading": round(run.cpu_s / readings * 1e6, 2),
        "fetch_readings_per_s": round(readings / run.wall_s, 1) if run.wall_s else None,
    }
    if run.exit_code != 0 or done.get("records") != readings:
        tail = " | ".join(run.stderr_tail[-3:])
        result.update(status="failed", reason=f"fetch probe exited with status {run.exit_code} after"
                      f" {done.get('records')} of {readings} records; {tail}")
    return result
