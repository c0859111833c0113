"""The documents' rules, pure: kinds, owners, content types from bytes, sizes, names, keys."""

from __future__ import annotations

import uuid
from datetime import date

import pytest

from fleet_telemetry.documents import rules
from fleet_telemetry.documents.actors import write_permission
from fleet_telemetry.documents.command import parse_attach
from fleet_telemetry.fleetops.access import WRITES
from fleet_telemetry.fleetops.errors import InvalidInput

PDF = b"%PDF-1.7\n" + bytes(100)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100)


@pytest.mark.parametrize(("head", "expected"), [
    (PDF, "application/pdf"), (JPEG, "image/jpeg"), (PNG, "image/png"), (HEIC, "image/heic"),
    (b"just text", "application/octet-stream"),
])
def test_the_content_type_comes_from_the_bytes(head: bytes, expected: str) -> None:
    assert rules.detect_content_type(head) == expected


@pytest.mark.parametrize(("kind", "allowed", "refused"), [
    ("licence", [PDF, JPEG, PNG], [HEIC, b"text"]),
    ("registration", [PDF, JPEG, PNG], [HEIC]),
    ("insurance", [PDF, JPEG, PNG], [HEIC]),
    ("proof_of_delivery", [JPEG, PNG, PDF, HEIC], [b"text"]),
    ("receipt", [PDF, JPEG, PNG], [HEIC, b"text"]),
    ("other", [PDF, HEIC, b"text"], []),
])
def test_each_kind_allows_its_content_types(kind: str, allowed: list[bytes], refused: list[bytes]) -> None:
    for head in allowed:
        rules.check_content_type(kind, rules.detect_content_type(head))
    for head in refused:
        with pytest.raises(InvalidInput, match=f"a {kind} must be"):
            rules.check_content_type(kind, rules.detect_content_type(head))


def test_sizes_are_limited_per_kind_and_empty_files_refused() -> None:
    rules.check_size("receipt", 10 * rules.MiB)
    with pytest.raises(InvalidInput, match="at most 10 MiB"):
        rules.check_size("receipt", 10 * rules.MiB + 1)
    with pytest.raises(InvalidInput, match="empty"):
        rules.check_size("other", 0)


def test_only_licences_registrations_and_insurances_expire() -> None:
    assert rules.EXPIRING_KINDS == ("licence", "registration", "insurance")
    with pytest.raises(InvalidInput, match="a receipt has no expiry date"):
        rules.check_expiry("receipt", date(2030, 1, 1))


@pytest.mark.parametrize(("given", "kept"), [("scan.pdf", "scan.pdf"), ("C:\\\\docs\\\\scan.pdf", "scan.pdf"),
                                             ("/tmp/a/b.jpg", "b.jpg")])
def test_a_file_name_keeps_its_last_component(given: str, kept: str) -> None:
    assert rules.file_name(given) == kept


@pytest.mark.parametrize("bad", ["", "..", "dir/", "a\nb", "x" * 256])
def test_a_bad_file_name_is_refused(bad: str) -> None:
    with pytest.raises(InvalidInput):
        rules.file_name(bad)


def test_keys_are_fresh_and_name_their_owner() -> None:
    owner = uuid.uuid4()
    first, second = rules.object_key("shipment", owner), rules.object_key("shipment", owner)
    assert first != second and first.startswith(f"documents/shipment/{owner}/")
    assert rules.key_owner(first, "documents") == ("shipment", owner)
    assert rules.key_owner("documents/shipment/not-a-uuid/x", "documents") is None
    assert rules.key_owner(f"elsewhere/shipment/{owner}/x", "documents") is None


def test_a_presigned_put_goes_to_an_incoming_key_never_to_a_documents_key() -> None:
    owner = uuid.uuid4()
    incoming = rules.incoming_key("shipment", owner)
    assert incoming.startswith(f"incoming/shipment/{owner}/") and incoming != rules.incoming_key("shipment", owner)
    assert rules.key_owner(incoming) == ("shipment", owner)
    assert rules.key_owner(rules.object_key("shipment", owner)) is None  # attach takes incoming keys only
    assert rules.key_owner(f"incoming/shipment/{owner}/not-a-uuid") is None


@pytest.mark.parametrize(("stored", "written"), [
    ("scan.pdf", "scan.pdf"), ("../../etc/passwd", "passwd"), (".bashrc", "_bashrc"), ("..", "fallback"),
    ("a\\..\\.profile", "_profile"), ("...", "fallback"), ("x\x00y", "fallback"),
])
def test_a_stored_file_name_is_made_safe_again_before_it_is_written(stored: str, written: str) -> None:
    assert rules.safe_file_name(stored, "fallback") == written


@pytest.mark.parametrize(("owner_type", "kind", "permission"), [
    ("shipment", "proof_of_delivery", "shipments:deliver"), ("transport_job", "proof_of_delivery", "documents:write"),
    ("shipment", "receipt", "documents:write"), ("vehicle", "licence", "documents:write"),
])
def test_a_proof_of_delivery_of_a_shipment_needs_shipments_deliver(owner_type: str, kind: str,
                                                                    permission: str) -> None:
    assert write_permission(owner_type, kind) == permission
    assert permission in WRITES


def test_a_document_attach_command_is_checked_field_by_field() -> None:
    owner = uuid.uuid4()
    data = {"key": f"incoming/vehicle/{owner}/k", "owner_type": "vehicle", "owner_id": str(owner),
            "kind": "receipt", "file_name": "r.pdf", "sha256": "A" * 64, "size": 10}
    upload, key, sha256, size = parse_attach(data)
    assert (upload.owner_type, upload.owner_id, upload.kind, key, sha256, size) == (
        "vehicle", owner, "receipt", data["key"], "a" * 64, 10)
    with pytest.raises(InvalidInput, match="needs field"):
        parse_attach({k: v for k, v in data.items() if k != "sha256"})
    with pytest.raises(InvalidInput, match="64 hexadecimal"):
        parse_attach({**data, "sha256": "xyz"})
    with pytest.raises(InvalidInput, match="unknown field"):
        parse_attach({**data, "colour": "red"})
    with pytest.raises(InvalidInput, match="kind"):
        parse_attach({**data, "kind": "passport"})
