"""Documents in object storage: given owners and users, when files are uploaded,
downloaded, attached through the command topic and maintained, then exactly these rows,
objects, statuses, audit rows and alerts exist.

Against a real S3 server (a SeaweedFS of the session's own, or the one FLEET_S3_ENDPOINT
names), PostgreSQL, Redis and the broker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import tracemalloc
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.documents import transfer
from fleet_telemetry.documents.rules import MiB
from fleet_telemetry.documents.records import NewDocument
from fleet_telemetry.documents.storage import Storage
from fleet_telemetry.fleetops import assignments, customers, drivers, jobs
from fleet_telemetry.fleetops.commands import command_value
from fleet_telemetry.fleetops.errors import Conflict
from fleet_telemetry.fleetops.tokens import TokenKeys, issue
from fleet_telemetry.ingest.topics import ensure_topics
from fleet_telemetry.lifecycle.context import PassContext
from fleet_telemetry.lifecycle.documents import check_document_expiry, clean_document_storage
from fleet_telemetry.lifecycle.policy import LifecyclePolicy
from tests.integration.cli import fleet
from tests.integration.streams import read_topic
from tests.users import TEST_ADMIN, TEST_JWT_SECRET

pytestmark = pytest.mark.integration

PDF_HEAD = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def pdf(size: int) -> bytes:
    return PDF_HEAD + os.urandom(size - len(PDF_HEAD))


async def make_user(conn: asyncpg.Connection, role: str = "fleet_manager") -> str:
    email = f"{role}-{uuid.uuid4().hex[:8]}@example.com"
    await conn.execute("INSERT INTO users (email, password_hash, role) VALUES ($1, 'not-a-login', $2)", email, role)
    return email


async def objects_under(settings: Settings, prefix: str) -> list[str]:
    async with Storage.open(settings) as storage:
        return [o.key async for o in storage.objects(prefix)]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- upload and download --------------------------------------------------------------------


async def test_a_20_mib_file_streams_up_and_down_in_constant_memory_with_its_hash_checked(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
    tmp_path: Path,
) -> None:
    (vehicle,) = await make_vehicles(1)
    actor = await make_user(conn)
    source = tmp_path / "manual.pdf"
    source.write_bytes(pdf(20 * MiB))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    upload = transfer.Upload("vehicle", vehicle, "other", "manual.pdf")

    async with Storage.open(doc_settings) as storage:
        tracemalloc.start()
        try:
            document, created = await transfer.upload_file(conn, storage, source, upload, actor=actor)
            upload_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            target = tmp_path / "back"
            target.mkdir()
            fetched = await transfer.download_file(conn, storage, uuid.UUID(document["id"]), target)
            download_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    print(f"tracemalloc peak: upload {upload_peak / MiB:.1f} MiB, download {download_peak / MiB:.1f} MiB")
    assert created and document["sha256"] == expected and document["size_bytes"] == 20 * MiB
    assert document["content_type"] == "application/pdf"
    assert upload_peak < 6 * MiB  # parts stream from the file: not even one 8 MiB part in memory
    assert download_peak < 4 * MiB  # 1 MiB chunks
    assert Path(fetched["path"]).read_bytes() == source.read_bytes()

    # The CLI downloads it too, and the audit log has the upload.
    out = fleet(doc_settings, "documents", "download", document["id"], "-o", str(tmp_path / "cli.pdf"), "--json")
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256((tmp_path / "cli.pdf").read_bytes()).hexdigest() == expected
    audit = await conn.fetchrow("SELECT actor, after FROM audit_logs WHERE action = 'document.upload'"
                              " AND entity_id = $1", document["id"])
    assert audit["actor"] == str(await conn.fetchval("SELECT id FROM users WHERE email = $1", actor))


async def test_a_download_whose_bytes_do_not_match_fails_and_leaves_no_file(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
    tmp_path: Path,
) -> None:
    (vehicle,) = await make_vehicles(1)
    actor = await make_user(conn)
    (tmp_path / "r.pdf").write_bytes(pdf(10_000))
    up = fleet(doc_settings, "documents", "upload", str(tmp_path / "r.pdf"), "--owner", f"vehicle:{vehicle}",
               "--kind", "receipt", "--actor", actor, "--json")
    assert up.returncode == 0, up.stderr
    document = json.loads(up.stdout)
    async with Storage.open(doc_settings) as storage:  # the object changed behind the record's back
        await storage.client.put_object(Bucket=storage.bucket, Key=document["object_key"], Body=pdf(10_000))

    out = fleet(doc_settings, "documents", "download", document["id"], "-o", str(tmp_path / "x.pdf"))
    assert out.returncode == 1
    assert "does not match its record" in one_line(out.stderr)
    assert list(tmp_path.iterdir()) == [tmp_path / "r.pdf"]


async def test_a_download_keeps_existing_files_writes_a_safe_name_and_stops_past_the_recorded_size(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
    tmp_path: Path,
) -> None:
    (vehicle,) = await make_vehicles(1)
    actor = await make_user(conn)
    content = pdf(10_000)
    (tmp_path / "r.pdf").write_bytes(content)
    up = fleet(doc_settings, "documents", "upload", str(tmp_path / "r.pdf"), "--owner", f"vehicle:{vehicle}",
               "--kind", "receipt", "--name", ".bashrc", "--actor", actor, "--json")
    assert up.returncode == 0, up.stderr
    document = json.loads(up.stdout)
    assert document["file_name"] == ".bashrc"
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    # A folder: the stored name, made safe (no hidden file).
    fetched = fleet(doc_settings, "documents", "download", document["id"], "-o", str(out_dir), "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert [p.name for p in out_dir.iterdir()] == ["_bashrc"]
    assert (out_dir / "_bashrc").read_bytes() == content

    # An existing file is kept unless --force.
    (out_dir / "_bashrc").write_bytes(b"mine")
    kept = fleet(doc_settings, "documents", "download", document["id"], "-o", str(out_dir))
    assert kept.returncode == 2 and "exists already; give --force" in one_line(kept.stderr)
    assert (out_dir / "_bashrc").read_bytes() == b"mine"
    forced = fleet(doc_settings, "documents", "download", document["id"], "-o", str(out_dir), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out_dir / "_bashrc").read_bytes() == content and len(list(out_dir.iterdir())) == 1

    # More bytes than recorded: the download stops, nothing is left.
    async with Storage.open(doc_settings) as storage:
        await storage.client.put_object(Bucket=storage.bucket, Key=document["object_key"], Body=content + b"x" * 5)
    longer = fleet(doc_settings, "documents", "download", document["id"], "-o", str(tmp_path / "long.pdf"))
    assert longer.returncode == 1 and "more than 10,000 bytes" in one_line(longer.stderr)
    assert not (tmp_path / "long.pdf").exists() and not list(tmp_path.glob(".long.pdf.*"))

    # Reading needs documents:read.
    nobody = await make_user(conn, "driver")
    for action in (["download", document["id"], "-o", str(tmp_path / "d.pdf")], ["show", document["id"]],
                   ["list"]):
        refused = fleet(doc_settings, "documents", *action, "--actor", nobody)
        assert refused.returncode == 2 and "may not documents:read" in one_line(refused.stderr), action
    assert not (tmp_path / "d.pdf").exists()


async def test_a_duplicate_registration_of_the_very_key_a_row_refers_to_keeps_its_object(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
    tmp_path: Path,
) -> None:
    (vehicle,) = await make_vehicles(1)
    actor = await make_user(conn)
    (tmp_path / "r.pdf").write_bytes(pdf(3000))
    async with Storage.open(doc_settings) as storage:
        document, created = await transfer.upload_file(conn, storage, tmp_path / "r.pdf",
                                                        transfer.Upload("vehicle", vehicle, "receipt", "r.pdf"),
                                                        actor=actor)
        assert created
        # A second registration of the same key and bytes (two attaches of one object racing).
        again = NewDocument("vehicle", vehicle, "receipt", document["object_key"], document["sha256"],
                            document["size_bytes"], document["content_type"], "r.pdf",
                            uuid.UUID(str(document["uploaded_by"])))
        existing, created = await transfer._register(conn, storage, again, actor=actor, action="document.attach")
        assert not created and existing["id"] == document["id"]
        assert await storage.head(document["object_key"]) is not None
async def test_a_refused_content_type_stores_nothing(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
    tmp_path: Path,
) -> None:
    (vehicle,) = await make_vehicles(1)
    actor = await make_user(conn)
    text = tmp_path / "licence.pdf"  # named like a PDF, but plain text
    text.write_text("this is not a licence\n" * 100)

    out = fleet(doc_settings, "documents", "upload", str(text), "--owner", f"vehicle:{vehicle}",
                "--kind", "licence", "--actor", actor)

    assert out.returncode == 2
    line = one_line(out.stderr)
    assert "a licence must be application/pdf or image/jpeg or image/png" in line
    assert await conn.fetchval("SELECT count(*) FROM documents WHERE owner_id = $1", vehicle) == 0
    assert await objects_under(doc_settings, f"documents/vehicle/{vehicle}/") == []


async def test_an_unknown_or_read_only_actor_or_an_unknown_owner_is_refused_before_anything_is_stored(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
    tmp_path: Path,
) -> None:
    (vehicle,) = await make_vehicles(1)
    actor = await make_user(conn)
    (tmp_path / "a.pdf").write_bytes(pdf(5000))
    nobody = fleet(doc_settings, "documents", "upload", str(tmp_path / "a.pdf"), "--owner", f"vehicle:{vehicle}",
                   "--kind", "insurance", "--actor", "nobody@example.com")
    assert nobody.returncode == 2 and "unknown actor 'nobody@example.com'" in one_line(nobody.stderr)
    viewer = f"viewer-{uuid.uuid4().hex[:8]}@example.com"
    await conn.execute("INSERT INTO users (email, password_hash, role) VALUES ($1, 'not-a-login', 'viewer')", viewer)
    read_only = fleet(doc_settings, "documents", "upload", str(tmp_path / "a.pdf"), "--owner", f"vehicle:{vehicle}",
                      "--kind", "insurance", "--actor", viewer)
    assert read_only.returncode == 2
    assert f"forbidden: {viewer} (role viewer) may not documents:write" in one_line(read_only.stderr)
    ghost = uuid.uuid4()
    no_owner = fleet(doc_settings, "documents", "upload", str(tmp_path / "a.pdf"), "--owner", f"driver:{ghost}",
                     "--kind", "licence", "--actor", actor)
    assert no_owner.returncode == 2 and f"no driver with id {ghost}" in one_line(no_owner.stderr)
    assert await objects_under(doc_settings, f"documents/vehicle/{vehicle}/") == []
    assert await objects_under(doc_settings, f"documents/driver/{ghost}/") == []


async def test_the_same_file_for_the_same_owner_and_kind_is_stored_once(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
    tmp_path: Path,
) -> None:
    (vehicle,) = await make_vehicles(1)
    actor = await make_user(conn)
    scan = tmp_path / "registration.pdf"
    scan.write_bytes(pdf(300_000))

    def upload(kind: str) -> dict[str, object]:
        out = fleet(doc_settings, "documents", "upload", str(scan), "--owner", f"vehicle:{vehicle}", "--kind", kind,
                    "--actor", actor, "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    first, second = upload("registration"), upload("registration")
    other_kind = upload("other")

    assert first["created"] is True and second["created"] is False and second["id"] == first["id"]
    assert other_kind["created"] is True
    assert await conn.fetchval("SELECT count(*) FROM documents WHERE owner_id = $1", vehicle) == 2
    assert sorted(await objects_under(doc_settings, f"documents/vehicle/{vehicle}/")) == sorted(
        [first["object_key"], other_kind["object_key"]])
    listed = fleet(doc_settings, "documents", "list", "--owner", f"vehicle:{vehicle}", "--json")
    assert [d["id"] for d in json.loads(listed.stdout)] == [other_kind["id"], first["id"]]


# --- presigned PUT and document.attach through the command topic ----------------------------------


async def in_transit_shipment(conn: asyncpg.Connection, vehicle: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID]:
    """A job in transit with one shipment; returns (job id, shipment id)."""
    actor = TEST_ADMIN
    customer = await customers.register_customer(conn, actor=actor, data={"name": "Acme"})
    driver = await drivers.register_driver(conn, actor=actor, data={"name": "Dana"})
    booking = await assignments.create_assignment(
        conn, actor=actor, vehicle_id=vehicle, driver_id=uuid.UUID(driver["id"]),
        start_time=datetime.now(timezone.utc) - timedelta(hours=1), end_time=None)
    job = await jobs.create_job(conn, actor=actor, data={"customer_id": customer["id"],
                                                       "shipments": [{"type": "pallet", "weight_kg": 100}]})
    job_id = uuid.UUID(job["id"])
    await jobs.assign_job(conn, actor=actor, job_id=job_id, assignment_id=uuid.UUID(booking["id"]))
    await jobs.set_job_status(conn, actor=actor, job_id=job_id, status="in_transit")
    return job_id, uuid.UUID(job["shipments"][0]["id"])


async def test_a_presigned_put_then_document_attach_delivers_the_shipment(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:10]
    s = doc_settings.model_copy(update={"commands_topic": f"test.commands.{tag}",
                                        "commands_dlq_topic": f"test.commands.dlq.{tag}",
                                        "commands_group": f"test-commands-{tag}"})
    await ensure_topics(s, [s.commands_topic, s.commands_dlq_topic], partitions=1)
    (vehicle,) = await make_vehicles(1)
    driver_user = await make_user(conn, "driver")
    job_id, shipment = await in_transit_shipment(conn, vehicle)
    env = {"COMMANDS_TOPIC": s.commands_topic, "COMMANDS_DLQ_TOPIC": s.commands_dlq_topic,
           "COMMANDS_GROUP": s.commands_group}

    # A clerk may write documents but not deliver shipments; a driver may not write other documents.
    clerk = await make_user(conn)
    refused = fleet(s, "documents", "url", "--put", "--owner", f"shipment:{shipment}", "--kind", "proof_of_delivery",
                    "--actor", clerk)
    assert refused.returncode == 2 and "may not shipments:deliver" in one_line(refused.stderr)
    refused = fleet(s, "documents", "url", "--put", "--owner", f"shipment:{shipment}", "--kind", "receipt",
                    "--actor", driver_user)
    assert refused.returncode == 2 and "may not documents:write" in one_line(refused.stderr)
    photo_file = tmp_path / "pod.jpg"
    photo_file.write_bytes(JPEG_HEAD + os.urandom(1000))
    refused = fleet(s, "documents", "upload", str(photo_file), "--owner", f"shipment:{shipment}", "--kind",
                    "proof_of_delivery", "--actor", clerk)
    assert refused.returncode == 2 and "may not shipments:deliver" in one_line(refused.stderr)
    assert await conn.fetchval("SELECT status FROM shipments WHERE id = $1", shipment) != "delivered"

    out = fleet(s, "documents", "url", "--put", "--owner", f"shipment:{shipment}", "--kind", "proof_of_delivery",
                "--actor", driver_user, "--json")
    assert out.returncode == 0, out.stderr
    handed = json.loads(out.stdout)
    assert handed["key"].startswith(f"incoming/shipment/{shipment}/")
    photo = JPEG_HEAD + os.urandom(50_000)

    def put(body: bytes) -> None:  # the driver's phone uploads itself
        request = urllib.request.Request(handed["url"], data=body, method="PUT")
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200

    put(photo)

    good, wrong_hash, never_put, elsewhere, not_theirs = (uuid.uuid4() for _ in range(5))
    data = {"key": handed["key"], "owner_type": "shipment", "owner_id": str(shipment),
            "kind": "proof_of_delivery", "file_name": "delivered.jpg",
            "sha256": hashlib.sha256(photo).hexdigest(), "size": len(photo)}
    user_id = await conn.fetchval("SELECT id FROM users WHERE email = $1", driver_user)
    keys = TokenKeys("HS256", s.jwt_issuer, s.jwt_audience, s.jwt_max_ttl_seconds, TEST_JWT_SECRET, TEST_JWT_SECRET)
    token = issue(keys, user_id, ttl_seconds=600, now=time.time())[0]
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(s.commands_topic, command_value(
            "document.attach", {**data, "sha256": "0" * 64}, command_id=wrong_hash, token=token))
        await producer.send_and_wait(s.commands_topic, command_value(
            "document.attach", {**data, "key": f"incoming/shipment/{shipment}/{uuid.uuid4()}"},
            command_id=never_put, token=token))
        await producer.send_and_wait(s.commands_topic, command_value(
            "document.attach", {**data, "owner_id": str(job_id), "owner_type": "transport_job"},
            command_id=elsewhere, token=token))
        await producer.send_and_wait(s.commands_topic, command_value(
            "document.attach", {**data, "kind": "receipt"}, command_id=not_theirs, token=token))
        await producer.send_and_wait(s.commands_topic, command_value(
            "document.attach", data, command_id=good, token=token))
    finally:
        await producer.stop()

    consumed = await asyncio.to_thread(fleet, s, "commands", "consume", "--stop-when-idle", "3", **env)
    assert consumed.returncode == 0, consumed.stderr

    document = await conn.fetchrow("SELECT * FROM documents WHERE shipment_id = $1", shipment)
    assert document["object_key"].startswith(f"documents/shipment/{shipment}/")
    assert document["owner_type"] == "shipment" and document["kind"] == "proof_of_delivery"
    assert document["content_type"] == "image/jpeg" and document["size_bytes"] == len(photo)
    assert await objects_under(s, f"incoming/shipment/{shipment}/") == []  # copied out, then removed
    row = await conn.fetchrow("SELECT status, delivered_at FROM shipments WHERE id = $1", shipment)
    assert row["status"] == "delivered" and row["delivered_at"] is not None
    assert await conn.fetchval("SELECT status FROM transport_jobs WHERE id = $1", job_id) == "delivered"
    audit = await conn.fetch("SELECT action, actor FROM audit_logs WHERE entity_id = ANY($1::text[]) ORDER BY id",
                           [str(shipment), str(document["id"])])
    assert [(a["action"], a["actor"]) for a in audit] == [("document.attach", str(user_id)),
                                                          ("shipment.deliver", str(user_id))]
    rejected = {r["command_id"]: (r["reason"], r["detail"]) for r in await conn.fetch(
        "SELECT command_id, reason, detail FROM processed_commands WHERE outcome = 'rejected'"
        " AND command_id = ANY($1::uuid[])", [wrong_hash, never_put, elsewhere, not_theirs])}
    assert rejected[wrong_hash][0] == "invalid_input" and "SHA-256" in rejected[wrong_hash][1]
    assert rejected[never_put][0] == "not_found" and "no object" in rejected[never_put][1]
    assert rejected[elsewhere][0] == "invalid_input" and "is not a key handed out for" in rejected[elsewhere][1]
    assert rejected[not_theirs][0] == "forbidden" and "may not documents:write" in rejected[not_theirs][1]
    dead = await read_topic(s, s.commands_dlq_topic, 4)
    assert sorted(dict(d.headers)["fleet.error.reason"] for d in dead) == ["forbidden", "invalid_input",
                                                                          "invalid_input", "not_found"]

    # The URL is still valid: other bytes put to it change nothing stored, and only make an
    # incoming orphan that maintenance removes after the grace period.
    put(JPEG_HEAD + os.urandom(1000))
    shown = fleet(s, "documents", "url", str(document["id"]), "--actor", driver_user, "--json")
    assert shown.returncode == 2 and "may not documents:read" in one_line(shown.stderr)  # a clerk may
    shown = fleet(s, "documents", "url", str(document["id"]), "--actor", clerk, "--json")
    assert shown.returncode == 0, shown.stderr
    with urllib.request.urlopen(json.loads(shown.stdout)["url"], timeout=30) as answer:
        assert answer.read() == photo
        assert answer.headers["Content-Type"] == "image/jpeg"
        assert answer.headers["Content-Disposition"] == 'attachment; filename="delivered.jpg"'
    assert await objects_under(s, f"incoming/shipment/{shipment}/") == [handed["key"]]
    ctx = pass_at(conn, s, datetime.now(timezone.utc) + timedelta(hours=25))
    await clean_document_storage(ctx)
    assert await objects_under(s, f"incoming/shipment/{shipment}/") == []
    assert await objects_under(s, f"documents/shipment/{shipment}/") == [document["object_key"]]


async def test_an_object_put_again_while_it_is_checked_is_not_attached(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
) -> None:
    (vehicle,) = await make_vehicles(1)
    actor = await make_user(conn)
    first, second = pdf(5000), pdf(5000)
    async with Storage.open(doc_settings) as storage:
        handed = await transfer.presign_put(conn, storage, "vehicle", vehicle, kind="receipt", actor=actor, seconds=60)
        await storage.client.put_object(Bucket=storage.bucket, Key=handed["key"], Body=first)
        chunks = storage.chunks

        async def replaced_meanwhile(key: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
            await storage.client.put_object(Bucket=storage.bucket, Key=key, Body=second)
            async for chunk in chunks(key, *args, **kwargs):  # type: ignore[arg-type]
                yield chunk

        storage.chunks = replaced_meanwhile  # type: ignore[method-assign]
        with pytest.raises(Conflict, match="changed while it was being read"):
            await transfer.attach_object(conn, storage, transfer.Upload("vehicle", vehicle, "receipt", "r.pdf"),
                                         handed["key"], sha256=hashlib.sha256(first).hexdigest(), size=5000,
                                         actor=actor)
    assert await conn.fetchval("SELECT count(*) FROM documents WHERE vehicle_id = $1", vehicle) == 0
    assert await objects_under(doc_settings, f"documents/vehicle/{vehicle}/") == []


# --- maintenance: orphans, deleted documents, stale multipart uploads --------------------------------


def pass_at(conn: asyncpg.Connection, settings: Settings, now: datetime) -> PassContext:
    return PassContext(conn, LifecyclePolicy.from_settings(settings), now, settings=settings)


async def test_maintain_removes_old_orphans_and_deleted_documents_objects_and_keeps_young_ones(
    doc_settings: Settings, conn: asyncpg.Connection, make_vehicles: Callable[[int], Awaitable[list[uuid.UUID]]],
    tmp_path: Path,
) -> None:
    (vehicle,) = await make_vehicles(1)
    actor = await make_user(conn)
    prefix = f"documents/vehicle/{vehicle}/"
    orphan = f"{prefix}{uuid.uuid4()}"  # an upload stopped before its row was inserted
    async with Storage.open(doc_settings) as storage:
        await storage.client.put_object(Bucket=storage.bucket, Key=orphan, Body=b"half a story")
        stale = await storage.client.create_multipart_upload(Bucket=storage.bucket, Key=f"{prefix}{uuid.uuid4()}")
    (tmp_path / "old.pdf").write_bytes(pdf(2000))
    up = fleet(doc_settings, "documents", "upload", str(tmp_path / "old.pdf"), "--owner", f"vehicle:{vehicle}",
               "--kind", "receipt", "--actor", actor, "--json")
    document = json.loads(up.stdout)
    deleted = fleet(doc_settings, "documents", "delete", document["id"], "--actor", actor)
    assert deleted.returncode == 0, deleted.stderr

    # Now, a real pass: everything is young; the orphan and the deleted document's object stay.
    passed = fleet(doc_settings, "maintain", "--json")
    assert passed.returncode == 0, passed.stderr
    assert json.loads(passed.stdout)["documents"]["young_orphans_kept"] >= 1
    assert sorted(await objects_under(doc_settings, prefix)) == sorted([orphan, document["object_key"]])

    # A day later the orphan and the stale multipart upload go; the deleted document's object
    # waits for its own grace period (30 days).
    ctx = pass_at(conn, doc_settings, datetime.now(timezone.utc) + timedelta(hours=25))
    await clean_document_storage(ctx)
    assert ctx.report.documents.skipped == ""
    assert await objects_under(doc_settings, prefix) == [document["object_key"]]
    async with Storage.open(doc_settings) as storage:
        assert stale["UploadId"] not in {u.upload_id for u in await storage.pending_uploads()}

    ctx = pass_at(conn, doc_settings, datetime.now(timezone.utc) + timedelta(days=31))
    await clean_document_storage(ctx)
    assert await objects_under(doc_settings, prefix) == []
    assert await conn.fetchval("SELECT object_removed_at IS NOT NULL FROM documents WHERE id = $1",
                             uuid.UUID(document["id"]))
    shown = fleet(doc_settings, "documents", "show", document["id"], "--json")
    assert json.loads(shown.stdout)["deleted_at"] is not None


# --- expiry alerts ---------------------------------------------------------------------------------


async def test_an_expiring_licence_raises_one_alert_resolved_by_a_newer_licence(
    doc_settings: Settings, conn: asyncpg.Connection, tmp_path: Path,
) -> None:
    actor = await make_user(conn)
    driver = await drivers.register_driver(conn, actor=TEST_ADMIN, data={"name": "Lee"})
    owner = f"driver:{driver['id']}"
    soon = (date.today() + timedelta(days=10)).isoformat()
    later = (date.today() + timedelta(days=800)).isoformat()

    def upload(name: str, kind: str, expires_on: str) -> dict[str, object]:
        (tmp_path / name).write_bytes(pdf(3000))
        out = fleet(doc_settings, "documents", "upload", str(tmp_path / name), "--owner", owner, "--kind", kind,
                    "--expires-on", expires_on, "--actor", actor, "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    async def open_alerts() -> list[asyncpg.Record]:
        return await conn.fetch("SELECT entity_type, details FROM alerts WHERE entity_id = $1"
                              " AND type = 'document_expiring' AND NOT is_resolved ORDER BY id",
                              uuid.UUID(driver["id"]))

    licence = upload("licence.pdf", "licence", soon)
    insurance = upload("insurance.pdf", "insurance", soon)
    for _ in range(2):  # a second check raises nothing more
        await check_document_expiry(pass_at(conn, doc_settings, datetime.now(timezone.utc)))
    alerts = await open_alerts()
    assert sorted((a["entity_type"], a["details"]["document_id"]) for a in alerts) == sorted([
        ("driver", licence["id"]), ("driver", insurance["id"])])  # one per document, both on the driver

    renewed = upload("licence-2026.pdf", "licence", later)
    await check_document_expiry(pass_at(conn, doc_settings, datetime.now(timezone.utc)))

    assert [a["details"]["document_id"] for a in await open_alerts()] == [insurance["id"]]
    resolved = await conn.fetchrow("SELECT details FROM alerts WHERE type = 'document_expiring' AND is_resolved"
                                 " AND details->>'document_id' = $1", licence["id"])
    assert resolved["details"]["resolution"] == "newer document attached"
    assert renewed["id"] != licence["id"]

    assert fleet(doc_settings, "documents", "delete", str(insurance["id"]), "--actor", actor).returncode == 0
    assert await open_alerts() == []
