"""``fleet notify``: deliver the outbound events to a webhook."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from fleet_telemetry.cli.parsing import add_command, port_arg, seconds_arg
from fleet_telemetry.core.errors import UsageError
from fleet_telemetry.core.metrics import serve
from fleet_telemetry.core.settings import Settings, mask_url
from fleet_telemetry.core.stopping import StopSignals
from fleet_telemetry.notify.consumer import NotifyConsumer
from fleet_telemetry.notify.delivery import TypeFilter

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def checked_url(url: str) -> str:
    """``url`` when it is an http(s) URL with a host; else a :class:`UsageError`."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise UsageError(f"--url {mask_url(url)} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {mask_url(url)} is not an http:// or https:// URL with a host")
    return url


def secret_from(variable: str | None) -> SecretStr | None:
    """The signing secret from environment variable ``variable`` (None: unsigned)."""
    if variable is None:
        return None
    if not _ENV_NAME.fullmatch(variable):
        raise UsageError(f"--secret-env {variable!r} is not an environment variable name")
    value = os.environ.get(variable, "")
    if not value:
        raise UsageError(f"--secret-env {variable}: the variable is not set or empty")
    return SecretStr(value)


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = checked_url(args.url)
    types = args.type or []
    unknown = TypeFilter.unknown(types)
    if unknown:
        raise UsageError(f"--type {unknown[0]} matches no event type (see docs/interface.md, 'Outbound events')")
    secret = secret_from(args.secret_env)

    async def main() -> int:
        consumer = NotifyConsumer(settings, url, types=types, secret=secret, stop_when_idle=args.stop_when_idle)
        signals = StopSignals(consumer.stop).install()
        port = settings.notify_metrics_port if args.metrics_port is None else args.metrics_port
        if port:
            serve(consumer.metrics, port, settings.metrics_address, setting="FLEET_NOTIFY_METRICS_PORT")
        return await signals.run(consumer.run())

    return asyncio.run(main())


SUMMARY = "deliver the outbound events to a webhook"
DESCRIPTION = (
    "Consume FLEET_EVENTS_TOPIC in consumer group FLEET_NOTIFY_GROUP and POST each event as JSON to --url, "
    "with its id in X-Fleet-Event-Id and, with --secret-env, an HMAC-SHA256 signature in X-Fleet-Signature. "
    "5xx, 408, 429, timeouts and connection errors are retried with backoff; other 4xx, or "
    "FLEET_NOTIFY_MAX_ATTEMPTS failures, send the event to FLEET_NOTIFY_DLQ_TOPIC. Delivered ids are "
    "remembered in Redis, so an event is sent once. SIGTERM or Ctrl-C finishes the requests under way, "
    "commits and leaves the group."
)


def register(sub: Any) -> None:
    parser = add_command(sub, "notify", SUMMARY, DESCRIPTION, run)
    parser.add_argument("--url", required=True, help="the webhook: an http:// or https:// URL")
    parser.add_argument("--type", action="append", metavar="TYPE",
                        help="deliver only events of this type; a pattern such as 'alert.*' works too;"
                        " repeat for several (default: every type)")
    parser.add_argument("--secret-env", metavar="VAR",
                        help="sign each request with the secret held by environment variable VAR"
                        " (the secret itself never goes on the command line)")
    parser.add_argument("--metrics-port", type=port_arg, default=None, metavar="PORT",
                        help="serve metrics on PORT (default FLEET_NOTIFY_METRICS_PORT; 0 turns it off)")
    parser.add_argument("--stop-when-idle", type=seconds_arg, default=None, metavar="SECONDS",
                        help="exit 0 once no event arrived for SECONDS and everything is committed (tests)")
