"""Read a run directory for the report (where its files lie: :mod:`fedmeta.paths`).

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

Keys: a party named in ``--trust`` (:mod:`fedmeta.report.trust`) is checked
against the key given from outside the run; any other party only against the
public key file in the run directory (self-asserted evidence: whoever holds
the directory could have replaced key and log together). A log whose key or
actor is not the party's contributes no content. Every unsigned file is read
defensively: a non-UTF-8, truncated or wrongly typed file is a one-line
:class:`ReportError` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedmeta.audit import AuditError, Entry, Receipt, VerifyResult, read_log
from fedmeta.config import ConfigError, RunConfig
from fedmeta.paths import (
    CONFIG_FILE,
    DECISIONS_FILE,
    LEDGER_FILE,
    METRICS_FILE,
    MODEL_FILE,
    SERVER_AUDIT_KEY,
    SITE_AUDIT_KEY,
    SITES_DIR,
    SUMMARY_FILE,
)
from fedmeta.paths import MANIFEST_FILE as SITE_MANIFEST
from fedmeta.paths import SERVER_AUDIT_LOG as SERVER_LOG
from fedmeta.paths import SERVER_AUDIT_PUBKEY as SERVER_PUBKEY
from fedmeta.paths import SITE_AUDIT_LOG as SITE_LOG
from fedmeta.paths import SITE_AUDIT_PUBKEY as SITE_PUBKEY
from fedmeta.report.metrics_schema import check_line, check_summary
from fedmeta.report.trust import Anchor
from policies import Decision, DeclarationError, RunDeclaration, SiteManifest, load_site_manifest
from policies.validation import format_validation_error


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
    anchor: Anchor | None = None  # the party's key as given from outside the run (--trust)

    @property
    def key_pinned(self) -> bool:
        return self.anchor is not None or self.key_path.exists()

    @property
    def key_source(self) -> str:
        """``trusted`` (--trust), ``run directory`` (a key file beside the log) or
        ``embedded`` (the key the log's first entry names)."""
        if self.anchor is not None:
            return "trusted"
        return "run directory" if self.key_path.exists() else "embedded"

    @property
    def needed(self) -> bool:
        """A missing log matters when another party holds receipts of it."""
        return self.exists or bool(self.receipt_sources) or bool(self.bad_receipts)

    @property
    def ok(self) -> bool:
        if not self.exists:
            return not self.needed
        return (
            self.error is None
            and self.result is not None
            and self.result.ok
            and not self.bad_receipts
        )


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
    trust: dict[str, Anchor] = field(default_factory=dict)
    private_keys: list[str] = field(default_factory=list)  # private key files in the run dir

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

    @property
    def keys_trusted(self) -> bool:
        """Every log present was checked against a key given from outside the run."""
        logs = [self.server_log, *(s.log for s in self.sites.values())]
        return all(lg.anchor is not None for lg in logs if lg.exists)

    @property
    def run_end(self) -> Entry | None:
        return next((e for e in self.server_entries if e.action == "run.end"), None)

    def named_sites(self) -> dict[str, set[str]]:
        """Site -> how the server's signed log names it: ``decided`` (run-level rules),
        ``unusable``, ``sampled``, ``receipt``, ``declined``."""
        out: dict[str, set[str]] = {}

        def add(site: Any, how: str) -> None:
            if isinstance(site, str) and site and not site.startswith("node-"):
                out.setdefault(site, set()).add(how)

        for e in self.server_entries:
            if e.action == "policy.run":
                add(e.details.get("site"), "decided")
            elif e.action == "site.unusable":
                add(e.details.get("site"), "unusable")
            elif e.action == "round.start":
                for s in str(e.details.get("sites") or "").split(","):
                    add(s.strip(), "sampled")
            elif e.action == "round.receipt":
                add(e.details.get("site"), "receipt")
            elif e.action == "round.end":
                for k in e.details:
                    if k.startswith("declined:"):
                        add(k.split(":", 1)[1], "declined")
        return out


def _text(path: Path) -> str:
    if not path.is_file():  # a FIFO or device would block or never end
        raise ReportError(f"{path}: not a regular file; restore the file written by the run")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ReportError(
            f"{path}: not UTF-8 text (byte {exc.start}); restore the file written by the run"
        ) from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _json(path: Path, required: bool = True, kind: type = dict) -> Any:
    if not path.exists():
        if required:
            raise ReportError(f"{path}: missing; is this a fedmeta run directory?")
        return None
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{path}: not JSON ({exc.msg} at line {exc.lineno}; truncated?)"
        ) from None
    except RecursionError:
        raise ReportError(f"{path}: not JSON (nested too deeply)") from None
    if not isinstance(data, kind):
        raise ReportError(f"{path}: expected a JSON {kind.__name__}, found {type(data).__name__}")
    return data


