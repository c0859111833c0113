"""Where ``fleet replay`` reads Kafka from: a range of a topic, or of the dead-letter topic.

:class:`KafkaRange` says which records (partitions, offsets, record times, dead-letter
reasons); :class:`KafkaSource` reads them as :class:`~fleet_telemetry.replay.sources.Chunk`
objects of :class:`~fleet_telemetry.replay.sources.Records`. Everything that touches the
Kafka consumer is in :class:`KafkaSource`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.deadletter import HEADER_INDEX, HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_TOPIC
from fleet_telemetry.core.errors import UsageError, unavailable
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
    beginning) to its stop (``to_offset``, or its end when the replay started: the larger
    of ListOffsets and the first fetch's high watermark, as some brokers answer
    ListOffsets late). Records outside ``since``/``until`` are skipped by their own
    timestamps, so the result is exact even where the broker cannot look times up.
    Nothing is committed: the consumer has no group.

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
        consumer = await self._start()
        try:
            tps = await self._partitions(consumer)
            consumer.assign(tps)
            listed = await consumer.end_offsets(tps)
            starts, nexts, stops = await self._bounds(consumer, tps, resume)
            for tp in tps:
                consumer.seek(tp, nexts[tp])
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
                records, units = self._take(fetched, nexts, stops)
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

    async def _start(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            enable_auto_commit=False, group_id=None, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            **self.settings.kafka_client_options(),
        )
        try:
            await consumer.start()
        except Exception as exc:
            await consumer.stop()
            raise unavailable("Kafka", self.settings.kafka_bootstrap, exc) from None
        return consumer

    def _take(self, fetched: dict[TopicPartition, list[Any]], nexts: Offsets, stops: Offsets) -> tuple[Records, int]:
        """The fetched records before each partition's stop and inside the time range, and
        how many records were consumed (also those skipped); moves ``nexts`` past them."""
        since, until = _ms(self.spec.since), _ms(self.spec.until)
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
        return records, units

    def _add(self, records: Records, tp: TopicPartition, record: Any) -> None:
        dead_letter: dict[str, str] | None = None
        if self.spec.dead_letters:
            headers = {k: v.decode("utf-8", "replace") for k, v in (record.headers or ())}
            dead_letter = dead_letter_headers(headers, self.spec.reasons)
            if dead_letter is None:
                return
        records.items.append((record.key, record.value, Source(tp.topic, tp.partition, record.offset), dead_letter))

    def _done(self, consumer: AIOKafkaConsumer, tp: TopicPartition, nexts: Offsets, stops: Offsets) -> bool:
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
    ) -> tuple[Offsets, Offsets, Offsets]:
        """(first offset of the range, next offset to read, stop offsets known now) per partition."""
        spec = self.spec
        beginning = await consumer.beginning_offsets(tps)
        starts: Offsets = {}
        for tp in tps:
            start = beginning[tp]
            if spec.from_offset is not None:
                start = max(start, spec.from_offset)
            starts[tp] = start
        since = _ms(spec.since)
        if since is not None:
            found = await consumer.offsets_for_times({tp: since for tp in tps})
            for tp, answer in found.items():
                # Only an answer that is an offset with a real timestamp at or after
                # ``since`` can be trusted; anything else (a broker that cannot look
                # times up answers offset 0 with timestamp -1) means: read and filter.
                if answer is not None and answer.offset >= 0 and answer.timestamp >= since:
                    starts[tp] = max(starts[tp], answer.offset)
        stops: Offsets = {}
        if spec.to_offset is not None:
            stops = {tp: spec.to_offset for tp in tps}
        if not resume:
            return starts, dict(starts), stops
        nexts = {tp: int(resume["next"].get(str(tp.partition), starts[tp])) for tp in tps}
        saved = resume.get("stop", {})
        stops = {tp: int(saved[str(tp.partition)]) for tp in tps if str(tp.partition) in saved}
        return {tp: min(starts[tp], nexts[tp]) for tp in tps}, nexts, stops
