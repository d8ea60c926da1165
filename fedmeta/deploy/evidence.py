"""Evidence from a deployed run: a site exports it, the coordinator imports it, both report.

A deployed site's evidence lives in its own directory, not in the coordinator's run
directory. For one run:

* **export** (at the site, ``fedmeta node export-evidence SITE_DIR --run RUN_ID``):
  one JSON file, ``evidence-<site>-<run>.json``, holding the site's audit log from
  its first entry up to the run's last entry (the hash chain needs every entry
  before; later runs are left out), the privacy-ledger lines of that run and of the
  earlier runs in that log (epsilon is cumulative), the manifest and its SHA-256,
  the manifest hashes the site signed in the run, and the audit public key. The log
  verifies against the site's own key before anything is written. The file holds no
  record, no record id and no feature: the log's schema has no place for them. The
  command prints the file's SHA-256, to read to the coordinator by phone.
* **import** (at the coordinator, ``fedmeta evidence import OUT_DIR FILE...
  --keys KIT/site-audit-keys``): checks that the file is for this run directory's
  run, that its key is the one the site registered (the coordinator kit's
  ``site-audit-keys/<site>.pub.pem``), that the log verifies (chain, signatures) and
  that the ledger reads, then lays it out as ``OUT_DIR/sites/<site>/`` where
  ``fedmeta report OUT_DIR`` finds it. A file for another run, a foreign key, an
  edited byte or a different earlier import is refused with one line.
* **site report** (at the site, ``fedmeta report --site-dir SITE_DIR --run RUN_ID``):
  from the run record the site kept (:mod:`fedmeta.deploy.runrecord`) and its own
  log, ledger and manifest; its own key and the federation's pinned server key are
  the trusted keys.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedmeta.audit import AuditError, read_log
from fedmeta.audit.keys import fingerprint, load_public_key
from fedmeta.deploy.runrecord import RECORD_FILES, RunRecordError, check_run_id, run_record_dir
from fedmeta.paths import (
    AUDIT_DIR,
    EXPORTS_DIR,
    KEYS_DIR,
    LEDGER_FILE,
    PINNED_SERVER_KEY,
    SERVER_AUDIT_PUBKEY,
    RunPaths,
)
from fedmeta.paths import MANIFEST_FILE as MANIFEST
from fedmeta.paths import SITE_AUDIT_LOG as SITE_LOG
from fedmeta.paths import SITE_AUDIT_PUBKEY as SITE_PUBKEY
from policies.validation import check_site_id

FORMAT = "fedmeta-evidence/1"
MAX_BUNDLE_BYTES = 256 * 1024 * 1024


class EvidenceError(ValueError):
    """Evidence cannot be exported, imported or reported on (one line, names the file)."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _run_id(run_id: str) -> str:
    try:
        return check_run_id(run_id)
    except RunRecordError as exc:
        raise EvidenceError(f"option '--run': {exc}") from None


# ---- export (site) -------------------------------------------------------------------
def _ledger_lines(path: Path, run_id: str, runs_in_log: set[str]) -> list[str]:
    """The ledger's header, budget changes and the charges of this and earlier runs."""
    if not path.is_file():
        return []
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise EvidenceError(
                f"{path} line {no}: not JSON; the ledger is damaged (fedmeta ledger show SITE_DIR)"
            ) from None
        if obj.get("kind") != "charge" or obj.get("run") == run_id or obj.get("run") in runs_in_log:
            out.append(line)
    return out


def export_evidence(site_dir: Path, run_id: str, out: Path | None = None) -> tuple[Path, str]:
    """Write the site's evidence for ``run_id``; returns (the file, its sha256)."""
    site_dir = Path(site_dir)
    run_id = _run_id(run_id)
    log_path, key_path = site_dir / SITE_LOG, site_dir / SITE_PUBKEY
    if not log_path.is_file():
        raise EvidenceError(
            f"{log_path}: missing; is {site_dir} a site directory that took part in a run?"
        )
    try:
        entries, result = read_log(log_path, public_key=key_path if key_path.is_file() else None)
    except AuditError as exc:
        raise EvidenceError(f"{log_path}: {exc}") from None
    mine = [e for e in entries if e.run_id == run_id]
    if not mine:
        runs = sorted({e.run_id for e in entries if e.run_id != "-"})
        raise EvidenceError(
            f"{log_path}: no entry of run {run_id} in the site's verified log "
            f"(runs it holds: {', '.join(runs[-5:]) or 'none'})"
        )
    last = mine[-1].seq
    if not result.ok and (result.first_bad_seq is None or result.first_bad_seq <= last):
        raise EvidenceError(
            f"{log_path}: does not verify ({result.problem}); repair or "
            "restore it before exporting (fedmeta audit verify)"
        )
    lines = log_path.read_bytes().split(b"\n")[: last + 1]
    runs_before = {e.run_id for e in entries[: last + 1]}
    pem = key_path.read_text(encoding="ascii") if key_path.is_file() else None
    site = mine[0].actor
    manifest = site_dir / MANIFEST
    manifest_text = manifest.read_text(encoding="utf-8") if manifest.is_file() else None
    bundle = {
        "format": FORMAT,
        "site": site,
        "run": run_id,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "audit_public_key": pem,
        "key_fingerprint": result.key_fingerprint,
        "log": [x.decode("utf-8") for x in lines],
        "log_head": str(entries[last].receipt()),
        "ledger": _ledger_lines(site_dir / LEDGER_FILE, run_id, runs_before),
        "manifest_toml": manifest_text,
        "manifest_sha256": _sha(manifest_text.encode()) if manifest_text is not None else None,
        "signed_manifest_sha256": sorted(
            {str(e.details["manifest_sha256"]) for e in mine if e.details.get("manifest_sha256")}
        ),
        "rounds_trained": sorted(
            {e.round for e in mine if e.action == "round.train" and e.round is not None}
        ),
    }
    if out is None:
        out = site_dir / EXPORTS_DIR / f"evidence-{site}-{run_id}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(bundle, indent=1, sort_keys=True) + "\n").encode()
    out.write_bytes(data)
    return out, _sha(data)


