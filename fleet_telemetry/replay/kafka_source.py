"""Where ``fleet replay`` reads Kafka from: a range of a topic, or of the dead-letter topic.

:class:`KafkaRange` says which records (partitions, offsets, record times, dead-letter
reasons); :class:`KafkaSource` reads them as :class:`~fleet_telemetry.replay.sources.Chunk`
objects of :class:`~fleet_telemetry.replay.sources.Records`, through the shared Kafka
loop in assign-and-seek mode (:func:`fleet_telemetry.consumers.kafka_range.read_ranges`),
which owns the consumer, the end offsets and the positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.deadletter import HEADER_INDEX, HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_TOPIC
from fleet_telemetry.consumers.kafka_loop import LoopOptions, OffsetLookup, Ranges
from fleet_telemetry.consumers.kafka_range import Fetched, read_ranges
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.reading import Source
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.replay.sources import Chunk, Records

# The dead-letter headers a rejects line repeats, by the name it gives them.
_DEAD_LETTER_HEADERS = (
    ("reason", HEADER_REASON), ("topic", HEADER_TOPIC), ("partition", HEADER_PARTITION),
    ("offset", HEADER_OFFSET), ("index", HEADER_INDEX),
)

Offsets = dict[TopicPartition, int]


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


def dead_letter_headers(headers: dict[str, str], reasons: tuple[str, ...]) -> dict[str, str] | None:
    """What a rejects line repeats of a dead letter's headers; ``None`` when ``reasons``
    is given and the record's reason is not one of them."""
    if reasons and headers.get(HEADER_REASON) not in reasons:
        return None
    return {name: headers[header] for name, header in _DEAD_LETTER_HEADERS if header in headers}


class KafkaSource:
    """A range of a Kafka topic (the telemetry topic, another one, or the dead letters).

    Each selected partition is read from its start (``from_offset``, or the first
    offset at or after ``since`` where the broker can look offsets up by time, or the
    beginning) to its stop (``to_offset``, or its end when the replay started, as
    :class:`~fleet_telemetry.consumers.kafka_loop.Ranges` fixes it). Records outside
    ``since``/``until`` are skipped by their own timestamps, so the result is exact even
    where the broker cannot look times up. Nothing is committed: the read has no group.

    Position: ``{"next": {partition: next offset}, "stop": {partition: stop offset}}``.
    """

    def __init__(self, settings: Settings, spec: KafkaRange, chunk_records: int) -> None:
        self.settings = settings
        self.spec = spec
        self.chunk_records = chunk_records
        self.total: int | None = None

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
        """Chunks of at most ``chunk_records`` records until every partition reached its stop.

        Blocks on the broker; raises :class:`ServiceUnavailable` when it does not answer
        and :class:`UsageError` for a topic or partition that does not exist.
        """
        first: Offsets = {}
        async with contextlib.aclosing(self._fetches(resume, first)) as fetches:
            async for fetched in fetches:
                if self.total is None and len(fetched.end) == len(first):
                    self.total = sum(max(0, fetched.end[tp] - start) for tp, start in first.items())
                records, units = self._take(fetched)
                if units:
                    position = {"next": {str(tp.partition): n for tp, n in fetched.next.items()},
                                "stop": {str(tp.partition): fetched.end[tp] for tp in fetched.next
                                         if tp in fetched.end}}
                    yield Chunk(records, position, units, units)

    async def records(self) -> AsyncGenerator[tuple[TopicPartition, Any], None]:
        """Every record of the range with its partition, in fetch order (aiokafka
        ``ConsumerRecord``): those inside ``since``/``until`` and, for dead letters, of the
        reasons asked for. Raises as :meth:`chunks`; nothing is committed."""
        async with contextlib.aclosing(self._fetches(None, {})) as fetches:
            async for fetched in fetches:
                for tp, batch in fetched.records.items():
                    for record in batch:
                        if self._inside(record) and self._dead_letter(record) is not False:
                            yield tp, record

    async def _fetches(self, resume: dict[str, Any] | None, first: Offsets) -> AsyncGenerator[Fetched, None]:
        """The fetches of the range through the shared loop; ``first`` gets each
        partition's first offset once the read is planned."""

        async def plan(lookup: OffsetLookup) -> Ranges:
            tps = await self._partitions(lookup)
            starts, nexts, stops = await self._bounds(lookup, tps, resume)
            first.update(starts)
            return Ranges(nexts, stops)

        options = LoopOptions.from_settings(
            self.settings, topics=[self.spec.topic], group=None,
            consumer_options={"max_partition_fetch_bytes": 4 * 1024 * 1024},
            fetch_timeout_ms=500, seek=plan, retry_start=False,
        )
        async with contextlib.aclosing(read_ranges(options, room=self.chunk_records)) as fetches:
            async for fetched in fetches:
                yield fetched

    def _inside(self, record: Any) -> bool:
        """Whether the record's timestamp is inside ``since``/``until``."""
        since, until = _ms(self.spec.since), _ms(self.spec.until)
        return (since is None or record.timestamp >= since) and (until is None or record.timestamp < until)

    def _dead_letter(self, record: Any) -> dict[str, str] | None | Literal[False]:
        """What a rejects line repeats of a dead letter's headers; False for a dead letter
        of a reason not asked for, None when the range is not of dead letters."""
        if not self.spec.dead_letters:
            return None
        headers = {k: v.decode("utf-8", "replace") for k, v in (record.headers or ())}
        found = dead_letter_headers(headers, self.spec.reasons)
        return False if found is None else found

    def _take(self, fetched: Fetched) -> tuple[Records, int]:
        """The fetched records inside the time range (and of the reasons asked for), and
        how many records were consumed (also those skipped)."""
        records = Records()
        units = 0
        for tp, batch in fetched.records.items():
            units += len(batch)
            for record in batch:
                dead_letter = self._dead_letter(record) if self._inside(record) else False
                if dead_letter is False:
                    continue
                source = Source(tp.topic, tp.partition, record.offset)
                records.items.append((record.key, record.value, source, dead_letter))
        return records, units

    async def _partitions(self, lookup: OffsetLookup) -> list[TopicPartition]:
        topic = self.spec.topic
        available = await lookup.partitions(topic)
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
        self, lookup: OffsetLookup, tps: list[TopicPartition], resume: dict[str, Any] | None
    ) -> tuple[Offsets, Offsets, Offsets]:
        """(first offset of the range, next offset to read, stop offsets known now) per partition."""
        spec = self.spec
        beginning = await lookup.beginning_offsets(tps)
        starts: Offsets = {}
        for tp in tps:
            start = beginning[tp]
            if spec.from_offset is not None:
                start = max(start, spec.from_offset)
            starts[tp] = start
        since = _ms(spec.since)
        if since is not None:
            # Where the broker cannot look times up, the records are read and filtered.
            for tp, offset in (await lookup.offsets_at(tps, since)).items():
                starts[tp] = max(starts[tp], offset)
        stops: Offsets = {}
        if spec.to_offset is not None:
            stops = {tp: spec.to_offset for tp in tps}
        if not resume:
            return starts, dict(starts), stops
        nexts = {tp: int(resume["next"].get(str(tp.partition), starts[tp])) for tp in tps}
        saved = resume.get("stop", {})
        stops = {tp: int(saved[str(tp.partition)]) for tp in tps if str(tp.partition) in saved}
        return {tp: min(starts[tp], nexts[tp]) for tp in tps}, nexts, stops
