"""A running `fleet consume` answers /healthz and /readyz: ready while PostgreSQL and the
broker answer, not ready (yet alive) while PostgreSQL is cut off, ready again after."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import pytest

from bench.soak_proxy import LinkProxy
from tests.integration.streams import wait_for
from tests.integration.test_ingest_failures import worker_env
from tests.integration.test_metrics_and_cli import free_port

pytestmark = pytest.mark.integration


def probe(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


async def answers(port: int, path: str, status: int) -> bool:
    code, _ = await asyncio.to_thread(probe, port, path)
    return code == status


async def test_a_worker_is_ready_with_its_services_and_not_ready_while_postgresql_is_cut_off(topics) -> None:
    target = urlsplit(topics.database_url)
    proxy = LinkProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    via_proxy = urlunsplit(target._replace(netloc=f"{target.username}@127.0.0.1:{proxy.port}"))
    port = free_port()
    env = worker_env(topics, FLEET_DATABASE_URL=via_proxy, FLEET_METRICS_PORT=str(port),
                     FLEET_METRICS_ADDRESS="127.0.0.1", FLEET_HEALTH_STALE_SECONDS="3")
    worker = await asyncio.create_subprocess_exec(sys.executable, "-m", "fleet_telemetry.cli", "consume", env=env,
                                                  stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_for(lambda: answers(port, "/readyz", 200), timeout=60, what="the worker to be ready")
        status, body = await asyncio.to_thread(probe, port, "/readyz")
        assert status == 200 and body["partitions"] == 4 and body["reasons"] == []

        await proxy.cut()  # PostgreSQL is gone for the worker
        await wait_for(lambda: answers(port, "/readyz", 503), timeout=30, what="the worker to report not ready")
        status, body = await asyncio.to_thread(probe, port, "/readyz")
        assert status == 503 and body["reasons"] == ["postgresql has not answered"]
        assert (await asyncio.to_thread(probe, port, "/healthz"))[0] == 200

        await proxy.restore()
        await wait_for(lambda: answers(port, "/readyz", 200), timeout=30, what="the worker to be ready again")
        assert b"fleet_readings_total" in await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read())
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), timeout=60) == 0
        await proxy.cut()
