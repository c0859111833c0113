"""Where ``fleet replay`` reads from: files (NDJSON or CSV, plain or gzip) and Kafka ranges.

A source is read as a sequence of :class:`Chunk` objects: consecutive pieces of its
input, each with the position *after* it, so the replay can checkpoint once a chunk is
written and resume from there. Only the chunks in flight are in memory, whatever the
size of the input.

A chunk's payload is raw: :class:`Lines` (whole lines of a file, parsed by
:func:`messages`, usually in a worker process) or :class:`Records` (Kafka records).
:func:`messages` turns either into the ``(key, value, source)`` triples that
:func:`fleet_telemetry.consumers.decode.decode_message` takes, so files go through exactly the same
decoding as the telemetry topic.

File formats (docs/replay.md):

* NDJSON: one reading object per line, exactly as the Kafka message value (an array of
  readings on one line is accepted too). Blank lines are skipped.
* CSV: a header row naming the columns (any order; unknown columns are ignored), then
  one reading per row. An empty cell is an absent field; see :func:`csv_row_to_reading`.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import itertools
import os
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.deadletter import HEADER_INDEX, HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_TOPIC
from fleet_telemetry.core.errors import ServiceUnavailable, UsageError
from fleet_telemetry.core.reading import INVALID_READING, Rejection, Source
from fleet_telemetry.core.settings import Settings

NDJSON: Final = "ndjson"
CSV: Final = "csv"
FORMATS: Final = (NDJSON, CSV)

CSV_REQUIRED: Final = ("vehicle_id", "time", "lat", "lon")
CSV_NUMBERS: Final = ("lat", "lon", "speed", "fuel_level", "heading", "odometer_km")
CSV_COLUMNS: Final = (*CSV_REQUIRED, "speed", "fuel_level", "heading", "odometer_km", "engine_status")

_GZIP_MAGIC: Final = b"\x1f\x8b"
_BOM: Final = b"\xef\xbb\xbf"
_SKIP_BLOCK: Final = 1 << 20


# --- chunks ------------------------------------------------------------------


@dataclass(slots=True)
class Lines:
    """Whole lines of a file, as read; line ``first_line`` is the first of ``data``."""

    name: str
    fmt: str
    first_line: int
    data: bytes
    columns: tuple[str, ...] = ()
    """The CSV header's column names (empty for NDJSON)."""


@dataclass(slots=True)
class Records:
    """Kafka records: ``(key, value, source, dead-letter headers or None)``."""

    items: list[tuple[bytes | None, bytes | None, Source, dict[str, str] | None]] = field(default_factory=list)


@dataclass(slots=True)
class Chunk:
    payload: Lines | Records
    position: dict[str, Any]
    """Where the source stands after this chunk (JSON-able; what a checkpoint stores)."""
    units: int
    """Progress units consumed by this chunk: file bytes, or Kafka records."""
    count: int
    """Lines or records in the chunk (what ``--rate`` paces)."""


Message = tuple[bytes | None, bytes, Source, dict[str, str] | None]
"""One record to decode: key, value, where it is, and the dead-letter headers (if any)."""


# --- parsing payloads (pure) ----------------------------------------------------


def messages(payload: Lines | Records, rejections: list[Rejection]) -> Iterator[Message]:
    """The messages of a chunk, in order. CSV rows that cannot be a reading at all (more
    cells than the header names) are appended to ``rejections`` instead."""
    if isinstance(payload, Records):
        for key, value, source, dead_letter in payload.items:
            yield key, value or b"", source, dead_letter
    elif payload.fmt == CSV:
        yield from _csv_messages(payload, rejections)
    else:
        line_no = payload.first_line
        data = payload.data
        if line_no == 1 and data.startswith(_BOM):
            data = data[len(_BOM):]
        for line in data.split(b"\n"):
            if line.strip():
                yield None, line, Source(payload.name, 0, line_no), None
            line_no += 1


