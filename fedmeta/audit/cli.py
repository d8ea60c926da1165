"""Command line: ``fedmeta audit verify|repair`` and ``fedmeta keys create|show-public``.

``audit_app`` and ``keys_app`` are mounted by ``fedmeta/cli.py``. Exit codes of
``audit verify``: 0 the log verifies, 1 it does not (the first bad entry is
printed), 2 the input could not be read (log, public key or a receipt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedmeta.audit.entry import validate_actor
from fedmeta.audit.errors import AuditError, InvalidEntryError, KeyFileError, ReceiptFormatError
from fedmeta.audit.keys import (
    create_key,
    fingerprint,
    load_private_key,
    load_public_key,
    public_key_path,
    public_pem,
)
from fedmeta.audit.log import AuditLog
from fedmeta.audit.receipt import Receipt
from fedmeta.audit.verify import read_log, verify_log
from fedmeta.cli_common import fail as _fail

audit_app = typer.Typer(
    help="Verify and repair tamper-evident audit logs (hash-chained, Ed25519-signed).",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="Create and inspect the Ed25519 keys that sign each party's audit log.",
    no_args_is_help=True,
)


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


@audit_app.command("verify")
def verify_cmd(
    log: Annotated[Path, typer.Argument(help="Audit log file (JSON Lines).")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="The party's public key (PEM) to pin; "
            "default: trust the key embedded in the log's first entry.",
        ),
    ] = None,
    receipt: Annotated[
        list[str] | None,
        typer.Option(
            "--receipt",
            help="SEQ:HASH receipt kept by a peer (repeatable); catches truncation/rewrites.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check every entry's hash chain, canonical form and signature, and the receipts."""
    try:
        receipts = [Receipt.parse(r) for r in receipt or []]
    except ReceiptFormatError as e:
        raise _fail(str(e), 2) from None
    try:
        result = verify_log(log, public_key=public_key, receipts=receipts)
    except AuditError as e:
        raise _fail(str(e), 2) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), sort_keys=True))
    else:
        _out().print(result.summary(), style="green" if result.ok else "bold red", markup=False)
    raise typer.Exit(0 if result.ok else 1)


@audit_app.command("repair")
def repair_cmd(
    log: Annotated[Path, typer.Argument(help="Audit log whose last line is incomplete.")],
    key: Annotated[Path, typer.Option("--key", help="The party's private key (PEM).")],
    actor: Annotated[
        str | None, typer.Option("--actor", help="Party id; default: the log's actor.")
    ] = None,
) -> None:
    """Move an incomplete last line to LOG.partial and record a signed 'log.repaired'."""
    try:
        if actor is None:
            actor = read_log(log)[1].actor
            if actor is None:
                raise _fail(f"{log} has no valid entry to take the actor from; pass --actor", 2)
        entry = AuditLog.repair_partial_tail(log, key, actor)
    except AuditError as e:
        raise _fail(str(e), 1) from None
    d = entry.details
    _out().print(
        f"repaired {log}: moved {d['partial_bytes']} bytes to {d['partial_file']}, "
        f"recorded entry {entry.receipt()}",
        markup=False,
    )


@keys_app.command("create")
def keys_create_cmd(
    name: Annotated[str, typer.Argument(help="Party id, e.g. 'server' or 'site-3'.")],
    directory: Annotated[
        Path, typer.Option("--dir", help="Directory for NAME.pem and NAME.pub.pem.")
    ],
) -> None:
    """Create NAME.pem (private, mode 0600) and NAME.pub.pem in DIR."""
    try:
        validate_actor(name)
    except InvalidEntryError as e:
        raise _fail(f"bad key name: {e}", 2) from None
    path = directory / f"{name}.pem"
    try:
        key = create_key(path)
    except (KeyFileError, OSError) as e:
        raise _fail(str(e), 1) from None
    _out().print(
        f"created {path} (private, mode 0600) and {public_key_path(path)}; "
        f"fingerprint {fingerprint(key)}",
        markup=False,
    )


@keys_app.command("show-public")
def keys_show_public_cmd(
    path: Annotated[Path, typer.Argument(help="A private key (PEM) or public key (PEM).")],
) -> None:
    """Print the public key (PEM) of a private or public key file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _fail(f"cannot read {path}: {e.strerror or e}", 2) from None
    try:
        key = load_private_key(path) if b"PRIVATE KEY" in data else load_public_key(data)
    except KeyFileError as e:
        raise _fail(str(e), 1) from None
    typer.echo(public_pem(key).decode("ascii"), nl=False)
