"""Given events on the events topic and a webhook receiver of the test's own on loopback,
when ``fleet notify`` runs, then each wanted event is delivered once, signed, after the
receiver's transient failures; a receiver that keeps failing or refuses gets the event
dead-lettered with the reason; a repeat of a delivered event is not sent again."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from fleet_telemetry.core.events import ALERT_RAISED, GEOFENCE_ENTERED, TRIP_ENDED, TRIP_STARTED, FleetEvent
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.topics import ensure_topics
from fleet_telemetry.notify.consumer import NotifyConsumer
from fleet_telemetry.notify.signing import HEADER_EVENT_ID, verify
from tests.integration.cli import environment, fleet
from tests.integration.streams import read_topic

pytestmark = pytest.mark.integration

SECRET = "s3cret-for-the-receiver"


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]


@dataclass
class Receiver:
    """A webhook receiver: ``answer(event, attempt)`` gives the status of each request."""

    answer: Callable[[dict[str, object], int], int]
    delay: Callable[[dict[str, object]], float] = lambda event: 0.0
    requests: list[Received] = field(default_factory=list)
    url: str = ""

    def attempts(self, event_id: str) -> list[Received]:
        return [r for r in self.requests if r.headers.get(HEADER_EVENT_ID) == event_id]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = orjson.loads(body)
        self.requests.append(Received(body, dict(request.headers)))
        await asyncio.sleep(self.delay(event))
        status = self.answer(event, len(self.attempts(str(event["id"]))))
        return web.Response(status=status, text="" if status < 300 else "receiver says no")


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[[Receiver], "asyncio.Future[Receiver]"]]:
    """Starts receivers on free loopback ports; stops them after the test."""
    runners: list[web.AppRunner] = []

    async def start(receiver: Receiver) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        receiver.url = f"http://{host}:{port}/hook"
        return receiver

    yield start  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


def notify_settings(settings: Settings, **extra: object) -> Settings:
    return settings.model_copy(update={"retry_initial_seconds": 0.05, "retry_max_seconds": 0.2,
                                       "notify_remember_seconds": 600, **extra})


async def put_events(settings: Settings, producer: AIOKafkaProducer, events: list[FleetEvent]) -> None:
    await ensure_topics(settings, [settings.events_topic], partitions=2)
    for event in events:
        await producer.send(settings.events_topic, event.to_json(), key=event.key())
    await producer.flush()


def event(kind: str, vehicle: uuid.UUID, fact: str) -> FleetEvent:
    return FleetEvent.of(kind, vehicle, datetime.now(timezone.utc), {"fact": fact}, fact)


async def notify(settings: Settings, url: str, **options: object) -> NotifyConsumer:
    consumer = NotifyConsumer(settings, url, stop_when_idle=2.0, **options)  # type: ignore[arg-type]
    assert await asyncio.wait_for(consumer.run(), 120) == 0
    return consumer


async def test_an_event_failing_twice_is_delivered_once_signed_and_never_again(
    settings, producer, serve, monkeypatch
) -> None:
    settings = notify_settings(settings)
    vehicle = uuid.uuid4()
    raised, trip = event(ALERT_RAISED, vehicle, "1"), event(TRIP_STARTED, vehicle, "t")
    receiver = await serve(Receiver(lambda e, attempt: 500 if attempt <= 2 else 200))
    await put_events(settings, producer, [raised, trip])
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)

    done = await asyncio.to_thread(
        fleet, settings, "notify", "--url", receiver.url, "--type", "alert.*", "--secret-env", "WEBHOOK_SECRET",
        "--stop-when-idle", "2", EVENTS_TOPIC=settings.events_topic, NOTIFY_GROUP=settings.notify_group,
        NOTIFY_DLQ_TOPIC=settings.notify_dlq_topic, NOTIFY_METRICS_PORT="0", RETRY_INITIAL_SECONDS="0.05",
        RETRY_MAX_SECONDS="0.2")

    assert done.returncode == 0, done.stderr
    assert [r.headers[HEADER_EVENT_ID] for r in receiver.requests] == [str(raised.id)] * 3  # the trip is filtered
    accepted = receiver.requests[-1]
    assert accepted.body == raised.to_json()
    assert verify(SECRET.encode(), accepted.headers, accepted.body, now=time.time())
    assert not verify(b"another secret", accepted.headers, accepted.body, now=time.time())
    assert not verify(SECRET.encode(), accepted.headers, accepted.body, now=time.time() + 3600)  # a replay, later
    assert SECRET not in done.stderr

    # The same event again (a replay of the topic), and a restart: not sent twice.
    await put_events(settings, producer, [raised])
    again = await notify(settings, receiver.url, types=["alert.*"], secret=SecretStr(SECRET))
    assert len(receiver.requests) == 3
    assert again.metrics.value("fleet_notify_skipped_total", why="duplicate") == 1
    assert again.metrics.value("fleet_notify_sent_total", type=ALERT_RAISED) == 0


async def test_events_the_receiver_keeps_failing_refuses_or_sits_on_are_dead_lettered(
    settings, producer, serve
) -> None:
    settings = notify_settings(settings, notify_max_attempts=3, notify_timeout_seconds=0.5)
    vehicle = uuid.uuid4()
    failing, refused, slow, fine = (event(ALERT_RAISED, vehicle, "1"), event(GEOFENCE_ENTERED, vehicle, "2"),
                                    event(TRIP_ENDED, vehicle, "3"), event(TRIP_STARTED, vehicle, "4"))
    statuses = {ALERT_RAISED: 500, GEOFENCE_ENTERED: 404, TRIP_ENDED: 200, TRIP_STARTED: 200}
    receiver = await serve(Receiver(lambda e, attempt: statuses[str(e["type"])],
                                    delay=lambda e: 2.0 if e["type"] == TRIP_ENDED else 0.0))
    await put_events(settings, producer, [failing, refused, slow, fine])

    consumer = await notify(settings, receiver.url)

    assert len(receiver.attempts(str(failing.id))) == 3
    assert len(receiver.attempts(str(refused.id))) == 1
    assert len(receiver.attempts(str(slow.id))) == 3
    assert len(receiver.attempts(str(fine.id))) == 1
    letters = await read_topic(settings, settings.notify_dlq_topic, expected=3)
    by_id = {r.headers["fleet.event.id"]: r for r in letters}
    assert set(by_id) == {str(failing.id), str(refused.id), str(slow.id)}
    assert by_id[str(failing.id)].headers["fleet.error.reason"] == "webhook_failed"
    assert by_id[str(failing.id)].headers["fleet.error.detail"].startswith("HTTP 500: receiver says no")
    assert by_id[str(failing.id)].headers["fleet.notify.attempts"] == "3"
    assert by_id[str(failing.id)].value == failing.to_json()
    assert by_id[str(failing.id)].key == str(vehicle).encode()
    assert by_id[str(refused.id)].headers["fleet.error.reason"] == "webhook_rejected"
    assert by_id[str(refused.id)].headers["fleet.notify.attempts"] == "1"
    assert by_id[str(slow.id)].headers["fleet.error.reason"] == "webhook_failed"
    assert by_id[str(slow.id)].headers["fleet.error.detail"].startswith("no answer within 0.5 s")
    m = consumer.metrics
    assert m.value("fleet_notify_sent_total", type=TRIP_STARTED) == 1
    assert m.value("fleet_notify_failed_total", reason="status_5xx") == 3
    assert m.value("fleet_notify_failed_total", reason="status_4xx") == 1
    assert m.value("fleet_notify_failed_total", reason="timeout") == 3
    assert m.value("fleet_notify_retried_total") == 4
    assert m.value("fleet_notify_dead_lettered_total", reason="webhook_failed") == 2
    assert m.value("fleet_notify_dead_lettered_total", reason="webhook_rejected") == 1


async def test_sigterm_lets_the_request_under_way_finish_and_the_next_run_sends_the_rest_once(
    settings, producer, serve
) -> None:
    settings = notify_settings(settings)
    vehicle = uuid.uuid4()
    events = [event(TRIP_STARTED, vehicle, str(i)) for i in range(4)]
    receiver = await serve(Receiver(lambda e, attempt: 200, delay=lambda e: 1.0))
    await put_events(settings, producer, events)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleet_telemetry.cli", "notify", "--url", receiver.url,
        env=environment(settings, EVENTS_TOPIC=settings.events_topic, NOTIFY_GROUP=settings.notify_group,
                        NOTIFY_DLQ_TOPIC=settings.notify_dlq_topic, NOTIFY_METRICS_PORT="0"),
        stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not receiver.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert receiver.requests, "fleet notify sent nothing"
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    first = [r.headers[HEADER_EVENT_ID] for r in receiver.requests]
    assert first == [str(e.id) for e in events[:len(first)]] and len(first) < len(events)

    await notify(settings, receiver.url)

    assert sorted(r.headers[HEADER_EVENT_ID] for r in receiver.requests) == sorted(str(e.id) for e in events)


@pytest.mark.parametrize("args, message", [
    (["--url", "ftp://example.com/hook"], "is not an http:// or https:// URL"),
    (["--url", "http://127.0.0.1:1/hook", "--type", "alarm.*"], "--type alarm.* matches no event type"),
    (["--url", "http://127.0.0.1:1/hook", "--secret-env", "FLEET_TEST_NO_SUCH_SECRET"], "is not set or empty"),
    (["--type", "alert.raised"], "the following arguments are required: --url"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(settings, args, message) -> None:
    done = fleet(settings, "notify", *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
