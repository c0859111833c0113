"""Where ``fleet replay`` reads from: the chunk types every source yields, and files
(NDJSON or CSV, plain or gzip). Kafka ranges are in :mod:`fleet_telemetry.replay.kafka_source`.

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
from typing import Any, Final, Protocol

import orjson

from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.reading import INVALID_READING, Rejection, Source

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


class ChunkSource(Protocol):
    """What a replay reads: a file or a range of a Kafka topic."""

    total: int | None
    """Progress units in the whole source (file bytes, Kafka records), once known."""

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source in a checkpoint (JSON-able)."""
        ...

    def describe(self) -> str:
        """The source in one line, for the summary."""
        ...

    def chunks(self, resume: dict[str, Any] | None) -> AsyncGenerator[Chunk, None]:
        """Chunks in source order, from the position ``resume`` (a chunk's ``position``) or the start."""
        ...


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

    def __init__(self, path: str, fmt: str | None, chunk_lines: int) -> None:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
        self.path = path
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
        """Chunks of about ``chunk_lines`` lines from ``resume`` (or the start) to the end;
        raises :class:`UsageError` when the file cannot be read (or no longer matches ``resume``)."""
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
