"""The S3 client of the project (documents, the local stack's probe, maintenance).

Every S3 call goes through aiobotocore (botocore's signing, retries and multipart
calls), built here once from the settings: path-style addressing (SeaweedFS and MinIO
serve buckets under the path), Signature V4, short connect timeouts and a few retries,
so a storage that does not answer is reported within seconds. The keys are read from
their ``SecretStr`` only when the client is made; nothing here logs them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fleet_telemetry.core.settings import Settings

CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 60.0

NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket", "NoSuchUpload"})


@asynccontextmanager
async def connect_s3(settings: Settings, *, connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
                     attempts: int = 3) -> AsyncIterator[Any]:
    """An aiobotocore S3 client for ``FLEET_S3_ENDPOINT``, closed when the block exits."""
    from aiobotocore.session import get_session
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        connect_timeout=connect_timeout,
        read_timeout=READ_TIMEOUT_SECONDS,
        retries={"max_attempts": attempts, "mode": "standard"},
        # Checksums only when an operation requires them: not every S3-compatible server
        # understands the newer flexible checksum headers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    async with get_session().create_client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key.get_secret_value(),
        aws_secret_access_key=settings.s3_secret_key.get_secret_value(),
        config=config,
    ) as client:
        yield client


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``403``...), else ''."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) in NOT_FOUND_CODES


def is_s3_transient(exc: BaseException) -> bool:
    """True for a storage that did not answer, timed out or answered 5xx / SlowDown:
    trying again later may succeed."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return int(status or 0) >= 500 or error_code(exc) in ("SlowDown", "RequestTimeout")
    return False
