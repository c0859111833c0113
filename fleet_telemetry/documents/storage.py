"""The documents' bucket: streaming uploads and downloads, presigned URLs, listings.

One :class:`Storage` wraps one aiobotocore client (:func:`fleet_telemetry.core.s3_client.connect_s3`)
and the bucket ``FLEET_S3_BUCKET``. Uploads never hold more than one part in memory:
a body up to :data:`~fleet_telemetry.documents.rules.PART_BYTES` is one ``PutObject``,
a larger one a multipart upload of parts that size, aborted if anything fails on the way.
A storage that does not answer raises :class:`~fleet_telemetry.core.errors.ServiceUnavailable`
from :meth:`Storage.open` and the S3 client's own (transient) errors afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleet_telemetry.core.errors import FleetError, unavailable
from fleet_telemetry.core.s3_client import connect_s3, error_code, is_not_found, is_s3_transient
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.documents.rules import PART_BYTES

STORAGE = "Object storage"
READ_CHUNK_BYTES = 1024 * 1024

ReadPart = Callable[[], Awaitable[bytes]]
"""Returns the next part of a body (at most PART_BYTES; empty at the end)."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class PendingUpload:
    key: str
    upload_id: str
    initiated: datetime


class Storage:
    """The bucket of the documents, through one open S3 client."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, *, check: bool = True) -> AsyncIterator["Storage"]:
        """A storage on ``FLEET_S3_ENDPOINT``; with ``check`` the bucket is asked for
        first, so a storage that does not answer, refuses the keys or lacks the bucket
        fails here, with one line."""
        async with connect_s3(settings) as client:
            storage = cls(client, settings.s3_bucket)
            if check:
                await storage.check(settings)
            yield storage

    async def check(self, settings: Settings) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if is_s3_transient(exc):
                raise unavailable(STORAGE, settings.s3_endpoint, exc) from None
            code = error_code(exc)
            if is_not_found(exc):
                raise FleetError(f"{STORAGE} at {settings.s3_endpoint} has no bucket {self.bucket!r};"
                                 " create it (fleet services up does) or set FLEET_S3_BUCKET") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise FleetError(f"{STORAGE} at {settings.s3_endpoint} refused the keys ({code});"
                                 " check FLEET_S3_ACCESS_KEY and FLEET_S3_SECRET_KEY") from None
            raise

    # --- writing ---------------------------------------------------------------------------

    async def upload(self, key: str, read_part: ReadPart, content_type: str, *, size: int) -> None:
        """Stores the parts ``read_part`` returns, ``size`` bytes in all, under ``key``:
        one ``PutObject`` when ``size`` fits one part, else a multipart upload holding one
        part in memory at a time. A failure (also one raised by ``read_part``) aborts the
        multipart upload and is raised."""
        if size <= PART_BYTES:
            await self.client.put_object(Bucket=self.bucket, Key=key, Body=await read_part(),
                                         ContentType=content_type)
            return
        created = await self.client.create_multipart_upload(Bucket=self.bucket, Key=key,
                                                            ContentType=content_type)
        upload_id = created["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            while part := await read_part():
                parts.append(await self._part(key, upload_id, len(parts) + 1, part))
                del part
            await self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(Exception):
                await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    async def _part(self, key: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        answer = await self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                               PartNumber=number, Body=body)
        return {"ETag": answer["ETag"], "PartNumber": number}

    async def delete(self, key: str) -> None:
        """Removes ``key``; nothing happens when it is already gone."""
        await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def abort(self, upload: PendingUpload) -> None:
        try:
            await self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload.key,
                                                     UploadId=upload.upload_id)
        except Exception as exc:
            if not is_not_found(exc):
                raise

    # --- reading ---------------------------------------------------------------------------

    async def head(self, key: str) -> StoredObject | None:
        """The object's size and time, or None when there is no such object."""
        try:
            answer = await self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
        return StoredObject(key, int(answer["ContentLength"]), answer["LastModified"])

    async def chunks(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]:
        """The object's bytes in chunks of at most ``chunk_bytes``, as they arrive."""
        answer = await self.client.get_object(Bucket=self.bucket, Key=key)
        async with answer["Body"] as body:
            while True:
                chunk = await body.read(chunk_bytes)
                if not chunk:
                    return
                yield chunk

    async def objects(self, prefix: str = "documents/") -> AsyncIterator[StoredObject]:
        """Every object under ``prefix``, page by page."""
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                yield StoredObject(item["Key"], int(item["Size"]), item["LastModified"])

    async def pending_uploads(self) -> list[PendingUpload]:
        """Multipart uploads begun and neither completed nor aborted."""
        found: list[PendingUpload] = []
        paginator = self.client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.bucket):
            for item in page.get("Uploads", ()) or ():
                found.append(PendingUpload(item["Key"], item["UploadId"], item["Initiated"]))
        return found

    # --- presigned URLs ----------------------------------------------------------------------

    async def url_to_get(self, key: str, seconds: int, file_name: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if file_name:
            params["ResponseContentDisposition"] = f"attachment; filename=\"{file_name.replace(chr(34), '')}\""
        return str(await self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=seconds))

    async def url_to_put(self, key: str, seconds: int) -> str:
        return str(await self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=seconds))
