"""A consumer group's members and its lag per partition, in records and in seconds.

The group's members and committed offsets come from the broker's admin API
(DescribeGroups, OffsetFetch); the end offsets and the first record not yet consumed of
each lagging partition from one assign-and-seek read through the shared Kafka loop
(:func:`fleet_telemetry.consumers.kafka_range.read_ranges`), without a group. The lag
in seconds is the age of that record: how long the oldest unconsumed reading has waited.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from fleet_telemetry.consumers.kafka_loop import LoopOptions, OffsetLookup, Ranges
from fleet_telemetry.consumers.kafka_range import read_ranges
from fleet_telemetry.core.errors import UsageError, unavailable
from fleet_telemetry.core.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None
    """The group's committed offset; None when it never committed on this partition."""
    end: int
    lag: int
    """Records not consumed yet (from the committed offset, else from the first one kept)."""
    lag_seconds: float
    """Age of the oldest record not consumed yet; 0 when there is none."""


@dataclass
class GroupLag:
    group: str
    topic: str
    state: str
    members: list[str] = field(default_factory=list)
    partitions: list[PartitionLag] = field(default_factory=list)

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def lag_seconds(self) -> float:
        return max((p.lag_seconds for p in self.partitions), default=0.0)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "lag": self.lag, "lag_seconds": self.lag_seconds}


async def _members(admin: AIOKafkaAdminClient, group: str) -> tuple[str, list[str]]:
    """The group's state and its members (``client_id@host`` where the broker says, else the member id)."""
    (response,) = await admin.describe_consumer_groups([group])
    _, _, state, _, _, members = response.groups[0]
    return state or "unknown", [f"{m[1]}@{m[2]}" if m[1] else m[0] for m in members]


async def group_lag(settings: Settings, topic: str, group: str, now_ms: int, timeout: float = 5.0) -> GroupLag:
    """Members and per-partition lag of ``group`` on ``topic``.

    Raises ``UsageError`` when the topic does not exist and ``ServiceUnavailable`` when
    the broker does not answer.
    """
    admin = AIOKafkaAdminClient(**settings.kafka_client_options(),  # type: ignore[arg-type]
                                client_id="fleet-status", request_timeout_ms=int(timeout * 1000))
    try:
        await admin.start()
    except Exception as exc:
        await admin.close()
        raise unavailable("Kafka", settings.kafka_bootstrap, exc) from None
    try:
        state, members = await _members(admin, group)
        found = GroupLag(group, topic, state, members)
        committed: dict[TopicPartition, int | None] = {}
        starts: dict[TopicPartition, int] = {}

        async def plan(lookup: OffsetLookup) -> Ranges:
            tps = [TopicPartition(topic, p) for p in sorted(await lookup.partitions(topic))]
            if not tps:
                raise UsageError(f"topic {topic!r} does not exist on {settings.kafka_bootstrap}")
            beginning = await lookup.beginning_offsets(tps)
            offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
            for tp in tps:
                at = offsets.get(tp)
                committed[tp] = at.offset if at is not None and at.offset >= 0 else None
                starts[tp] = max(beginning[tp], committed[tp] or 0)
            return Ranges(dict(starts))

        # Each partition is read from where the group stands until its end is known (the
        # loop takes it from the fetch: some brokers list end offsets late) and its first
        # waiting record, if any, has come.
        oldest: dict[TopicPartition, int] = {}
        ends: dict[TopicPartition, int] = {}
        options = LoopOptions.from_settings(settings, topics=[topic], group=None, seek=plan, retry_start=False,
                                            consumer_options={"fetch_max_wait_ms": 100}, fetch_timeout_ms=100)
        async with contextlib.aclosing(read_ranges(options, room=100)) as fetches:
            async for fetched in fetches:
                for tp, records in fetched.records.items():
                    if records:
                        oldest.setdefault(tp, records[0].timestamp)
                ends.update(fetched.end)
                if len(ends) == len(starts) and all(tp in oldest or ends[tp] <= starts[tp] for tp in starts):
                    break
        for tp in sorted(starts, key=lambda t: t.partition):
            end = ends.get(tp, starts[tp])
            lag = max(0, end - starts[tp])
            age = max(0.0, (now_ms - oldest[tp]) / 1000) if lag and tp in oldest else 0.0
            found.partitions.append(PartitionLag(tp.partition, committed[tp], end, lag, round(age, 3)))
        return found
    finally:
        await admin.close()
