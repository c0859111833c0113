"""The documents' bucket: streaming uploads and downloads, presigned URLs, listings.

One :class:`Storage` wraps one aiobotocore client (:func:`fleet_telemetry.core.s3_client.connect_s3`)
and the bucket ``FLEET_S3_BUCKET``. Uploads stream from the file without holding a part
in memory: a body up to :data:`~fleet_telemetry.documents.rules.PART_BYTES` is one
``PutObject``, a larger one a multipart upload of parts that size, aborted if anything
fails on the way.
A storage that does not answer raises :class:`~fleet_telemetry.core.errors.ServiceUnavailable`
from :meth:`Storage.open` and the S3 client's own (transient) errors afterwards.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleet_telemetry.core.errors import FleetError, unavailable
from fleet_telemetry.core.s3_client import connect_s3, error_code, is_not_found, is_s3_transient
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.documents.rules import PART_BYTES
from fleet_telemetry.fleetops.errors import Conflict

STORAGE = "Object storage"
READ_CHUNK_BYTES = 1024 * 1024
PRECONDITION_FAILED = frozenset({"412", "PreconditionFailed"})

Observer = Callable[[bytes | memoryview], None]
"""Sees the bytes of an upload once each, in order."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    last_modified: datetime
    etag: str = ""
    """The entity tag (as the server quotes it); empty in listings."""


class ObjectChanged(Conflict):
    """The object was replaced between two requests made under its entity tag (a client
    PUT again while it was checked): nothing is registered; the client attaches again."""


@dataclass(frozen=True)
class PendingUpload:
    key: str
    upload_id: str
    initiated: datetime


class _Region(io.RawIOBase):
    """A seekable read-only stream over ``length`` bytes of an open file from ``start``,
    read with ``pread`` chunk by chunk as the S3 client asks (it signs and sends a
    stream that way, where a part in memory would cost its whole size, and a copy).

    ``observe`` sees every byte of the region exactly once and in order, the first time
    it is read, whatever the client re-reads (signing and sending, a retry);
    :meth:`finish` hands it whatever the client skipped."""

    def __init__(self, fd: int, start: int, length: int, observe: Observer) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._observe = fd, start, length, observe
        self._position = 0
        self._observed = 0

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self._length - self._position)
        if wanted <= 0:
            return 0
        if self._position > self._observed:
            self._catch_up(self._position)
        data = os.pread(self._fd, wanted, self._start + self._position)
        buffer[:len(data)] = data
        end = self._position + len(data)
        if end > self._observed:
            self._observe(memoryview(data)[self._observed - self._position:])
            self._observed = end
        self._position = end
        return len(data)

    def _catch_up(self, until: int) -> None:
        while self._observed < until:
            data = os.pread(self._fd, min(READ_CHUNK_BYTES, until - self._observed), self._start + self._observed)
            if not data:
                raise OSError(f"the file ended {self._length - self._observed} bytes early")
            self._observe(data)
            self._observed += len(data)

    def finish(self) -> None:
        self._catch_up(self._length)


class Storage:
    """The bucket of the documents, through one open S3 client."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, *, check: bool = True, attempts: int = 3) -> AsyncIterator["Storage"]:
        """A storage on ``FLEET_S3_ENDPOINT`` (each request tried up to ``attempts``
        times); with ``check`` the bucket is asked for first, so a storage that does not
        answer, refuses the keys or lacks the bucket fails here, with one line."""
        async with connect_s3(settings, attempts=attempts) as client:
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

    async def upload(self, key: str, fd: int, size: int, content_type: str, observe: Observer) -> None:
        """Stores the first ``size`` bytes of the open file ``fd`` under ``key``: one
        ``PutObject`` up to :data:`PART_BYTES`, else a multipart upload of parts that size,
        each streamed from the file (memory stays at the client's chunks, whatever the
        size). ``observe`` sees every byte once, in order (the caller hashes them). A
        failure aborts the multipart upload and is raised."""
        if size <= PART_BYTES:
            with _Region(fd, 0, size, observe) as body:
                await self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
                body.finish()
            return
        created = await self.client.create_multipart_upload(Bucket=self.bucket, Key=key,
                                                            ContentType=content_type)
        upload_id = created["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            for number, start in enumerate(range(0, size, PART_BYTES), start=1):
                with _Region(fd, start, min(PART_BYTES, size - start), observe) as body:
                    answer = await self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                           PartNumber=number, Body=body)
                    body.finish()
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
            await self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(Exception):
                await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    async def copy(self, source: str, target: str, *, if_match: str) -> None:
        """Copies ``source`` to ``target`` inside the bucket, server-side, only if ``source``
        still has the entity tag ``if_match``; raises :class:`ObjectChanged` otherwise."""
        try:
            await self.client.copy_object(Bucket=self.bucket, Key=target, CopySourceIfMatch=if_match,
                                          CopySource={"Bucket": self.bucket, "Key": source})
        except Exception as exc:
            if error_code(exc) in PRECONDITION_FAILED:
                raise ObjectChanged(f"object {source} changed while it was being attached") from None
            raise

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
        return StoredObject(key, int(answer["ContentLength"]), answer["LastModified"], str(answer.get("ETag", "")))

    async def chunks(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES, *,
                     if_match: str | None = None) -> AsyncIterator[bytes]:
        """The object's bytes in chunks of at most ``chunk_bytes``, as they arrive; with
        ``if_match`` only the version of that entity tag (:class:`ObjectChanged` otherwise)."""
        try:
            answer = await self.client.get_object(Bucket=self.bucket, Key=key,
                                                  **({"IfMatch": if_match} if if_match else {}))
        except Exception as exc:
            if error_code(exc) in PRECONDITION_FAILED:
                raise ObjectChanged(f"object {key} changed while it was being read") from None
            raise
        async with answer["Body"] as body:
            while True:
                chunk = await body.read(chunk_bytes)
                if not chunk:
                    return
                yield chunk

    async def objects(self, prefix: str) -> AsyncIterator[StoredObject]:
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

    async def url_to_get(self, key: str, seconds: int, file_name: str | None = None,
                         content_type: str | None = None) -> str:
        """A presigned GET; the response is served as ``content_type`` (the type detected
        at upload, not whatever the object was stored with) and, with ``file_name``, as an
        attachment of that name."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if content_type:
            params["ResponseContentType"] = content_type
        if file_name:
            params["ResponseContentDisposition"] = f"attachment; filename=\"{file_name.replace(chr(34), '')}\""
        return str(await self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=seconds))

    async def url_to_put(self, key: str, seconds: int) -> str:
        return str(await self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=seconds))
