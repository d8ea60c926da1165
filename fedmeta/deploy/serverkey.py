"""One server audit key for the federation, pinned at every site and checked every round.

``fedmeta provision`` creates the key once, in the coordinator kit
(``keys/server-audit-signing.pem``, 0600; kept on every later provisioning), and
writes its public half into every site kit (``server-audit.pub.pem``), which
``fedmeta node init`` copies into the site directory. ``start-superlink.sh``
exports :data:`SERVER_KEY_ENV`, so the ServerApp signs every run's log with that
key (never a key made on first use in a run directory).

Every round the server sends, beside the model, two entries of its signed log:
``run.start`` (which names the run's declaration hash) and the round's
``round.start`` (which names the hash of the model sent). A site holding a pinned
key checks, before anything else of the round (:func:`check_round`), that both
verify under the pinned key, belong to this run and round, name the declaration
it received and the model it received, and follow the server head it was sent.
Anything else is declined and audited at the site (``SITE-SERVER-KEY``): a round
signed by another key, or one the server's log does not record, never trains.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedmeta.audit import Entry, Receipt
from fedmeta.audit.errors import AuditError
from fedmeta.audit.keys import fingerprint, load_public_key
from fedmeta.paths import PINNED_SERVER_KEY as SITE_PINNED_KEY
from fedmeta.paths import SERVER_AUDIT_KEY_ENV as SERVER_KEY_ENV

RUN_START_KEY, ROUND_START_KEY = "server-run-start", "server-entry"  # round config keys
RULE = "SITE-SERVER-KEY"


def federation_key() -> Path | None:
    """The federation's server audit key the start script names, if any."""
    value = os.environ.get(SERVER_KEY_ENV)
    return Path(value) if value else None


def entry_line(entry: Entry) -> str:
    return entry.line_bytes().decode("utf-8")


def _entry(sent: Any, key: str, pinned, what: str) -> Entry:
    text = sent.get(key)
    if not isinstance(text, str) or not text:
        raise ValueError(f"the round carries no signed {what} of the server")
    try:
        entry = Entry.from_line(text.encode("utf-8"))
    except (AuditError, ValueError) as exc:
        raise ValueError(f"the server's {what} is not an audit entry ({exc})") from None
    if not entry.verify_signature(pinned):
        raise ValueError(
            f"the server's {what} is not signed by the federation's server key "
            f"{fingerprint(pinned)} pinned in {SITE_PINNED_KEY}"
        )
    if entry.actor != "server":
        raise ValueError(f"the {what} was signed for {entry.actor!r}, not the server")
    return entry


def check_round(
    site_dir: Path,
    sent: Any,
    run_id: str,
    server_round: int,
    declaration_sha256: str | None,
    model_sha256: str,
) -> str | None:
    """None if the round is the pinned server's, else why the site refuses it. Without a
    pinned key (a simulation, or a site set up before the key existed) nothing is checked."""
    path = Path(site_dir) / SITE_PINNED_KEY
    if not path.is_file():
        return None
    try:
        pinned = load_public_key(path)
    except AuditError as exc:
        return f"{path}: unreadable pinned server key ({exc})"
    try:
        start = _entry(sent, RUN_START_KEY, pinned, "run.start entry")
        entry = _entry(sent, ROUND_START_KEY, pinned, "round.start entry")
    except ValueError as exc:
        return str(exc)
    if start.action != "run.start" or start.run_id != run_id:
        return f"the signed run.start is for run {start.run_id!r}, not {run_id!r}"
    if (
        declaration_sha256 is not None
        and start.details.get("declaration_sha256") != declaration_sha256
    ):
        return (
            "the declaration sent is not the one the server signed in run.start "
            f"({start.details.get('declaration_sha256')})"
        )
    if entry.action != "round.start" or entry.run_id != run_id or entry.round != server_round:
        return (
            f"the signed round entry is {entry.action} of run {entry.run_id} round "
            f"{entry.round}, not round.start of round {server_round}"
        )
    if entry.model_out != model_sha256:
        return (
            "the model sent is not the one the server signed in round.start "
            f"({entry.model_out}, received {model_sha256})"
        )
    head = sent.get("server-head")
    if head:
        try:
            receipt = Receipt.parse(str(head))
        except (AuditError, ValueError):
            return f"malformed server head {str(head)[:80]!r}"
        if entry.seq <= receipt.seq or (
            entry.seq == receipt.seq + 1 and entry.prev != receipt.hash
        ):
            return f"the signed round.start does not follow the server head {receipt} sent"
    return None


def decline_round(site_dir: Path, site_id: str, run_id: str, server_round: int, reason: str) -> Any:
    """Refuse the round on record (``round.decline``, rule ``SITE-SERVER-KEY``) before
    anything of it is used; returns the site's reply (a decline with its receipt)."""
    from fedmeta.audit import AuditLog
    from fedmeta.paths import SITE_AUDIT_KEY as AUDIT_KEY
    from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG
    from fedmeta.site import SiteReply

    with AuditLog.open(
        Path(site_dir) / AUDIT_LOG, Path(site_dir) / AUDIT_KEY, actor=site_id
    ) as log:
        log.append(
            "round.decline",
            run_id=run_id,
            round=server_round,
            decision="deny",
            rule_ids=[RULE],
            details={"reason": reason[:500]},
        )
        head = log.head()
    return SiteReply(
        site_id, declined=True, reason=f"{RULE}: {reason}", receipt=str(head) if head else ""
    )
