"""Run declarations a site has approved: it trains only for a run it accepted.

``fedmeta node approve <site-dir> <declaration>`` reads and checks the run
declaration (TOML) the site's DPO accepted and appends its SHA-256 (of the
declaration's canonical JSON, so formatting does not matter) to
``<site-dir>/approved-declarations.jsonl``. A round whose declaration is absent
or hashes to anything else is declined by the site. A simulated site approves
its run's declaration when it is set up.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from fedmeta.durable import append_json_line
from fedmeta.paths import DECLARATION_APPROVALS as APPROVALS_FILE
from policies import RunDeclaration, load_run_declaration


class ApprovalError(ValueError):
    """The approvals file is unreadable (one line, names the file and line)."""


def approved(site_dir: Path) -> dict[str, dict]:
    """sha256 -> approval record, read from the site's file ({} if there is none)."""
    path = Path(site_dir) / APPROVALS_FILE
    if not path.exists():
        return {}
    out: dict[str, dict] = {}
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            digest = str(rec["sha256"])
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("sha256 must be 64 hex digits")
        except (ValueError, KeyError, TypeError) as exc:
            raise ApprovalError(
                f"{path} line {no}: unreadable approval ({exc}); fix or "
                "remove the line, then approve the declaration again"
            ) from None
        out[digest] = rec
    return out


def approve(site_dir: Path, declaration: RunDeclaration, source: str = "") -> str:
    """Record the site's approval of ``declaration``; returns its sha256 (idempotent)."""
    digest = declaration.sha256()
    if digest in approved(site_dir):
        return digest
    path = Path(site_dir) / APPROVALS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {
        "sha256": digest,
        "purpose": declaration.purpose,
        "dp_enabled": declaration.dp_enabled,
        "epsilon": declaration.epsilon,
        "delta": declaration.delta,
        "source": source,
        "approved_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    append_json_line(path, rec)
    return digest


def approve_file(site_dir: Path, declaration_toml: Path) -> str:
    """Check a run declaration TOML and approve it for the site (DeclarationError if bad)."""
    return approve(site_dir, load_run_declaration(declaration_toml), str(declaration_toml))
