"""The webhook's pure parts (signatures, what a status means, the type filter) and the
consumer's strategy driven with a fake delivery: no services."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass

import pytest
from aiokafka.structs import TopicPartition
from pydantic import SecretStr

from fleet_telemetry.notify.consumer import NotifyStrategy
from fleet_telemetry.notify.delivery import SENT, Source, TypeFilter
from fleet_telemetry.notify.signing import HEADER_SIGNATURE, HEADER_TIMESTAMP, signature, verify
from fleet_telemetry.notify.webhook import Webhook, outcome_of

BODY = b'{"id":"e1","type":"alert.raised"}'


def test_the_signature_is_the_hmac_of_the_timestamp_and_the_body() -> None:
    expected = hmac.new(b"k", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert signature(b"k", 1700000000, BODY) == "sha256=" + expected


def test_a_receiver_accepts_only_the_right_secret_body_and_a_fresh_timestamp() -> None:
    headers = {HEADER_TIMESTAMP: "1700000000", HEADER_SIGNATURE: signature(b"k", 1700000000, BODY)}
    assert verify(b"k", headers, BODY, now=1700000100)
    assert not verify(b"other", headers, BODY, now=1700000100)
    assert not verify(b"k", headers, BODY + b" ", now=1700000100)
    assert not verify(b"k", headers, BODY, now=1700000000 + 301)  # replayed later
    assert not verify(b"k", {**headers, HEADER_TIMESTAMP: "1700000001"}, BODY, now=1700000100)
    assert not verify(b"k", {HEADER_SIGNATURE: headers[HEADER_SIGNATURE]}, BODY, now=1700000100)
    assert not verify(b"k", {**headers, HEADER_TIMESTAMP: "soon"}, BODY, now=1700000100)


@pytest.mark.parametrize("status, delivered, retry, reason", [
    (200, True, False, "ok"), (204, True, False, "ok"),
    (500, False, True, "status_5xx"), (503, False, True, "status_5xx"),
    (429, False, True, "status_429"), (408, False, True, "status_408"),
    (400, False, False, "status_4xx"), (404, False, False, "status_4xx"), (410, False, False, "status_4xx"),
    (301, False, False, "status_3xx"),
])
def test_what_a_status_means(status: int, delivered: bool, retry: bool, reason: str) -> None:
    attempt = outcome_of(status, "nope")
    assert (attempt.delivered, attempt.retry, attempt.reason) == (delivered, retry, reason)


def test_the_type_filter_takes_names_and_patterns() -> None:
    everything, alerts = TypeFilter(), TypeFilter(["alert.*", "trip.ended"])
    assert everything("stop.started")
    assert alerts("alert.raised") and alerts("alert.resolved") and alerts("trip.ended")
    assert not alerts("trip.started") and not alerts("geofence.entered")
    assert TypeFilter.unknown(["alert.*", "alarm.*", "trip.ended", "trips.ended"]) == ["alarm.*", "trips.ended"]


def test_the_secret_shows_nowhere_but_in_the_signature() -> None:
    hook = Webhook("https://user:pw@example.com/hook?token=abc", SecretStr("s3cret"), timeout=1.0, clock=lambda: 1700000000)
    headers = hook.headers("e1", "alert.raised", BODY)
    assert headers[HEADER_SIGNATURE] == signature(b"s3cret", 1700000000, BODY)
    assert "s3cret" not in repr(hook) and "pw" not in repr(hook) and "abc" not in repr(hook)
    assert HEADER_SIGNATURE not in Webhook("https://example.com/hook", None, timeout=1.0).headers("e1", "x", BODY)


# --- the strategy, with a fake delivery ----------------------------------------------------



SLOW, FAST = TopicPartition("fleet.events.v1", 0), TopicPartition("fleet.events.v1", 1)


@dataclass
class Rec:
    offset: int
    value: bytes = b"{}"
    key: bytes | None = None


class FakeDelivery:
    """Delivers at once, except on the slow partition, which waits for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.delivered: list[tuple[int, int]] = []

    async def deliver(self, source: Source) -> str:
        if source.partition == SLOW.partition:
            await self.release.wait()
        self.delivered.append((source.partition, source.offset))
        return SENT


async def settle() -> None:
    """Lets the partition tasks run until they wait on something."""
    for _ in range(5):
        await asyncio.sleep(0)


def committable(strategy: NotifyStrategy) -> dict[TopicPartition, int]:
    return dict(strategy.offsets.items())


async def test_a_slow_partition_holds_only_itself_and_each_partition_keeps_its_order() -> None:
    delivery = FakeDelivery()
    strategy = NotifyStrategy(delivery, asyncio.Event(), max_waiting=5)  # type: ignore[arg-type]
    await strategy.submit({SLOW: [Rec(10), Rec(11)], FAST: [Rec(20), Rec(21)]})
    await settle()
    await strategy.poll()
    assert committable(strategy) == {FAST: 22}
    assert strategy.in_flight == 2 and not strategy.backpressure and strategy.room() == 3
    await strategy.submit({FAST: [Rec(22)], SLOW: [Rec(12), Rec(13), Rec(14)]})
    assert strategy.backpressure  # five waiting on the slow partition: fetching pauses
    delivery.release.set()
    await strategy.handover()
    assert committable(strategy) == {FAST: 23, SLOW: 15}
    assert [o for p, o in delivery.delivered if p == SLOW.partition] == [10, 11, 12, 13, 14]
    assert strategy.in_flight == 0


async def test_a_stop_leaves_what_waits_uncommitted() -> None:
    delivery, stopping = FakeDelivery(), asyncio.Event()
    strategy = NotifyStrategy(delivery, stopping)  # type: ignore[arg-type]
    await strategy.submit({SLOW: [Rec(10), Rec(11)]})
    await settle()
    stopping.set()
    delivery.release.set()  # the request under way finishes
    await strategy.handover()
    assert committable(strategy) == {SLOW: 11}
    assert strategy.in_flight == 0