def _metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise ReportError(f"{path}: missing; is this a fedmeta run directory?")
    out = []
    for no, line in enumerate(_text(path).splitlines(), start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path} line {no}: not JSON ({exc.msg})") from None
        except RecursionError:
            raise ReportError(f"{path} line {no}: not JSON (nested too deeply)") from None
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("round"), int)
            or isinstance(rec.get("round"), bool)
        ):
            raise ReportError(f"{path} line {no}: not a metrics line (no round)")
        problem = check_line(rec)
        if problem:
            raise ReportError(f"{path} line {no}: {problem}")
        out.append(rec)
    return out


def _site_ids(
    run_dir: Path,
    metrics: list[dict],
    manifests: dict,
    summary: dict | None,
) -> list[str]:
    ids = set(manifests)
    for m in metrics:
        for key in ("sampled", "used"):
            ids.update(m.get(key) or [])
        for key in ("declined", "dropped", "lost", "denied"):
            ids.update((m.get(key) or {}).keys())
        ids.update(m.get("eligible") or [])
    ids.update((summary or {}).get("sites") or [])
    ids = {i for i in ids if isinstance(i, str) and i}
    sites_dir = run_dir / SITES_DIR
    if sites_dir.is_dir():
        ids.update(p.name for p in sites_dir.iterdir() if p.is_dir())
    return sorted(i for i in ids if not i.startswith("node-"))


def _read_site(
    run_dir: Path, site_id: str, manifests: dict[str, SiteManifest], anchor: Anchor | None = None
) -> SiteFiles:
    site_dir = run_dir / SITES_DIR / site_id
    manifest = manifests.get(site_id)
    if manifest is None and (site_dir / SITE_MANIFEST).exists():
        _text(site_dir / SITE_MANIFEST)  # readable text in a regular file, or one line
        try:
            manifest = load_site_manifest(site_dir / SITE_MANIFEST)
        except (DeclarationError, ValueError, OSError) as exc:
            raise ReportError(
                f"{site_dir / SITE_MANIFEST}: unreadable site manifest "
                f"({str(exc).splitlines()[0][:200]})"
            ) from None
    ledger, ledger_error = None, None
    if (site_dir / LEDGER_FILE).exists() and not (site_dir / LEDGER_FILE).is_file():
        ledger_error = f"{site_dir / LEDGER_FILE}: not a regular file"
    elif (site_dir / LEDGER_FILE).exists():
        from fedmeta.privacy.ledger import LedgerError, PrivacyLedger

        try:
            ledger = PrivacyLedger.read(site_dir / LEDGER_FILE)
        except (LedgerError, ValueError, TypeError, KeyError) as exc:
            ledger_error = str(exc).splitlines()[0] if str(exc) else repr(exc)
    log_path = site_dir / SITE_LOG
    log = LogRead(site_id, log_path, site_dir / SITE_PUBKEY, log_path.exists(), anchor=anchor)
    return SiteFiles(site_id, site_dir, manifest, ledger, ledger_error, log)


def _read(log: LogRead, receipts: list[Receipt]) -> None:
    try:
        key = None if log.anchor is not None else (log.key_path if log.key_path.exists() else None)
        log.entries, log.result = read_log(log.path, public_key=key, receipts=receipts)
    except AuditError as exc:
        log.error = str(exc)
        return
    result = log.result
    if log.anchor is not None and result.key_fingerprint not in (None, log.anchor.fingerprint):
        log.error = (
            f"the log was created with key {result.key_fingerprint}, not the key "
            f"given for {log.party} by --trust ({log.anchor.fingerprint}, "
            f"{log.anchor.source}): key substituted and the log re-signed"
        )
    elif result.actor is not None and result.actor != log.party:
        log.error = (
            f"the log's actor is {result.actor!r} but it is filed as "
            f"{log.party!r} (a copied or misfiled log)"
        )
    if log.error is not None:
        log.entries = []  # a log of the wrong key or party contributes nothing


def _first_pass(log: LogRead) -> None:
    """Read the entries (the valid prefix) without receipts (once)."""
    if log.exists and log.result is None and log.error is None:
        _read(log, [])


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
    _read(log, [Receipt.parse(r) for r in log.receipt_sources])


