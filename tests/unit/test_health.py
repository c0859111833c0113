"""/healthz and /readyz: what they answer for a worker's state, served beside /metrics."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from fleet_telemetry.core.health import Health
from fleet_telemetry.core.metrics import PipelineMetrics, serve


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def healthy(clock: Clock) -> Health:
    health = Health(30.0, clock)
    health.tick()
    health.turned_at = clock.now
    health.partitions = 2
    health.answered("postgresql")
    health.answered("kafka")
    return health


def test_a_worker_with_partitions_and_answering_dependencies_is_alive_and_ready() -> None:
    clock = Clock()
    health = healthy(clock)
    clock.now += 10
    assert health.live()[0]
    ready, body = health.ready()
    assert ready
    answer = json.loads(body)
    assert answer["status"] == "ready" and answer["reasons"] == [] and answer["partitions"] == 2
    assert answer["postgresql_answered_age_s"] == 10.0


def test_postgresql_silent_for_longer_than_the_window_makes_it_not_ready_but_still_alive() -> None:
    clock = Clock()
    health = healthy(clock)
    clock.now += 31
    health.tick()
    health.turned_at = clock.now
    health.answered("kafka")
    assert health.live()[0]
    ready, body = health.ready()
    assert not ready
    assert json.loads(body)["reasons"] == ["postgresql has not answered"]


def test_a_worker_without_partitions_is_not_ready() -> None:
    clock = Clock()
    health = healthy(clock)
    health.partitions = 0
    ready, body = health.ready()
    assert not ready and "no partitions assigned" in json.loads(body)["reasons"]


def test_a_starting_worker_is_alive_until_its_first_window_is_over_then_a_stalled_loop_is_not() -> None:
    clock = Clock()
    health = Health(30.0, clock)
    assert health.live()[0]
    assert not health.ready()[0]
    clock.now += 31
    alive, body = health.live()
    assert not alive and json.loads(body)["status"] == "stalled"
    health.tick()
    assert health.live()[0]


def test_an_older_answer_never_moves_the_time_back() -> None:
    clock = Clock()
    health = Health(30.0, clock)
    health.answered("kafka", 900.0)
    health.answered("kafka", 800.0)
    assert health.answered_at["kafka"] == 900.0


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_endpoints_are_served_beside_metrics_with_200_or_503() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = Clock()
    health = healthy(clock)
    server = serve(PipelineMetrics(), port, "127.0.0.1", health=health)
    assert server is not None
    try:
        assert _get(port, "/healthz")[0] == 200
        assert _get(port, "/readyz")[0] == 200
        status, text = _get(port, "/metrics")
        assert status == 200 and b"fleet_readings_total" in text
        health.partitions = 0
        status, body = _get(port, "/readyz")
        assert status == 503 and json.loads(body)["reasons"] == ["no partitions assigned"]
        assert _get(port, "/healthz")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