# ---- import (coordinator) ------------------------------------------------------------
@dataclass(frozen=True)
class Imported:
    site: str
    entries: int
    rounds_trained: list[int]
    key_fingerprint: str
    path: Path


def _load_bundle(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise EvidenceError(
            f"{path}: not a file; give the evidence-<site>-<run>.json the site exported"
        )
    if path.stat().st_size > MAX_BUNDLE_BYTES:
        raise EvidenceError(f"{path}: larger than {MAX_BUNDLE_BYTES} bytes; not an evidence file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise EvidenceError(f"{path}: not an evidence file (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EvidenceError(f"{path}: not a {FORMAT} file (field 'format')")
    for field, kind in (
        ("site", str),
        ("run", str),
        ("log", list),
        ("ledger", list),
        ("audit_public_key", str),
    ):
        if not isinstance(data.get(field), kind):
            raise EvidenceError(f"{path}: field '{field}': missing or not a {kind.__name__}")
    try:
        check_site_id(data["site"])
    except ValueError as exc:
        raise EvidenceError(f"{path}: field 'site': {exc}") from None
    if not all(isinstance(x, str) and "\n" not in x for x in data["log"] + data["ledger"]):
        raise EvidenceError(f"{path}: fields 'log'/'ledger': expected lists of single lines")
    manifest = data.get("manifest_toml")
    if manifest is not None and not isinstance(manifest, str):
        raise EvidenceError(f"{path}: field 'manifest_toml': not a string")
    return data


def _run_of(run_dir: Path) -> str:
    path = RunPaths(run_dir).decisions
    try:
        run = json.loads(path.read_text(encoding="utf-8")).get("run")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise EvidenceError(
            f"{path}: cannot tell the run of {run_dir} ({exc}); is it the run's out-dir?"
        ) from None
    if not isinstance(run, str) or not run:
        raise EvidenceError(f"{path}: field 'run': missing")
    return run


def _registered_key(keys: Path | None, site: str) -> Path | None:
    if keys is None:
        return None
    path = Path(keys) / f"{site}.pub.pem" if Path(keys).is_dir() else Path(keys)
    if not path.is_file():
        raise EvidenceError(
            f"{path}: no audit key registered for {site} (option '--keys': the "
            "coordinator kit's site-audit-keys/)"
        )
    return path


def _same_files(a: Path, b: Path) -> bool:
    names = [SITE_LOG, SITE_PUBKEY, Path(LEDGER_FILE), Path(MANIFEST)]
    return all(
        (a / n).is_file() == (b / n).is_file()
        and (not (a / n).is_file() or (a / n).read_bytes() == (b / n).read_bytes())
        for n in names
    )


def import_evidence(run_dir: Path, bundle_path: Path, keys: Path | None = None) -> Imported:
    """Check one site's evidence file and lay it out under ``run_dir/sites/<site>/``."""
    run_dir = Path(run_dir)
    data = _load_bundle(bundle_path)
    run, site = _run_of(run_dir), data["site"]
    if data["run"] != run:
        raise EvidenceError(
            f"{bundle_path}: evidence of run {data['run']}, but {run_dir} holds "
            f"run {run}; export the site's evidence with --run {run}"
        )
    registered = _registered_key(keys, site)
    try:
        given = fingerprint(load_public_key(data["audit_public_key"].encode("ascii")))
        if registered is not None and fingerprint(load_public_key(registered)) != given:
            raise EvidenceError(
                f"{bundle_path}: signed with key {given}, not the audit key "
                f"{site} registered ({registered}); refused"
            )
    except (AuditError, UnicodeEncodeError) as exc:
        raise EvidenceError(f"{bundle_path}: field 'audit_public_key': {exc}") from None
    staging = Path(tempfile.mkdtemp(prefix=f".import-{site}-", dir=run_dir))
    try:
        (staging / AUDIT_DIR).mkdir()
        (staging / KEYS_DIR).mkdir()
        (staging / SITE_LOG).write_text("".join(x + "\n" for x in data["log"]), encoding="utf-8")
        (staging / SITE_PUBKEY).write_text(data["audit_public_key"], encoding="ascii")
        if data["ledger"]:
            (staging / LEDGER_FILE).write_text(
                "".join(x + "\n" for x in data["ledger"]), encoding="utf-8"
            )
        if data.get("manifest_toml") is not None:
            (staging / MANIFEST).write_text(data["manifest_toml"], encoding="utf-8")
        try:
            entries, result = read_log(staging / SITE_LOG, public_key=staging / SITE_PUBKEY)
        except AuditError as exc:
            raise EvidenceError(f"{bundle_path}: the site's log: {exc}") from None
        if not result.ok:
            raise EvidenceError(f"{bundle_path}: the site's log does not verify: {result.problem}")
        if result.actor != site:
            raise EvidenceError(
                f"{bundle_path}: the log's actor is {result.actor!r}, not the file's site {site!r}"
            )
        if not any(e.run_id == run for e in entries):
            raise EvidenceError(f"{bundle_path}: the log holds no entry of run {run}")
        if (staging / LEDGER_FILE).exists():
            from fedmeta.privacy.ledger import LedgerError, PrivacyLedger

            try:
                PrivacyLedger.read(staging / LEDGER_FILE)
            except (LedgerError, ValueError) as exc:
                raise EvidenceError(f"{bundle_path}: field 'ledger': {exc}") from None
        if data.get("manifest_toml") is not None and data.get("manifest_sha256") != _sha(
            data["manifest_toml"].encode()
        ):
            raise EvidenceError(f"{bundle_path}: field 'manifest_sha256' is not the manifest's")
        target = RunPaths(run_dir).site(site).root
        if target.exists():
            if _same_files(target, staging):
                shutil.rmtree(staging)
                return Imported(
                    site, result.entries, list(data.get("rounds_trained") or []), given, target
                )
            raise EvidenceError(
                f"{target}: holds other evidence of {site} already; move it "
                "aside to import this file"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return Imported(site, result.entries, list(data.get("rounds_trained") or []), given, target)


# ---- the site's own report -----------------------------------------------------------
def site_report(
    site_dir: Path,
    run_id: str,
    fmt: str = "html",
    out: Path | None = None,
    allow_unverified: bool = False,
) -> tuple[Path, Any]:
    """The report of ``run_id`` for the site in ``site_dir``, from its own directory."""
    from fedmeta.report import SUFFIX, generate

    site_dir = Path(site_dir)
    run_id = _run_id(run_id)
    record = run_record_dir(site_dir, run_id)
    missing = [
        rel
        for rel in RECORD_FILES.values()
        if rel != SERVER_AUDIT_PUBKEY.as_posix() and not (record / rel).is_file()
    ]
    if missing:
        raise EvidenceError(
            f"{record}: no run record of run {run_id} at this site (missing "
            f"{', '.join(missing)}): the site keeps it when the server ends the "
            "run (run.record in its audit log)"
        )
    key = site_dir / SITE_PUBKEY
    if not key.is_file():
        raise EvidenceError(f"{key}: missing; the site's audit public key")
    try:
        entries, _ = read_log(site_dir / SITE_LOG, public_key=key)
    except AuditError as exc:
        raise EvidenceError(f"{site_dir / SITE_LOG}: {exc}") from None
    site = entries[0].actor if entries else site_dir.name
    trust = [f"{site}={key.absolute()}"]
    pinned = site_dir / PINNED_SERVER_KEY
    if pinned.is_file():
        trust.append(f"server={pinned.absolute()}")
    if fmt not in SUFFIX:
        raise EvidenceError(f"option '--format': {fmt!r} is not one of {', '.join(SUFFIX)}")
    out = Path(out) if out is not None else record / f"report-{site}{SUFFIX[fmt]}"
    with tempfile.TemporaryDirectory(prefix="fedmeta-site-report-") as tmp:
        view = Path(tmp) / run_id
        shutil.copytree(record, view, ignore=shutil.ignore_patterns("report-*", "*.png"))
        mine = RunPaths(view).site(site).root
        for rel in (SITE_LOG, SITE_PUBKEY, Path(LEDGER_FILE), Path(MANIFEST)):
            if (site_dir / rel).is_file():
                (mine / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(site_dir / rel, mine / rel)
        return generate(
            view, fmt, out=out, site=site, allow_unverified=allow_unverified, trust=tuple(trust)
        )
