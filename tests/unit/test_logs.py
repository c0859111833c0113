"""With ``FLEET_LOG_FORMAT=json`` every line on stderr is one JSON object: the project's
own events, library log lines (asyncpg, asyncio), Python warnings and the traceback of
an exception nobody caught. ``auto`` (the default) is ``console`` on a terminal and
``json`` otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

_SCRIPT = textwrap.dedent("""
    import asyncio, logging, warnings

    import structlog
    from aiokafka import AIOKafkaProducer

    from fleet_telemetry.core.logs import configure_logging
    from fleet_telemetry.core.settings import Settings

    settings = Settings(_env_file=None)
    configure_logging(settings.log_format, settings.log_level)
    structlog.get_logger("fleet.test").info("an event of our own", n=1)
    logging.getLogger("asyncpg.pool").warning("a library line with %s", "arguments")
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("asyncio").exception("a library line with a traceback")
    warnings.warn("a Python warning")

    async def main() -> None:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
        await producer.start()  # aiokafka logs that it cannot connect, then raises

    asyncio.run(main())
""")


def _run(fmt: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEET_LOG_FORMAT": fmt, "FLEET_LOG_LEVEL": "info"}
    return subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=60)


def test_every_stderr_line_is_one_json_object_in_json_format() -> None:
    result = _run("json")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    records: list[dict[str, Any]] = []
    for line in lines:
        record = json.loads(line)  # raises on any line that is not JSON
        assert isinstance(record, dict), line
        records.append(record)

    def one(event: str) -> dict[str, Any]:
        found = [r for r in records if event in str(r.get("event"))]
        assert len(found) == 1, (event, records)
        return found[0]

    ours = one("an event of our own")
    assert ours["n"] == 1 and ours["logger"] == "fleet.test"
    for record in records:  # the same common fields on every line, ours and the libraries'
        assert {"event", "level", "timestamp", "logger"} <= record.keys(), record
    library = one("a library line with arguments")
    assert library["level"] == "warning" and library["logger"] == "asyncpg.pool" and "timestamp" in library
    traced = one("a library line with a traceback")
    assert traced["level"] == "error" and "ZeroDivisionError" in traced["exception"]
    assert one("a Python warning")["level"] == "warning"
    # aiokafka's own line about the bootstrap server is dropped: the failure that follows says it.
    assert not [r for r in records if r.get("logger", "").startswith("aiokafka")]
    crash = one("uncaught exception")
    assert crash["level"] == "critical"
    assert crash["exception"].startswith("Traceback") and "KafkaConnectionError" in crash["exception"]


def test_the_console_format_stays_readable_text() -> None:
    result = _run("console")
    assert result.returncode == 1
    assert "a library line with arguments" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert not result.stderr.lstrip().startswith("{")


def test_auto_is_json_when_stderr_is_not_a_terminal() -> None:
    result = _run("auto")
    assert result.returncode == 1
    for line in result.stderr.splitlines():
        if line.strip():
            assert isinstance(json.loads(line), dict), line


def test_auto_is_console_on_a_terminal() -> None:
    import pty

    script = ("from fleet_telemetry.core.logs import configure_logging; import structlog;"
              " configure_logging('auto', 'info'); structlog.get_logger('t').info('hello', n=1)")
    env = {**os.environ, "FLEET_LOG_FORMAT": "auto"}
    primary, secondary = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", script], stderr=secondary, env=env, timeout=60, check=True)
        os.close(secondary)
        text = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            text += chunk
    finally:
        os.close(primary)
    line = text.decode(errors="replace")
    assert "hello" in line and not line.lstrip().startswith("{")
