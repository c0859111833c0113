"""The dead-letter topic read back for an operator, without a consumer group.

Reads ``FLEET_DLQ_TOPIC`` through the replay's Kafka source (assign and seek in the
shared Kafka loop): nothing is committed, no group appears on the broker, nothing is
written anywhere. ``since`` is applied to each record's own timestamp, so the answer is
exact also where the broker answers time look-ups wrongly (it then reads from the
start). Headers: docs/interface.md, "Dead letters".
"""

from __future__ import annotations

import base64
import contextlib
import heapq
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fleet_telemetry.consumers.deadletter import (
    HEADER_DETAIL,
    HEADER_FAILED_AT,
    HEADER_INDEX,
    HEADER_KEY_SHA256,
    HEADER_KEY_SIZE,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    HEADER_TRUNCATED,
    HEADER_VALUE_SHA256,
    HEADER_VALUE_SIZE,
)
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.replay.kafka_source import KafkaRange, KafkaSource

_CHUNK = 1000


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    time: datetime
    """The record's timestamp (when it was dead-lettered)."""
    key: bytes | None
    value: bytes
    headers: dict[str, str]

    @property
    def reason(self) -> str:
        return self.headers.get(HEADER_REASON, "?")

    @property
    def detail(self) -> str:
        return self.headers.get(HEADER_DETAIL, "")

    @property
    def source(self) -> str:
        """``topic[partition]@offset`` (``#index`` inside an array message)."""
        h = self.headers
        where = f"{h.get(HEADER_TOPIC, '?')}[{h.get(HEADER_PARTITION, '?')}]@{h.get(HEADER_OFFSET, '?')}"
        return where + (f"#{h[HEADER_INDEX]}" if HEADER_INDEX in h else "")

    @property
    def at(self) -> str:
        """``PARTITION:OFFSET`` on the dead-letter topic, what ``dead-letters show`` takes."""
        return f"{self.partition}:{self.offset}"

    def as_json(self, value_limit: int | None = None) -> dict[str, Any]:
        """JSON-ready; the value as text when it is UTF-8 (else ``value_base64``), cut to
        ``value_limit`` characters when given."""
        h = self.headers
        truncated = None
        if HEADER_TRUNCATED in h:
            truncated = {"what": h[HEADER_TRUNCATED], "value_size": _int(h.get(HEADER_VALUE_SIZE)),
                         "value_sha256": h.get(HEADER_VALUE_SHA256), "key_size": _int(h.get(HEADER_KEY_SIZE)),
                         "key_sha256": h.get(HEADER_KEY_SHA256)}
        shown: dict[str, Any] = {
            "at": self.at, "partition": self.partition, "offset": self.offset, "time": self.time.isoformat(),
            "reason": self.reason, "detail": self.detail, "source": {
                "topic": h.get(HEADER_TOPIC), "partition": _int(h.get(HEADER_PARTITION)),
                "offset": _int(h.get(HEADER_OFFSET)), "index": _int(h.get(HEADER_INDEX))},
            "failed_at": h.get(HEADER_FAILED_AT), "truncated": truncated,
            "key": None if self.key is None else self.key.decode("utf-8", "replace"),
            "value_size": len(self.value),
        }
        try:
            text = self.value.decode("utf-8")
        except UnicodeDecodeError:
            shown["value_base64"] = base64.b64encode(self.value).decode()
        else:
            shown["value"] = text if value_limit is None else cut(text, value_limit)
        return shown


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def cut(text: str, limit: int) -> str:
    """``text`` at most ``limit`` characters long, ``...`` marking a cut."""
    return text if len(text) <= limit else text[:max(limit - 3, 0)] + "..."


def _letter(partition: int, record: Any) -> DeadLetter:
    return DeadLetter(
        partition, record.offset, datetime.fromtimestamp(record.timestamp / 1000, tz=timezone.utc), record.key,
        record.value or b"", {k: v.decode("utf-8", "replace") for k, v in (record.headers or ())})


async def newest(settings: Settings, *, reasons: tuple[str, ...] = (), since: datetime | None = None,
                 limit: int = 50) -> tuple[list[DeadLetter], int]:
    """The newest ``limit`` dead letters (of ``reasons``, since ``since``), newest first,
    and how many matched in all. Reads the topic to its end as of now.

    Raises ``UsageError`` when the topic does not exist, ``ServiceUnavailable`` when the
    broker does not answer.
    """
    source = KafkaSource(settings, KafkaRange(settings.dlq_topic, since=since, reasons=reasons, dead_letters=True),
                         _CHUNK)
    kept: list[tuple[int, int, int, Any]] = []
    matched = 0
    async with contextlib.aclosing(source.records()) as records:
        async for tp, record in records:
            matched += 1
            entry = (record.timestamp, tp.partition, record.offset, record)
            if len(kept) < limit:
                heapq.heappush(kept, entry)
            elif entry[:3] > kept[0][:3]:
                heapq.heapreplace(kept, entry)
    letters = [_letter(p, r) for _, p, _, r in sorted(kept, key=lambda e: e[:3], reverse=True)]
    return letters, matched


def parse_at(text: str) -> tuple[int, int]:
    """``PARTITION:OFFSET`` -> numbers; raises UsageError."""
    partition, colon, offset = text.strip().partition(":")
    if not colon or not partition.isdigit() or not offset.isdigit():
        raise UsageError(f"expected PARTITION:OFFSET of the dead-letter topic (e.g. 0:42), not {text!r}"
                         " (see 'fleet dead-letters list')")
    return int(partition), int(offset)


async def one(settings: Settings, partition: int, offset: int) -> DeadLetter:
    """The dead letter at ``partition:offset``; raises UsageError when there is none."""
    source = KafkaSource(settings, KafkaRange(settings.dlq_topic, partitions=(partition,), from_offset=offset,
                                              to_offset=offset + 1, dead_letters=True), 1)
    async with contextlib.aclosing(source.records()) as records:
        async for tp, record in records:
            if record.offset == offset:
                return _letter(tp.partition, record)
    raise UsageError(f"no dead letter at {partition}:{offset} of {settings.dlq_topic} (removed by retention,"
                     " or not written yet; see 'fleet dead-letters list')")


async def count_by_reason(settings: Settings, since: datetime) -> dict[str, int]:
    """How many dead letters each reason has had since ``since`` (by record timestamp).

    Raises as :func:`newest`.
    """
    source = KafkaSource(settings, KafkaRange(settings.dlq_topic, since=since, dead_letters=True), _CHUNK)
    counts: dict[str, int] = {}
    async with contextlib.aclosing(source.records()) as records:
        async for _, record in records:
            reason = next((v.decode("utf-8", "replace") for k, v in record.headers or () if k == HEADER_REASON), "?")
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))
