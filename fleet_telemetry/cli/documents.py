"""``fleet documents upload|download|list|show|delete|url``: documents in object storage.

Every action takes ``--actor``, an active user's e-mail or id (default ``FLEET_ACTOR``):
writes need ``documents:write`` (a shipment's proof of delivery ``shipments:deliver``),
``download``, ``list``, ``show`` and a GET URL ``documents:read``. Bad input (an unknown owner or actor, a kind
that refuses the file's content type, a file too large) ends with one line and exit
status 2, nothing stored; a storage or database that does not answer, or a download
whose bytes do not match their SHA-256, with exit status 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson

from fleet_telemetry.cli.fleetops import display_value
from fleet_telemetry.cli.fleetops_table import date_arg, uuid_arg
from fleet_telemetry.cli.parsing import count_arg
from fleet_telemetry.core.settings import Settings
from fleet_telemetry.documents import records, rules, transfer
from fleet_telemetry.documents.actors import READ, uploader
from fleet_telemetry.documents.storage import Storage
from fleet_telemetry.fleetops.db import Database
from fleet_telemetry.fleetops.errors import InvalidInput
from fleet_telemetry.fleetops.vehicles import resolve_vehicle

OWNER_HELP = (f"the owner as TYPE:ID, TYPE one of {', '.join(rules.OWNER_COLUMNS)}"
              " (a vehicle also by VIN or plate: vehicle:WX-123)")


def owner_arg(text: str) -> tuple[str, str]:
    kind, sep, ident = text.partition(":")
    if not sep or not ident.strip():
        raise argparse.ArgumentTypeError(f"not TYPE:ID: {text!r}")
    try:
        return rules.owner_type(kind), ident.strip()
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def kind_arg(text: str) -> str:
    try:
        return rules.kind(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any) -> None:
    parser = sub.add_parser("documents", help="documents in object storage (licences, proofs of delivery, ...)",
                            description="Documents of vehicles, drivers, transport jobs, shipments and maintenance"
                            " records, kept in the bucket FLEET_S3_BUCKET at FLEET_S3_ENDPOINT.")
    actions = parser.add_subparsers(dest="documents_command", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    p = actions.add_parser("upload", help="store a file as a document",
                           description="Streams FILE to the bucket (multipart beyond 8 MiB) computing its SHA-256,"
                           " then registers it. The same bytes for the same owner and kind are stored once: the"
                           " existing document is reported. Allowed content types and sizes depend on the kind.")
    p.add_argument("file", type=Path, help="the file to upload")
    p.add_argument("--owner", type=owner_arg, required=True, help=OWNER_HELP)
    p.add_argument("--kind", type=kind_arg, required=True, help=f"one of {', '.join(rules.KINDS)}")
    p.add_argument("--expires-on", type=date_arg, help="last valid day (YYYY-MM-DD) of a licence, registration"
                   " or insurance")
    p.add_argument("--name", help="the file name to keep (default: FILE's name)")
    _actor(p, "who uploads")
    _json(p)
    p.set_defaults(handler=_upload)

    p = actions.add_parser("download", help="fetch a document's bytes, checking their SHA-256",
                           description="Writes the document to OUTPUT (default: its file name in the current"
                           " folder); exit status 1 and no file when the bytes do not match the recorded SHA-256.")
    p.add_argument("id", type=uuid_arg, help="the document id")
    p.add_argument("--output", "-o", type=Path, default=Path("."), help="a file or folder to write to")
    p.add_argument("--force", action="store_true", help="overwrite the target file if it exists")
    _actor(p, "who reads")
    _json(p)
    p.set_defaults(handler=_download)

    p = actions.add_parser("list", help="documents, newest first",
                           description="Documents newest first, of one owner and/or kind; deleted ones with --all.")
    p.add_argument("--owner", type=owner_arg, help=OWNER_HELP)
    p.add_argument("--kind", type=kind_arg, help="only this kind")
    p.add_argument("--all", action="store_true", help="include deleted documents")
    p.add_argument("--limit", type=count_arg, default=100, help="at most this many (default 100)")
    _actor(p, "who reads")
    _json(p)
    p.set_defaults(handler=_list)

    p = actions.add_parser("show", help="one document (deleted ones too)",
                           description="One document: owner, kind, object key, SHA-256, size, content type,"
                           " uploader, expiry, deletion.")
    p.add_argument("id", type=uuid_arg, help="the document id")
    _actor(p, "who reads")
    _json(p)
    p.set_defaults(handler=_show)

    p = actions.add_parser("delete", help="soft-delete a document",
                           description="Marks the document deleted (audited); fleet maintain removes its object"
                           " after FLEET_DOCUMENT_DELETED_GRACE_DAYS.")
    p.add_argument("id", type=uuid_arg, help="the document id")
    _actor(p, "who deletes")
    _json(p)
    p.set_defaults(handler=_delete)

    p = actions.add_parser("url", help="a presigned URL: GET a document, or --put a new one",
                           description="A presigned GET of document ID (served with its detected content type,"
                           " as an attachment), or with --put a fresh incoming key and a presigned PUT a client"
                           " uploads to itself; then send the command document.attach with that key (the checked"
                           " object is copied to a key of its own). Valid for FLEET_DOCUMENT_URL_SECONDS.")
    p.add_argument("id", type=uuid_arg, nargs="?", help="the document to GET (not with --put)")
    p.add_argument("--put", action="store_true", help="a URL to upload a new document to")
    p.add_argument("--owner", type=owner_arg, help=f"with --put: {OWNER_HELP}")
    p.add_argument("--kind", type=kind_arg, help="with --put: the kind to attach (a shipment's proof_of_delivery"
                   " needs shipments:deliver, the others documents:write)")
    _actor(p, "who asks")
    _json(p)
    p.set_defaults(handler=_url)


def _actor(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--actor", help=f"{what}: an active user's e-mail or id (default FLEET_ACTOR); recorded"
                        " in the audit log")


def _json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


async def _owner(conn: Any, owner: tuple[str, str]) -> tuple[str, UUID]:
    owner_type, ident = owner
    if owner_type == "vehicle":
        return owner_type, await resolve_vehicle(conn, ident)
    try:
        return owner_type, UUID(ident)
    except ValueError:
        raise InvalidInput(f"{owner_type} id {ident!r} is not a UUID") from None


async def _upload(args: argparse.Namespace, settings: Settings) -> int:
    args.actor = args.actor or settings.actor or ""
    async with Database.from_settings(settings, max_size=1) as database, database.write() as conn:
        owner_type, owner_id = await _owner(conn, args.owner)
        upload = transfer.Upload(owner_type, owner_id, args.kind, rules.file_name(args.name or args.file.name),
                                 args.expires_on)
        async with Storage.open(settings) as storage:
            document, created = await transfer.upload_file(conn, storage, args.file, upload, actor=args.actor)
    _print({**document, "created": created}, args.json)
    if not created and not args.json:
        print("(the same file was stored already for this owner and kind: nothing new was kept)")
    return 0


async def _download(args: argparse.Namespace, settings: Settings) -> int:
    async with Database.from_settings(settings, max_size=1) as database, database.write() as conn:
        await uploader(conn, args.actor or settings.actor or "", READ)
        async with Storage.open(settings) as storage:
            document = await transfer.download_file(conn, storage, args.id, args.output, force=args.force)
    _print(document, args.json)
    return 0


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    async with Database.from_settings(settings, max_size=1) as database, database.read() as conn:
        await uploader(conn, args.actor or settings.actor or "", READ)
        owner_id = (await _owner(conn, args.owner))[1] if args.owner else None
        found = await records.find(conn, owner_id=owner_id, kind=args.kind, include_deleted=args.all,
                                   limit=args.limit)
    if args.json:
        _print(found, True)
    elif not found:
        print("(none)")
    for row in [] if args.json else found:
        print("  ".join(f"{c}={display_value(row.get(c))}" for c in
                        ("id", "owner_type", "owner_id", "kind", "file_name", "size_bytes", "expires_on",
                         "created_at", "deleted_at")))
    return 0


async def _show(args: argparse.Namespace, settings: Settings) -> int:
    async with Database.from_settings(settings, max_size=1) as database, database.read() as conn:
        await uploader(conn, args.actor or settings.actor or "", READ)
        document = await records.get(conn, args.id, include_deleted=True)
    _print(document, args.json)
    return 0


async def _delete(args: argparse.Namespace, settings: Settings) -> int:
    args.actor = args.actor or settings.actor or ""
    async with Database.from_settings(settings, max_size=1) as database, database.write() as conn:
        who = await uploader(conn, args.actor)
        document = await records.delete(conn, args.id, actor=str(who))
    _print(document, args.json)
    return 0


async def _url(args: argparse.Namespace, settings: Settings) -> int:
    args.actor = args.actor or settings.actor or ""
    if args.put == (args.id is not None):
        raise InvalidInput("give a document ID for a GET URL, or --put --owner TYPE:ID for an upload URL")
    if args.put and (args.owner is None or args.kind is None):
        raise InvalidInput("--put needs --owner TYPE:ID and --kind KIND")
    seconds = settings.document_url_seconds
    async with Database.from_settings(settings, max_size=1) as database, database.write() as conn:
        async with Storage.open(settings) as storage:
            if args.put:
                owner_type, owner_id = await _owner(conn, args.owner)
                result = await transfer.presign_put(conn, storage, owner_type, owner_id, kind=args.kind,
                                                    actor=args.actor, seconds=seconds)
            else:
                await uploader(conn, args.actor, READ)
                document = await records.get(conn, args.id)
                url = await storage.url_to_get(document["object_key"], seconds, document["file_name"],
                                               document["content_type"])
                result = {"id": document["id"], "url": url, "method": "GET", "expires_in_seconds": seconds}
    _print(result, args.json)
    return 0


def _print(result: Any, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    for key, value in result.items():
        print(f"{key}: {display_value(value)}")

