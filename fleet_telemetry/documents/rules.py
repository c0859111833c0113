"""What a document may be: owners, kinds, content types and sizes per kind, object keys.

Pure: no I/O, no clock. The content type is detected from the first bytes with the
``filetype`` library (magic numbers), never taken from a file name or a client's word.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from uuid import UUID, uuid4

import filetype

from fleet_telemetry.fleetops.errors import InvalidInput

MiB = 1024 * 1024
HEAD_BYTES = 8192
"""How much of the start of a file the content-type detection reads."""
PART_BYTES = 8 * MiB
"""Multipart part size of uploads (S3's minimum is 5 MiB); a smaller file is one PUT."""

OWNER_COLUMNS: dict[str, str] = {
    "vehicle": "vehicle_id",
    "driver": "driver_id",
    "transport_job": "transport_job_id",
    "shipment": "shipment_id",
    "maintenance_record": "maintenance_record_id",
}
"""Owner type -> its foreign-key column in ``documents`` (a fixed list: never user text in SQL)."""
OWNER_TABLES: dict[str, tuple[str, bool]] = {
    "vehicle": ("vehicles", True),
    "driver": ("drivers", True),
    "transport_job": ("transport_jobs", True),
    "shipment": ("shipments", False),
    "maintenance_record": ("maintenance_records", False),
}
"""Owner type -> (table, whether it is soft-deleted with ``deleted_at``)."""

PDF, JPEG, PNG, HEIC = "application/pdf", "image/jpeg", "image/png", "image/heic"
ANY = "*"
OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class KindRule:
    content_types: frozenset[str]
    """Allowed detected types; ``{"*"}`` allows anything."""
    max_bytes: int
    expires: bool = False
    """A kind whose documents carry an ``expires_on`` date that raises expiry alerts."""


KINDS: dict[str, KindRule] = {
    "licence": KindRule(frozenset({PDF, JPEG, PNG}), 20 * MiB, expires=True),
    "registration": KindRule(frozenset({PDF, JPEG, PNG}), 20 * MiB, expires=True),
    "insurance": KindRule(frozenset({PDF, JPEG, PNG}), 20 * MiB, expires=True),
    "proof_of_delivery": KindRule(frozenset({JPEG, PNG, PDF, HEIC}), 25 * MiB),
    "receipt": KindRule(frozenset({PDF, JPEG, PNG}), 10 * MiB),
    "other": KindRule(frozenset({ANY}), 100 * MiB),
}
EXPIRING_KINDS = tuple(kind for kind, rule in KINDS.items() if rule.expires)


def owner_type(text: str) -> str:
    value = text.strip().lower().replace("-", "_")
    if value not in OWNER_COLUMNS:
        raise InvalidInput(f"owner type {text!r} is not one of {', '.join(OWNER_COLUMNS)}")
    return value


def kind(text: str) -> str:
    value = text.strip().lower().replace("-", "_")
    if value not in KINDS:
        raise InvalidInput(f"kind {text!r} is not one of {', '.join(KINDS)}")
    return value


def file_name(text: str) -> str:
    """The original file name as stored: its last path component, 1 to 255 characters."""
    name = text.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or name in (".", "..") or len(name) > 255 or any(not c.isprintable() for c in name):
        raise InvalidInput(f"file name {text[:80]!r} must be 1 to 255 printable characters")
    return name


def check_expiry(document_kind: str, expires_on: date | None) -> None:
    if expires_on is not None and not KINDS[document_kind].expires:
        raise InvalidInput(f"a {document_kind} has no expiry date; only {', '.join(EXPIRING_KINDS)} do")


def detect_content_type(head: bytes) -> str:
    """The MIME type the first bytes show (``application/octet-stream`` when unknown)."""
    return filetype.guess_mime(head) or OCTET_STREAM


def check_content_type(document_kind: str, content_type: str) -> None:
    allowed = KINDS[document_kind].content_types
    if ANY not in allowed and content_type not in allowed:
        raise InvalidInput(f"a {document_kind} must be {' or '.join(sorted(allowed))};"
                           f" this file is {content_type}")


def check_size(document_kind: str, size: int) -> None:
    limit = KINDS[document_kind].max_bytes
    if size > limit:
        raise InvalidInput(f"a {document_kind} may be at most {limit // MiB} MiB; this file is"
                           f" larger ({size:,} bytes or more)")
    if size == 0:
        raise InvalidInput("the file is empty")


DOCUMENTS_PREFIX = "documents"
"""Keys of stored documents' objects: only the server writes under it."""
INCOMING_PREFIX = "incoming"
"""Keys a presigned PUT uploads to; ``document.attach`` copies a checked object out of it."""


def object_key(owner: str, owner_id: UUID, document_id: UUID | None = None) -> str:
    """A fresh key ``documents/<owner_type>/<owner_id>/<uuid>``: never reused, so an
    upload never overwrites an object a row refers to; never handed to a client."""
    return f"{DOCUMENTS_PREFIX}/{owner}/{owner_id}/{document_id or uuid4()}"


def incoming_key(owner: str, owner_id: UUID) -> str:
    """A fresh key ``incoming/<owner_type>/<owner_id>/<uuid>`` for a presigned PUT."""
    return f"{INCOMING_PREFIX}/{owner}/{owner_id}/{uuid4()}"


def key_owner(key: str, prefix: str = INCOMING_PREFIX) -> tuple[str, UUID] | None:
    """The owner a key of :func:`incoming_key`'s shape names (:func:`object_key`'s with
    ``prefix="documents"``), or None for any other key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != prefix or parts[1] not in OWNER_COLUMNS:
        return None
    try:
        UUID(parts[3])
        return parts[1], UUID(parts[2])
    except ValueError:
        return None


def safe_file_name(name: str, fallback: str) -> str:
    """A stored file name made safe to write again: its last path component, leading dots
    replaced (no hidden file, no ``..``); ``fallback`` when nothing is left."""
    last = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    stripped = last.lstrip(".")
    if not stripped or any(not c.isprintable() for c in stripped):
        return fallback
    return ("_" if stripped != last else "") + stripped
