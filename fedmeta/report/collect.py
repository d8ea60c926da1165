"""Read a run directory for the report: the only module that knows where the files are.

A run directory (written by ``server/run.py``, ``fedmeta/site.py`` and the
privacy ledger) holds::

    config.json  metrics.jsonl  summary.json  policy-decisions.json  final_model.pt
    audit/server-audit-log.jsonl        keys/server-audit-signing.pub.pem
    sites/<id>/privacy-ledger.jsonl     sites/<id>/manifest.toml (optional)
    sites/<id>/audit/audit-log.jsonl    sites/<id>/keys/audit-signing.pub.pem

:func:`read_run` loads them and re-verifies every audit log it reads, each
against the public key file beside its signing key (pinned) and against the
receipts the other parties hold: the server's ``round.receipt`` entries for a
site's log, the ``server_head`` each site logged (and the head in
``summary.json``) for the server's log. Only the verified prefix of a log is
used for the report's content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmeta.audit import AuditError, Entry, Receipt, VerifyResult, read_log
from fedmeta.config import ConfigError, RunConfig
from policies import Decision, DeclarationError, RunDeclaration, SiteManifest, load_site_manifest

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DECISIONS_FILE = "policy-decisions.json"
MODEL_FILE = "final_model.pt"
SERVER_LOG = Path("audit") / "server-audit-log.jsonl"
SERVER_PUBKEY = Path("keys") / "server-audit-signing.pub.pem"
SITES_DIR = "sites"
SITE_LOG = Path("audit") / "audit-log.jsonl"
SITE_PUBKEY = Path("keys") / "audit-signing.pub.pem"
SITE_MANIFEST = "manifest.toml"
LEDGER_FILE = "privacy-ledger.jsonl"


class ReportError(ValueError):
    """The run directory cannot be reported on (a user error; one line, names the file)."""


@dataclass
class LogRead:
    """One audit log: its verified entries and how the verification went."""

    party: str
    path: Path
    key_path: Path
    exists: bool
    entries: list[Entry] = field(default_factory=list)
    result: VerifyResult | None = None
    error: str | None = None  # unreadable log or key
    receipt_sources: dict[str, list[str]] = field(default_factory=dict)
    bad_receipts: list[tuple[str, str]] = field(default_factory=list)  # (text, source)

    @property
    def key_pinned(self) -> bool:
        return self.key_path.exists()

    @property
    def needed(self) -> bool:
        """A missing log matters when another party holds receipts of it."""
        return self.exists or bool(self.receipt_sources) or bool(self.bad_receipts)

    @property
    def ok(self) -> bool:
        if not self.exists:
            return not self.needed
        return (self.error is None and self.result is not None and self.result.ok
                and not self.bad_receipts)


@dataclass
class SiteFiles:
    site_id: str
    dir: Path
    manifest: SiteManifest | None
    ledger: Any | None  # fedmeta.privacy.ledger.PrivacyLedger
    ledger_error: str | None
    log: LogRead


@dataclass
class RunFiles:
    run_dir: Path
    run_id: str
    config: RunConfig
    config_raw: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    declaration: RunDeclaration
    declaration_raw: dict[str, Any]
    manifests: dict[str, SiteManifest]
    decisions: list[Decision]
    eligible: list[str]
    unusable: dict[str, str]
    server_log: LogRead
    sites: dict[str, SiteFiles]
    model_path: Path

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.run_dir))
        except ValueError:
            return str(path)

    @property
    def server_entries(self) -> list[Entry]:
        """The server log's verified entries of this run (a reused run directory's log
        also holds earlier runs)."""
        return [e for e in self.server_log.entries if e.run_id == self.run_id]

    @property
    def round_lines(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get("round", 0) > 0]


def _json(path: Path, required: bool = True) -> Any:
    if not path.exists():
        if required:
            raise ReportError(f"{path}: missing; is this a fedmeta run directory?")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read ({exc})") from None


def _metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise ReportError(f"{path}: missing; is this a fedmeta run directory?")
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path} line {no}: not JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("round"), int):
            raise ReportError(f"{path} line {no}: not a metrics line (no round)")
        out.append(rec)
    return out


def _site_ids(run_dir: Path, metrics: list[dict], manifests: dict, summary: dict | None,
              ) -> list[str]:
    ids = set(manifests)
    for m in metrics:
        for key in ("sampled", "used"):
            ids.update(m.get(key) or [])
        for key in ("declined", "dropped", "lost", "denied"):
            ids.update((m.get(key) or {}).keys())
        ids.update(m.get("eligible") or [])
    ids.update((summary or {}).get("sites") or [])
    sites_dir = run_dir / SITES_DIR
    if sites_dir.is_dir():
        ids.update(p.name for p in sites_dir.iterdir() if p.is_dir())
    return sorted(i for i in ids if not i.startswith("node-"))


def _read_site(run_dir: Path, site_id: str, manifests: dict[str, SiteManifest]) -> SiteFiles:
    site_dir = run_dir / SITES_DIR / site_id
    manifest = manifests.get(site_id)
    if manifest is None and (site_dir / SITE_MANIFEST).exists():
        try:
            manifest = load_site_manifest(site_dir / SITE_MANIFEST)
        except DeclarationError as exc:
            raise ReportError(str(exc)) from None
    ledger, ledger_error = None, None
    if (site_dir / LEDGER_FILE).exists():
        from fedmeta.privacy.ledger import LedgerError, PrivacyLedger

        try:
            ledger = PrivacyLedger.read(site_dir / LEDGER_FILE)
        except LedgerError as exc:
            ledger_error = str(exc)
    log_path = site_dir / SITE_LOG
    log = LogRead(site_id, log_path, site_dir / SITE_PUBKEY, log_path.exists())
    return SiteFiles(site_id, site_dir, manifest, ledger, ledger_error, log)


def _first_pass(log: LogRead) -> None:
    """Read the entries (the valid prefix) without receipts."""
    if not log.exists:
        return
    try:
        key = log.key_path if log.key_pinned else None
        log.entries, log.result = read_log(log.path, public_key=key)
    except AuditError as exc:
        log.error = str(exc)


def _add_receipt(log: LogRead, text: Any, source: str) -> None:
    try:
        receipt = Receipt.parse(str(text))
    except ValueError:
        log.bad_receipts.append((str(text), source))
        return
    log.receipt_sources.setdefault(str(receipt), []).append(source)


def _second_pass(log: LogRead) -> None:
    """Verify again, now against the receipts the other parties hold."""
    if not log.exists or log.error is not None:
        return
    try:
        key = log.key_path if log.key_pinned else None
        receipts = [Receipt.parse(r) for r in log.receipt_sources]
        log.entries, log.result = read_log(log.path, public_key=key, receipts=receipts)
    except AuditError as exc:
        log.error = str(exc)


def verify_logs(files: RunFiles) -> None:
    """Verify the server's and the sites' logs, cross-checking their receipts."""
    server = files.server_log
    _first_pass(server)
    for site in files.sites.values():
        _first_pass(site.log)
    for e in server.entries:
        if e.action == "round.receipt":
            site = files.sites.get(str(e.details.get("site")))
            if site is not None:
                _add_receipt(site.log, e.details.get("receipt"),
                             f"server log entry {e.seq} (round {e.round})")
    head = (files.summary or {}).get("audit_head")
    if head:
        _add_receipt(server, head, "summary.json audit_head")
    for site in files.sites.values():
        for e in site.log.entries:
            if e.action == "round.train" and e.details.get("server_head"):
                _add_receipt(server, e.details["server_head"],
                             f"{site.site_id} log entry {e.seq} (round {e.round})")
    _second_pass(server)
    for site in files.sites.values():
        _second_pass(site.log)


def read_run(run_dir: Path, site: str | None = None) -> RunFiles:
    """Load a run directory (and only ``site``'s files when given) and verify its logs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    try:
        config = RunConfig.load(run_dir / CONFIG_FILE)
    except ConfigError as exc:
        raise ReportError(str(exc)) from None
    metrics = _metrics(run_dir / METRICS_FILE)
    summary = _json(run_dir / SUMMARY_FILE, required=False)
    doc = _json(run_dir / DECISIONS_FILE)
    try:
        declaration = RunDeclaration.model_validate(doc["declaration"])
        manifests = {k: SiteManifest.model_validate(v)
                     for k, v in (doc.get("manifests") or {}).items()}
        decisions = [Decision.from_dict(d) for d in doc.get("decisions") or []]
    except (KeyError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ReportError(f"{run_dir / DECISIONS_FILE}: unreadable ({first})") from None
    ids = _site_ids(run_dir, metrics, manifests, summary)
    if site is not None:
        if site not in ids:
            raise ReportError(f"option '--site': {site!r} is not a site of this run "
                              f"(sites: {', '.join(ids) or 'none'})")
        ids = [site]
    run_id = str(doc.get("run") or (summary or {}).get("run")
                 or (metrics[0].get("run") if metrics else "") or "unknown")
    server_path = run_dir / SERVER_LOG
    files = RunFiles(
        run_dir=run_dir, run_id=run_id, config=config,
        config_raw=_json(run_dir / CONFIG_FILE), metrics=metrics, summary=summary,
        declaration=declaration, declaration_raw=dict(doc["declaration"]),
        manifests=manifests, decisions=decisions,
        eligible=list(doc.get("eligible") or []), unusable=dict(doc.get("unusable") or {}),
        server_log=LogRead("server", server_path, run_dir / SERVER_PUBKEY, server_path.exists()),
        sites={i: _read_site(run_dir, i, manifests) for i in ids},
        model_path=run_dir / MODEL_FILE,
    )
    if not files.server_log.exists:
        raise ReportError(f"{server_path}: missing; the run has no server audit log")
    verify_logs(files)
    return files


def read_baseline(run_dir: Path) -> tuple[str, str, list[dict[str, Any]]]:
    """(run id, strategy, metrics lines) of a baseline run (e.g. FedAvg)."""
    run_dir = Path(run_dir)
    metrics = _metrics(run_dir / METRICS_FILE)
    config = _json(run_dir / CONFIG_FILE)
    run_id = str(metrics[0].get("run", run_dir.name)) if metrics else run_dir.name
    return run_id, str((config or {}).get("strategy", "baseline")), metrics


def model_file_encrypted(path: Path) -> bool | None:
    """None if there is no model file; False for a plain PyTorch (zip) file."""
    if not path.exists():
        return None
    with open(path, "rb") as fh:
        return fh.read(4) != b"PK\x03\x04"
