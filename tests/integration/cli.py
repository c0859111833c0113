"""Running ``fleet`` as an operator does: a subprocess with the test's settings in its environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fleet_telemetry.core.settings import Settings
from tests.users import TEST_ADMIN, TEST_JWT_SECRET


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The process environment naming the test's services (the object storage too), topics,
    group and Redis prefix, acting as the session's admin (FLEET_ACTOR); ``extra`` adds or
    overrides ``FLEET_*`` variables (``REDIS_URL="..."``)."""
    env = {
        **os.environ,
        "FLEET_DATABASE_URL": str(settings.database_url),
        "FLEET_REDIS_URL": str(settings.redis_url),
        "FLEET_REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "FLEET_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FLEET_TELEMETRY_TOPIC": settings.telemetry_topic,
        "FLEET_DLQ_TOPIC": settings.dlq_topic,
        "FLEET_CONSUMER_GROUP": settings.consumer_group,
        "FLEET_METRICS_PORT": "0",
        "FLEET_LOG_FORMAT": "console",
        "FLEET_LOG_LEVEL": "error",
        "FLEET_S3_ENDPOINT": settings.s3_endpoint,
        "FLEET_S3_BUCKET": settings.s3_bucket,
        "FLEET_S3_REGION": settings.s3_region,
        "FLEET_S3_ACCESS_KEY": settings.s3_access_key.get_secret_value(),
        "FLEET_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
        "FLEET_ACTOR": TEST_ADMIN,
        "FLEET_JWT_SECRET": TEST_JWT_SECRET,
    }
    env.update({f"FLEET_{name.upper()}": value for name, value in extra.items()})
    return env


def fleet(settings: Settings, *args: str, stdin: str | None = None, cwd: Path | None = None,
          timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
    """``fleet args...`` against the test's settings; returns the finished process."""
    return subprocess.run([sys.executable, "-m", "fleet_telemetry.cli", *args], input=stdin, capture_output=True,
                          text=True, env=environment(settings, **extra), cwd=cwd, timeout=timeout)
