"""Moving documents' bytes: uploading a file, downloading one, attaching an object a
client put through a presigned URL.

A presigned PUT goes to an ``incoming/`` key; attaching checks that object's bytes and
copies exactly the version it checked (by ETag) to a fresh ``documents/`` key no client
knows, so a URL still valid after the attach cannot change a stored document. An object
a row refers to is never removed here.

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
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg

from fleet_telemetry.core.errors import FleetError
from fleet_telemetry.documents import records
from fleet_telemetry.documents.actors import uploader, write_permission
from fleet_telemetry.documents.records import NewDocument
from fleet_telemetry.documents.rules import (
    HEAD_BYTES,
    check_content_type,
    check_expiry,
    check_size,
    detect_content_type,
    incoming_key,
    key_owner,
    object_key,
    safe_file_name,
)
from fleet_telemetry.documents.storage import Storage
from fleet_telemetry.fleetops.errors import InvalidInput, NotFound


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
    uploaded_by = await uploader(conn, actor, write_permission(upload.owner_type, upload.kind))
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
    """Inserts the row; removes the object again when it became a duplicate of another
    document or was refused (``fleet maintain`` would, later, if this removal fails). An
    object a row refers to is never removed: the existing document may be this very key
    (two registrations of one key racing), and that is looked up again just before."""
    try:
        document, created = await records.register(conn, new, actor=actor, action=action)
    except (FleetError, asyncpg.PostgresError):
        await _drop_unreferenced(conn, storage, new.object_key)
        raise
    if not created and document.get("object_key") != new.object_key:
        await _drop_unreferenced(conn, storage, new.object_key)
    return document, created


async def _drop_unreferenced(conn: asyncpg.Connection, storage: Storage, key: str) -> None:
    with contextlib.suppress(Exception):
        if await records.by_key(conn, key) is None:
            await storage.delete(key)


async def download_file(conn: asyncpg.Connection, storage: Storage, document_id: UUID, target: Path, *,
                        force: bool = False) -> dict[str, Any]:
    """Writes the document's bytes to ``target`` (a directory: its original file name, made
    safe again, in it), checking size and SHA-256 on the way; returns the document with ``path``.

    An existing ``target`` is refused (:class:`InvalidInput`) unless ``force``. The bytes go
    to a fresh temporary file beside it (created exclusively, never through a symbolic
    link) that becomes ``target`` only when complete and matching. Raises :class:`FleetError`
    (exit status 1) when the stored bytes do not match the record (more bytes than recorded
    stop the download at once): the partial file is removed. :class:`NotFound` for an unknown id."""
    document = await records.get(conn, document_id)
    if target.is_dir():
        target = target / safe_file_name(document["file_name"], f"document-{document_id}")
    if not force and (target.exists() or target.is_symlink()):
        raise InvalidInput(f"{target} exists already; give --force to overwrite it")
    expected = int(document["size_bytes"])
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise InvalidInput(f"cannot write in {target.parent}: {exc.strerror or type(exc).__name__}") from None
    partial = Path(name)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in storage.chunks(document["object_key"]):
                size += len(chunk)
                if size > expected:
                    break
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != document["sha256"] or size != expected:
            got = f"more than {expected:,}" if size > expected else f"{size:,}"
            raise FleetError(
                f"document {document_id}: the stored object does not match its record (SHA-256"
                f" {digest.hexdigest()[:16]}... of {got} bytes, recorded {document['sha256'][:16]}... of"
                f" {expected:,}); nothing was written")
        _put_in_place(partial, target, force)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return {**document, "path": str(target)}


def _put_in_place(partial: Path, target: Path, force: bool) -> None:
    """``partial`` becomes ``target``; without ``force`` never over an existing file (a hard
    link fails when the name is taken, where a rename would replace it)."""
    if force:
        partial.replace(target)
        return
    try:
        os.link(partial, target, follow_symlinks=False)
    except FileExistsError:
        raise InvalidInput(f"{target} exists already; give --force to overwrite it") from None
    except OSError:  # a file system without hard links: checked just before instead
        if target.exists() or target.is_symlink():
            raise InvalidInput(f"{target} exists already; give --force to overwrite it") from None
        partial.replace(target)
    else:
        partial.unlink()


async def presign_put(conn: asyncpg.Connection, storage: Storage, owner_type: str, owner_id: UUID, *,
                      kind: str, actor: str, seconds: int) -> dict[str, Any]:
    """A fresh incoming key for ``owner_id`` and a presigned PUT URL a client uploads to;
    the object becomes a ``kind`` document with ``document.attach`` (which copies it to a
    key of its own: the URL can never change a stored document)."""
    await uploader(conn, actor, write_permission(owner_type, kind))
    await records.check_owner(conn, owner_type, owner_id)
    key = incoming_key(owner_type, owner_id)
    return {"key": key, "url": await storage.url_to_put(key, seconds), "method": "PUT",
            "expires_in_seconds": seconds}


async def attach_object(conn: asyncpg.Connection, storage: Storage, upload: Upload, key: str, *,
                        sha256: str, size: int, actor: str) -> tuple[dict[str, Any], bool]:
    """Registers the object a client uploaded under the incoming ``key``: it must exist,
    belong to the owner the key names, have the expected size and SHA-256 (streamed,
    counted and hashed here) and a content type the kind allows.

    The object is read and then copied server-side to a fresh ``documents/`` key only if
    it still has the entity tag its HEAD gave, so what was checked is what is stored; the
    row refers to the copy, the incoming object is removed. Raises :class:`InvalidInput`,
    :class:`NotFound`, :class:`Conflict` (also when the object changed meanwhile) with the
    reason; transient storage errors as they are (the incoming object stays for a retry)."""
    check_expiry(upload.kind, upload.expires_on)
    if key_owner(key) != (upload.owner_type, upload.owner_id):
        raise InvalidInput(f"key {key[:200]!r} is not a key handed out for {upload.owner_type} {upload.owner_id}")
    uploaded_by = await uploader(conn, actor, write_permission(upload.owner_type, upload.kind))
    await records.check_owner(conn, upload.owner_type, upload.owner_id)
    check_size(upload.kind, size)
    stored = await storage.head(key)
    if stored is None:
        raise NotFound(f"no object {key} in the bucket (not uploaded yet, attached already, or removed)")
    if stored.size != size:
        raise InvalidInput(f"object {key} has {stored.size:,} bytes, the command says {size:,}")
    digest, head, counted = hashlib.sha256(), b"", 0
    async for chunk in storage.chunks(key, if_match=stored.etag or None):
        counted += len(chunk)
        if counted > size:
            raise InvalidInput(f"object {key} has more than the {size:,} bytes the command says")
        if len(head) < HEAD_BYTES:
            head += chunk[: HEAD_BYTES - len(head)]
        digest.update(chunk)
    if counted != size:
        raise InvalidInput(f"object {key} has {counted:,} bytes, the command says {size:,}")
    if digest.hexdigest() != sha256:
        raise InvalidInput(f"object {key} has SHA-256 {digest.hexdigest()}, the command says {sha256}")
    content_type = detect_content_type(head)
    check_content_type(upload.kind, content_type)
    final = object_key(upload.owner_type, upload.owner_id)
    await storage.copy(key, final, if_match=stored.etag)
    new = NewDocument(upload.owner_type, upload.owner_id, upload.kind, final, sha256, size, content_type,
                      upload.file_name, uploaded_by, upload.expires_on)
    result = await _register(conn, storage, new, actor=str(uploaded_by), action="document.attach")
    with contextlib.suppress(Exception):  # else fleet maintain removes it after the grace period
        await storage.delete(key)
    return result
