"""Moving documents' bytes: uploading a file, downloading one, attaching an object a
client put through a presigned URL.

The order makes an interruption harmless: the object is stored first under a fresh key,
then its row is inserted. Stopped in between, the object is one no row refers to, which
``fleet maintain`` removes after ``FLEET_DOCUMENT_ORPHAN_GRACE_HOURS``; a multipart upload
stopped half-way is aborted by it too. The SHA-256 is computed while the bytes stream
(up or down), one part or chunk in memory at a time; a download whose bytes do not match
the recorded digest fails and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.core.errors import FleetError
from fleet_telemetry.documents import records
from fleet_telemetry.documents.actors import uploader
from fleet_telemetry.documents.records import NewDocument
from fleet_telemetry.documents.rules import (
    HEAD_BYTES,
    check_content_type,
    check_expiry,
    check_size,
    detect_content_type,
    key_owner,
    object_key,
)
from fleet_telemetry.documents.storage import Storage
from fleet_telemetry.fleetops.errors import Conflict, InvalidInput, NotFound


@dataclass(frozen=True)
class Upload:
    """What an upload asks for, checked by the rules."""

    owner_type: str
    owner_id: UUID
    kind: str
    file_name: str
    expires_on: date | None = None


class _Digest:
    """Hashes and counts the bytes of an upload as they stream; refuses to go past the
    kind's limit (the file grew after it was measured)."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self.sha256 = hashlib.sha256()
        self.size = 0

    def __call__(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        self.size += len(data)
        check_size(self._kind, self.size)


async def upload_file(conn: asyncpg.Connection, storage: Storage, path: Path, upload: Upload, *,
                      actor: str) -> tuple[dict[str, Any], bool]:
    """Stores the file at ``path`` and registers it; returns ``(document, created)`` (False:
    the owner has these bytes of this kind already, that document is returned and nothing
    more is kept). Everything that can be refused (actor, owner, kind, expiry, size,
    content type) is refused before a byte is sent: :class:`InvalidInput`, :class:`NotFound`."""
    check_expiry(upload.kind, upload.expires_on)
    uploaded_by = await uploader(conn, actor)
    await records.check_owner(conn, upload.owner_type, upload.owner_id)
    try:
        source = path.open("rb")
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    with source:
        size = os.fstat(source.fileno()).st_size
        check_size(upload.kind, size)
        content_type = detect_content_type(os.pread(source.fileno(), HEAD_BYTES, 0))
        check_content_type(upload.kind, content_type)
        key = object_key(upload.owner_type, upload.owner_id)
        digest = _Digest(upload.kind)
        await storage.upload(key, source.fileno(), size, content_type, digest)
    new = NewDocument(upload.owner_type, upload.owner_id, upload.kind, key, digest.sha256.hexdigest(),
                      digest.size, content_type, upload.file_name, uploaded_by, upload.expires_on)
    return await _register(conn, storage, new, actor=str(uploaded_by), action="document.upload")


async def _register(conn: asyncpg.Connection, storage: Storage, new: NewDocument, *, actor: str,
                    action: str) -> tuple[dict[str, Any], bool]:
    """Inserts the row; removes the object again when it became a duplicate or was refused
    (``fleet maintain`` would, later, if this removal fails)."""
    try:
        document, created = await records.register(conn, new, actor=actor, action=action)
    except (FleetError, asyncpg.PostgresError):
        with contextlib.suppress(Exception):
            await storage.delete(new.object_key)
        raise
    if not created:
        with contextlib.suppress(Exception):
            await storage.delete(new.object_key)
    return document, created


async def download_file(conn: asyncpg.Connection, storage: Storage, document_id: UUID, target: Path) -> dict[str, Any]:
    """Writes the document's bytes to ``target`` (a directory: its original file name in
    it), checking size and SHA-256 on the way; returns the document with ``path``.

    Raises :class:`FleetError` (exit status 1) when the stored bytes do not match the
    digest: the partial file is removed. Raises :class:`NotFound` for an unknown id."""
    document = await records.get(conn, document_id)
    if target.is_dir():
        target = target / document["file_name"]
    partial = target.with_name(f".{target.name}.{document_id}.partial")
    digest, size = hashlib.sha256(), 0
    try:
        with partial.open("wb") as out:
            async for chunk in storage.chunks(document["object_key"]):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if digest.hexdigest() != document["sha256"] or size != document["size_bytes"]:
            raise FleetError(
                f"document {document_id}: the stored object does not match its record (SHA-256"
                f" {digest.hexdigest()[:16]}... of {size:,} bytes, recorded {document['sha256'][:16]}... of"
                f" {document['size_bytes']:,}); nothing was written")
        partial.replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return {**document, "path": str(target)}


async def presign_put(conn: asyncpg.Connection, storage: Storage, owner_type: str, owner_id: UUID, *,
                      actor: str, seconds: int) -> dict[str, Any]:
    """A fresh key for ``owner_id`` and a presigned PUT URL a client uploads to; the object
    becomes a document with ``document.attach``."""
    await uploader(conn, actor)
    await records.check_owner(conn, owner_type, owner_id)
    key = object_key(owner_type, owner_id)
    return {"key": key, "url": await storage.url_to_put(key, seconds), "method": "PUT",
            "expires_in_seconds": seconds}


async def attach_object(conn: asyncpg.Connection, storage: Storage, upload: Upload, key: str, *,
                        sha256: str, size: int, actor: str) -> tuple[dict[str, Any], bool]:
    """Registers the object a client uploaded under ``key``: it must exist, belong to the
    owner the key names, have the expected size and SHA-256 (streamed and hashed here) and
    a content type the kind allows. Raises :class:`InvalidInput`, :class:`NotFound`,
    :class:`Conflict` with the reason; transient storage errors as they are."""
    check_expiry(upload.kind, upload.expires_on)
    if key_owner(key) != (upload.owner_type, upload.owner_id):
        raise InvalidInput(f"key {key[:200]!r} is not a key handed out for {upload.owner_type} {upload.owner_id}")
    if await records.by_key(conn, key) is not None:
        raise Conflict(f"object {key} is attached already")
    uploaded_by = await uploader(conn, actor)
    await records.check_owner(conn, upload.owner_type, upload.owner_id)
    check_size(upload.kind, size)
    stored = await storage.head(key)
    if stored is None:
        raise NotFound(f"no object {key} in the bucket (not uploaded yet, or removed)")
    if stored.size != size:
        raise InvalidInput(f"object {key} has {stored.size:,} bytes, the command says {size:,}")
    digest, head = hashlib.sha256(), b""
    async for chunk in storage.chunks(key):
        if len(head) < HEAD_BYTES:
            head += chunk[: HEAD_BYTES - len(head)]
        digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise InvalidInput(f"object {key} has SHA-256 {digest.hexdigest()}, the command says {sha256}")
    content_type = detect_content_type(head)
    check_content_type(upload.kind, content_type)
    new = NewDocument(upload.owner_type, upload.owner_id, upload.kind, key, sha256, size, content_type,
                      upload.file_name, uploaded_by, upload.expires_on)
    document, created = await records.register(conn, new, actor=str(uploaded_by), action="document.attach")
    if not created:
        with contextlib.suppress(Exception):
            await storage.delete(key)
    return document, created