def verify_logs(files: RunFiles) -> None:
    """Verify the server's and the sites' logs, cross-checking their receipts."""
    server = files.server_log
    _first_pass(server)
    for site in files.sites.values():
        _first_pass(site.log)
    # only this run's evidence: a site's log holds every run it took part in (and a reused
    # out-dir's server log earlier runs), whose receipts and heads point elsewhere
    for e in files.server_entries:
        if e.action == "round.receipt":
            site = files.sites.get(str(e.details.get("site")))
            if site is not None:
                _add_receipt(
                    site.log,
                    e.details.get("receipt"),
                    f"server log entry {e.seq} (round {e.round})",
                )
    head = (files.summary or {}).get("audit_head")
    if head:
        _add_receipt(server, head, "summary.json audit_head")
    anchors = (files.summary or {}).get("anchors")
    for site_id, text in anchors.items() if isinstance(anchors, dict) else ():
        site = files.sites.get(str(site_id))
        if site is not None and ":" in str(text) and not str(text).startswith("not "):
            _add_receipt(site.log, text, "summary.json anchors (the site's run.anchor entry)")
    for site in files.sites.values():
        for e in site.log.entries:
            if e.run_id != files.run_id:
                continue
            if e.action in ("round.train", "run.anchor") and e.details.get("server_head"):
                where = f"round {e.round}" if e.action == "round.train" else "run.anchor"
                _add_receipt(
                    server, e.details["server_head"], f"{site.site_id} log entry {e.seq} ({where})"
                )
    _second_pass(server)
    for site in files.sites.values():
        _second_pass(site.log)


def _private_keys(run_dir: Path) -> list[str]:
    found = [run_dir / SERVER_AUDIT_KEY]
    sites_dir = run_dir / SITES_DIR
    if sites_dir.is_dir():
        found += sorted(d / SITE_AUDIT_KEY for d in sites_dir.iterdir() if d.is_dir())
    return [str(f.relative_to(run_dir)) for f in found if f.is_file()]


def read_run(
    run_dir: Path, site: str | None = None, trust: dict[str, Anchor] | None = None
) -> RunFiles:
    """Load a run directory (and only ``site``'s files when given) and verify its logs,
    each against the key ``trust`` gives for its party where it gives one."""
    run_dir = Path(run_dir)
    trust = dict(trust or {})
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    config_raw = _json(run_dir / CONFIG_FILE)
    try:
        config = RunConfig.from_flat(config_raw, source=str(run_dir / CONFIG_FILE))
    except (ConfigError, ValueError, TypeError) as exc:
        raise ReportError(str(exc).splitlines()[0]) from None
    metrics = _metrics(run_dir / METRICS_FILE)
    summary = _json(run_dir / SUMMARY_FILE, required=False)
    problem = check_summary(summary) if summary is not None else None
    if problem:
        raise ReportError(f"{run_dir / SUMMARY_FILE}: {problem}")
    doc = _json(run_dir / DECISIONS_FILE)
    try:
        declaration = RunDeclaration.model_validate(doc["declaration"])
        manifests = {
            k: SiteManifest.model_validate(v) for k, v in (doc.get("manifests") or {}).items()
        }
        decisions = [Decision.from_dict(d) for d in doc.get("decisions") or []]
        eligible = [str(x) for x in doc.get("eligible") or []]
        unusable = {str(k): str(v) for k, v in dict(doc.get("unusable") or {}).items()}
    except ValidationError as exc:
        raise ReportError(
            f"{run_dir / DECISIONS_FILE}: unreadable ({format_validation_error(exc, '')})"
        ) from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        first = (str(exc).splitlines() or [repr(exc)])[0]
        raise ReportError(f"{run_dir / DECISIONS_FILE}: unreadable ({first})") from None
    ids = _site_ids(run_dir, metrics, manifests, summary)
    if site is not None:
        if site not in ids:
            raise ReportError(
                f"option '--site': {site!r} is not a site of this run "
                f"(sites: {', '.join(ids) or 'none'})"
            )
        ids = [site]
    run_id = str(
        doc.get("run")
        or (summary or {}).get("run")
        or (metrics[0].get("run") if metrics else "")
        or "unknown"
    )
    # a reused out-dir's metrics.jsonl also holds earlier runs: only this run's lines count
    metrics = [m for m in metrics if m.get("run") in (None, run_id)]
    server_path = run_dir / SERVER_LOG
    files = RunFiles(
        run_dir=run_dir,
        run_id=run_id,
        config=config,
        config_raw=config_raw,
        metrics=metrics,
        summary=summary,
        declaration=declaration,
        declaration_raw=dict(doc["declaration"]),
        manifests=manifests,
        decisions=decisions,
        eligible=eligible,
        unusable=unusable,
        server_log=LogRead(
            "server",
            server_path,
            run_dir / SERVER_PUBKEY,
            server_path.exists(),
            anchor=trust.get("server"),
        ),
        sites={i: _read_site(run_dir, i, manifests, trust.get(i)) for i in ids},
        model_path=run_dir / MODEL_FILE,
        trust=trust,
        private_keys=_private_keys(run_dir),
    )
    if not files.server_log.exists:
        raise ReportError(f"{server_path}: missing; the run has no server audit log")
    if site is None:  # a site the signed server log names but no file does: read it too
        _first_pass(files.server_log)
        for missing in sorted(set(files.named_sites()) - set(files.sites)):
            files.sites[missing] = _read_site(run_dir, missing, manifests, trust.get(missing))
        files.sites = dict(sorted(files.sites.items()))
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