def _csv_messages(payload: Lines, rejections: list[Rejection]) -> Iterator[Message]:
    columns = payload.columns
    text = payload.data.decode("utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    last_line = 0
    for row in reader:
        line_no = payload.first_line + last_line
        last_line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        source = Source(payload.name, 0, line_no)
        if len(row) > len(columns):
            raw = _csv_line(row)
            rejections.append(Rejection(
                INVALID_READING, f"the row has {len(row)} cells, the header names {len(columns)} columns",
                source, None, raw,
            ))
            continue
        yield None, orjson.dumps(csv_row_to_reading(columns, row)), source, None


def _csv_line(row: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(row)
    return out.getvalue().encode()


def csv_row_to_reading(columns: tuple[str, ...], row: list[str]) -> dict[str, Any]:
    """A CSV row as a reading object, for :func:`fleet_telemetry.consumers.decode.decode_message` to judge.

    Empty cells are absent fields. ``lat``, ``lon``, ``speed``, ``fuel_level``,
    ``heading`` and ``odometer_km`` become numbers when they parse as one; ``time`` is
    epoch milliseconds when it is an integer, RFC 3339 text otherwise; ``engine_status``
    is parsed as a JSON object. A cell that does not convert stays text, so the decoder
    rejects it with the same sentence as a bad JSON field.
    """
    obj: dict[str, Any] = {}
    for name, cell in zip(columns, row):
        if cell == "":
            continue
        if name in CSV_NUMBERS:
            try:
                obj[name] = float(cell)
            except ValueError:
                obj[name] = cell
        elif name == "time":
            stripped = cell.strip()
            obj[name] = int(stripped) if stripped.lstrip("-").isdigit() else cell
        elif name == "engine_status":
            try:
                obj[name] = orjson.loads(cell)
            except orjson.JSONDecodeError:
                obj[name] = cell
        else:
            obj[name] = cell
    return obj


# --- files --------------------------------------------------------------------


class FileSource:
    """An NDJSON or CSV file, plain or gzip (detected by its first bytes).

    Position: ``{"line": lines consumed, "offset": uncompressed bytes consumed, "units":
    file bytes consumed}``. Resuming seeks to ``offset`` (a gzip file is decompressed and
    skipped up to it).
    """

    kind = "file"

    def __init__(self, path: str, fmt: str | None, chunk_lines: int) -> None:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
        self.path = path
        self.name = os.path.basename(path)
        self.fmt = fmt or self._format_from_name(path)
        self.chunk_lines = chunk_lines
        stat = os.stat(path)
        self.total: int | None = stat.st_size
        self._fingerprint = {
            "file": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": self.fmt,
        }
        with open(path, "rb") as raw:
            self.gzip = raw.read(2) == _GZIP_MAGIC

    @staticmethod
    def _format_from_name(path: str) -> str:
        name = path.lower()
        if name.endswith(".gz"):
            name = name[:-3]
        if name.endswith((".ndjson", ".jsonl", ".json")):
            return NDJSON
        if name.endswith(".csv"):
            return CSV
        raise UsageError(f"{path}: cannot tell the format from the name; pass --format ndjson or --format csv")

    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)

    def describe(self) -> str:
        return f"{self.path} ({self.fmt}{', gzip' if self.gzip else ''})"

    async def chunks(self, resume: dict[str, Any] | None) -> AsyncGenerator[Chunk, None]:
        """Chunks of about ``chunk_lines`` lines from ``resume`` (or the start) to the end."""
        for chunk in self._read(resume):
            yield chunk
            await asyncio.sleep(0)

    def _read(self, resume: dict[str, Any] | None) -> Iterator[Chunk]:
        with open(self.path, "rb") as raw:
            stream: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb") if self.gzip else raw
            line, offset = 0, 0
            columns: tuple[str, ...] = ()
            try:
                if self.fmt == CSV:
                    header = stream.readline()
                    columns = self._columns(header)
                    line, offset = 1, len(header)
                if resume:
                    self._skip(raw, stream, offset, int(resume["offset"]))
                    line, offset = int(resume["line"]), int(resume["offset"])
                units_done = raw.tell()
                while True:
                    lines = list(itertools.islice(stream, self.chunk_lines))
                    if not lines:
                        return
                    data = b"".join(lines)
                    if self.fmt == CSV:
                        # A quoted cell may hold a line break: never cut inside quotes.
                        while data.count(b'"') % 2:
                            more = stream.readline()
                            if not more:
                                break
                            lines.append(more)
                            data += more
                    position = {"line": line + len(lines), "offset": offset + len(data)}
                    units = raw.tell()
                    position["units"] = units
                    yield Chunk(Lines(self.path, self.fmt, line + 1, data, columns), position,
                                units - units_done, len(lines))
                    units_done = units
                    line += len(lines)
                    offset += len(data)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise UsageError(f"{self.path}: cannot read past line {line}: {exc}") from None
            finally:
                if stream is not raw:
                    stream.close()

    def _skip(self, raw: io.BufferedReader, stream: io.BufferedIOBase, at: int, offset: int) -> None:
        """Move ``stream`` from byte ``at`` to byte ``offset`` of the (uncompressed) file."""
        if stream is raw:
            raw.seek(offset)
            return
        while at < offset:
            block = stream.read(min(_SKIP_BLOCK, offset - at))
            if not block:
                raise UsageError(f"{self.path}: shorter than its checkpoint; it changed, run with --restart")
            at += len(block)

    def _columns(self, header: bytes) -> tuple[str, ...]:
        try:
            row = next(csv.reader([header.decode("utf-8-sig").strip("\r\n")]))
        except (StopIteration, UnicodeDecodeError):
            row = []
        columns = tuple(name.strip() for name in row)
        missing = [name for name in CSV_REQUIRED if name not in columns]
        if missing:
            raise UsageError(
                f"{self.path}: the CSV header lacks column(s) {', '.join(missing)}; "
                f"it must name {', '.join(CSV_REQUIRED)} (optional: {', '.join(CSV_COLUMNS[4:])})"
            )
        return columns


# --- Kafka --------------------------------------------------------------------


def parse_time(text: str, flag: str) -> datetime:
    """``--since``/``--until``: RFC 3339 with an offset, or integer epoch milliseconds."""
    stripped = text.strip()
    if stripped.lstrip("-").isdigit():
        return datetime.fromtimestamp(int(stripped) / 1000, tz=timezone.utc)
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not an RFC 3339 time (2026-11-01T00:00:00Z) or epoch milliseconds") from None
    if moment.tzinfo is None:
        raise UsageError(f"{flag} {text!r} has no UTC offset; add Z or +HH:MM")
    return moment.astimezone(timezone.utc)


@dataclass(frozen=True)
class KafkaRange:
    """Which records of a topic to replay. Offsets are per partition, ``to_offset``
    exclusive; times compare with each record's timestamp, ``until`` exclusive."""

    topic: str
    partitions: tuple[int, ...] = ()
    from_offset: int | None = None
    to_offset: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    reasons: tuple[str, ...] = ()
    """Dead letters only: replay the records whose ``fleet.error.reason`` is one of these."""
    dead_letters: bool = False


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


class KafkaSource:
    """A range of a Kafka topic (the telemetry topic, another one, or the dead letters).

    Each selected partition is read from its start (``from_offset``, or the first
    offset at or after ``since`` where the broker can look offsets up by time, or the
    beginning) to its stop (``to_offset``, or its end when the replay started: the larger
    of ListOffsets and the first fetch's high watermark, as some brokers answer
    ListOffsets late). Records outside ``since``/``until`` are skipped by their own
    timestamps, so the result is exact even where the broker cannot look times up.

    Position: ``{"next": {partition: next offset}, "stop": {partition: stop offset}}``.
    """

    kind = "kafka"

    def __init__(self, settings: Settings, spec: KafkaRange, chunk_records: int) -> None:
        self.settings = settings
        self.spec = spec
        self.chunk_records = chunk_records
        self.total: int | None = None
        self.name = spec.topic

    def fingerprint(self) -> dict[str, Any]:
        s = self.spec
        return {
            "topic": s.topic, "partitions": list(s.partitions), "from_offset": s.from_offset,
            "to_offset": s.to_offset, "since": _ms(s.since), "until": _ms(s.until),
            "reasons": sorted(s.reasons), "dead_letters": s.dead_letters,
        }

    def describe(self) -> str:
        s = self.spec
        parts = [("dead letters " if s.dead_letters else "topic ") + s.topic]
        if s.partitions:
            parts.append("partitions " + ",".join(map(str, s.partitions)))
        if s.from_offset is not None or s.to_offset is not None:
            parts.append(f"offsets [{s.from_offset if s.from_offset is not None else 'start'}, "
                         f"{s.to_offset if s.to_offset is not None else 'end'})")
        if s.since or s.until:
            parts.append(f"times [{s.since.isoformat() if s.since else 'start'}, "
                         f"{s.until.isoformat() if s.until else 'end'})")
        if s.reasons:
            parts.append("reasons " + ",".join(s.reasons))
        return ", ".join(parts)

    async def chunks(self, resume: dict[str, Any] | None) -> AsyncGenerator[Chunk, None]:
        """Chunks of at most ``chunk_records`` records until every partition reached its stop."""
        spec = self.spec
        consumer = AIOKafkaConsumer(
            enable_auto_commit=False, group_id=None, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            **self.settings.kafka_client_options(),  # type: ignore[arg-type]
        )
        try:
            await consumer.start()
        except Exception as exc:
            await consumer.stop()
            raise ServiceUnavailable(
                f"Kafka at {self.settings.kafka_bootstrap} is not answering ({type(exc).__name__});"
                " start it (fleet services up) or set FLEET_KAFKA_BOOTSTRAP"
            ) from None
        try:
            tps = await self._partitions(consumer)
            consumer.assign(tps)
            listed = await consumer.end_offsets(tps)
            starts, nexts, stops = await self._bounds(consumer, tps, resume)
            for tp in tps:
                consumer.seek(tp, nexts[tp])
            since, until = _ms(spec.since), _ms(spec.until)
            while True:
                for tp in tps:
                    if tp not in stops:
                        # The end as of the start of the replay: the larger of ListOffsets
                        # and the first fetch's high watermark (see the class docstring).
                        highwater = consumer.highwater(tp)
                        if highwater is not None:
                            stops[tp] = max(highwater, listed[tp])
                if self.total is None and len(stops) == len(tps):
                    self.total = sum(max(0, stops[tp] - starts[tp]) for tp in tps)
                active = [tp for tp in tps if not self._done(consumer, tp, nexts, stops)]
                if not active:
                    return
                fetched = await consumer.getmany(*active, timeout_ms=500, max_records=self.chunk_records)
                records = Records()
                units = 0
                for tp, batch in fetched.items():
                    stop = stops.get(tp)
                    for record in batch:
                        if stop is not None and record.offset >= stop:
                            break
                        nexts[tp] = record.offset + 1
                        units += 1
                        if since is not None and record.timestamp < since:
                            continue
                        if until is not None and record.timestamp >= until:
                            continue
                        self._add(records, tp, record)
                for tp in active:
                    # Offsets without a record (transaction markers, compacted records)
                    # still move the position, so a range ending on them finishes.
                    position_now = await consumer.position(tp)
                    stop = stops.get(tp)
                    nexts[tp] = max(nexts[tp], position_now if stop is None else min(stop, position_now))
                if units:
                    position = {"next": {str(tp.partition): nexts[tp] for tp in tps},
                                "stop": {str(tp.partition): stops[tp] for tp in tps if tp in stops}}
                    yield Chunk(records, position, units, units)
        finally:
            await consumer.stop()

    def _add(self, records: Records, tp: TopicPartition, record: Any) -> None:
        dead_letter: dict[str, str] | None = None
        if self.spec.dead_letters:
            headers = {k: v.decode("utf-8", "replace") for k, v in (record.headers or ())}
            if self.spec.reasons and headers.get(HEADER_REASON) not in self.spec.reasons:
                return
            dead_letter = {
                name: headers[header]
                for name, header in (("reason", HEADER_REASON), ("topic", HEADER_TOPIC),
                                     ("partition", HEADER_PARTITION), ("offset", HEADER_OFFSET),
                                     ("index", HEADER_INDEX))
                if header in headers
            }
        records.items.append((record.key, record.value, Source(tp.topic, tp.partition, record.offset), dead_letter))

    def _done(self, consumer: AIOKafkaConsumer, tp: TopicPartition, nexts: dict[TopicPartition, int],
              stops: dict[TopicPartition, int]) -> bool:
        stop = stops.get(tp)
        if stop is not None and nexts[tp] >= stop:
            return True
        # Nothing more exists right now (a --to-offset beyond the end stops at the end).
        highwater = consumer.highwater(tp)
        return stop is not None and highwater is not None and nexts[tp] >= highwater

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        topic = self.spec.topic
        await consumer.topics()
        available = consumer.partitions_for_topic(topic)
        if not available:
            raise UsageError(f"topic {topic!r} does not exist on {self.settings.kafka_bootstrap}")
        wanted = self.spec.partitions or tuple(sorted(available))
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise UsageError(
                f"topic {topic!r} has no partition {', '.join(map(str, missing))} "
                f"(it has {', '.join(map(str, sorted(available)))})"
            )
        return [TopicPartition(topic, p) for p in wanted]

    async def _bounds(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition], resume: dict[str, Any] | None
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int], dict[TopicPartition, int]]:
        """(first offset of the range, next offset to read, stop offsets known now) per partition."""
        spec = self.spec
        beginning = await consumer.beginning_offsets(tps)
        starts: dict[TopicPartition, int] = {}
        for tp in tps:
            start = beginning[tp]
            if spec.from_offset is not None:
                start = max(start, spec.from_offset)
            starts[tp] = start
        if spec.since is not None:
            since = _ms(spec.since)
            assert since is not None
            found = await consumer.offsets_for_times({tp: since for tp in tps})
            for tp, answer in found.items():
                # Only an answer that is an offset with a real timestamp at or after
                # ``since`` can be trusted; anything else (a broker that cannot look
                # times up answers offset 0 with timestamp -1) means: read and filter.
                if answer is not None and answer.offset >= 0 and answer.timestamp >= since:
                    starts[tp] = max(starts[tp], answer.offset)
        stops: dict[TopicPartition, int] = {}
        if spec.to_offset is not None:
            stops = {tp: spec.to_offset for tp in tps}
        if not resume:
            return starts, dict(starts), stops
        nexts = {tp: int(resume["next"].get(str(tp.partition), starts[tp])) for tp in tps}
        saved = resume.get("stop", {})
        stops = {tp: int(saved[str(tp.partition)]) for tp in tps if str(tp.partition) in saved}
        return {tp: min(starts[tp], nexts[tp]) for tp in tps}, nexts, stops
