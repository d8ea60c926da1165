"""An attacker holding a run directory (and, where said, signing keys): the tamper suite's tools.

:func:`rewrite_run` re-signs every audit log of a run *consistently*: entries are
re-created in the order they were written (their time), each reference to
another log (the receipts the server logged, the server heads the sites
logged, ``summary.json``'s head, the receipts in ``metrics.jsonl``) is mapped to
the re-signed entry, and an ``edit`` hook may change any entry on the way. With
new keys it is the key-substitution attack; with the run's own keys and a hook
it builds a run whose sites sign more fields (the site audit-log fields of the
ledger) through the real :class:`~fedmeta.audit.AuditLog` entry API.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedmeta.audit import Entry
from fedmeta.audit.entry import GENESIS_PREV
from fedmeta.audit.keys import load_private_key, public_pem, public_raw_b64
from fedmeta.paths import RunPaths, SitePaths

Edit = Callable[[str, dict[str, Any]], dict[str, Any] | None]


def log_paths(run: Path) -> dict[str, tuple[Path, Path]]:
    """party -> (log, private key) of every log in the run directory."""
    out = {"server": (RunPaths(run).server_log, RunPaths(run).server_key)}
    for d in sorted((run / "sites").iterdir()):
        if SitePaths(d).audit_log.exists():
            out[d.name] = (SitePaths(d).audit_log, SitePaths(d).audit_key)
    return out


def _map_receipt(text: Any, mapping: dict[str, str]) -> Any:
    if not isinstance(text, str) or ":" not in text:
        return text
    seq, h = text.split(":", 1)
    return f"{seq}:{mapping.get(h, h)}"


def rewrite_run(
    run: Path,
    keys: dict[str, Ed25519PrivateKey] | None = None,
    edit: Edit | None = None,
    only: set[str] | None = None,
) -> None:
    """Re-sign every log of ``run`` (with ``keys[party]`` or the run's own key), or only
    the logs of the parties in ``only`` (an attacker who holds only those keys)."""
    paths = log_paths(run)
    keys = dict(keys or {})
    for party, (_, key_path) in paths.items():
        if party not in keys:
            keys[party] = load_private_key(key_path)
        else:  # a substituted key: its public half replaces the one in the run directory
            key_path.with_name(key_path.stem + ".pub.pem").write_bytes(public_pem(keys[party]))
    maps: dict[str, dict[str, str]] = {p: {} for p in paths}
    queue = []
    for party, (log, _) in paths.items():
        for line in log.read_bytes().splitlines():
            e = Entry.from_line(line)
            queue.append((e.time, party, e))
    queue.sort(key=lambda t: (t[0], t[1] != "server"))
    out: dict[str, list[bytes]] = {p: [] for p in paths}
    prev = dict.fromkeys(paths, GENESIS_PREV)
    metrics_done = False
    for _, party, e in queue:
        if only is not None and party not in only:  # left as it is: not the attacker's
            maps[party][e.hash] = prev[party] = e.hash
            out[party].append(e.line_bytes() + b"\n")
            continue
        d = e.to_dict(with_sig=False)
        details = dict(d["details"])
        if d["action"] == "log.created":
            details["public_key"] = public_raw_b64(keys[party])
        if "receipt" in details and party == "server":
            details["receipt"] = _map_receipt(details["receipt"], maps.get(details["site"], {}))
        if details.get("server_head"):
            details["server_head"] = _map_receipt(details["server_head"], maps["server"])
        if d["action"] == "checkpoint":
            details["head_hash"] = prev[party]
        if d["action"] == "run.end" and party == "server" and not metrics_done:
            _rewrite_metrics(run, maps)
            metrics_done = True
            if "metrics_sha256" in details:
                details["metrics_sha256"] = hashlib.sha256(
                    RunPaths(run).metrics.read_bytes()
                ).hexdigest()
        d["details"] = details
        if edit is not None:
            d = edit(party, d)
            if d is None:
                continue
        seq = len(out[party])
        new = (
            Entry.create(
                keys[party],
                seq=seq,
                prev=prev[party],
                actor=d["actor"],
                action=d["action"],
                run_id=d["run_id"],
                round=d["round"],
                decision=d["decision"],
                rule_ids=d["rule_ids"],
                counts=d["counts"],
                model_in=d["model_in"],
                model_out=d["model_out"],
                epsilon=d["epsilon"],
                details=d["details"],
                time=d["time"],
            )
            if d["action"] not in ("log.created", "checkpoint")
            else _reserved(keys[party], seq, prev[party], d)
        )
        maps[party][e.hash] = new.hash
        prev[party] = new.hash
        out[party].append(new.line_bytes() + b"\n")
    for party, (log, _) in paths.items():
        log.write_bytes(b"".join(out[party]))
    if not metrics_done:
        _rewrite_metrics(run, maps)
    summary = RunPaths(run).summary
    if summary.exists():
        doc = json.loads(summary.read_text())
        doc["audit_head"] = _map_receipt(doc.get("audit_head"), maps["server"])
        if isinstance(doc.get("anchors"), dict):
            doc["anchors"] = {
                s: _map_receipt(r, maps.get(s, {})) for s, r in doc["anchors"].items()
            }
        summary.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _reserved(key: Ed25519PrivateKey, seq: int, prev: str, d: dict[str, Any]) -> Entry:
    """``log.created`` and ``checkpoint`` (written by the log itself) re-created as such."""
    details = dict(d["details"])
    if d["action"] == "checkpoint":
        details = {"head_seq": seq - 1, "head_hash": prev}
    return Entry.create(
        key,
        seq=seq,
        prev=prev,
        actor=d["actor"],
        action=d["action"],
        run_id=d["run_id"],
        round=d["round"],
        details=details,
        time=d["time"],
    )


def _rewrite_metrics(run: Path, maps: dict[str, dict[str, str]]) -> None:
    path = RunPaths(run).metrics
    lines = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if isinstance(rec.get("receipts"), dict):
            rec["receipts"] = {
                s: _map_receipt(r, maps.get(s, {})) for s, r in rec["receipts"].items()
            }
        lines.append(json.dumps(rec, sort_keys=True))
    path.write_text("\n".join(lines) + "\n")


def contract_fields(run: Path) -> Edit:
    """An edit hook: every DP ``round.train`` entry of a site also signs the ledger's
    delta, accountant, epsilon_max, epsilon_round, steps and the manifest hash (the
    site audit-log fields sites sign from now on)."""
    from fedmeta.privacy.ledger import PrivacyLedger

    ledgers = {
        d.name: PrivacyLedger.read(SitePaths(d).ledger)
        for d in (run / "sites").iterdir()
        if SitePaths(d).ledger.exists()
    }
    manifests = {
        d.name: hashlib.sha256(SitePaths(d).manifest.read_bytes()).hexdigest()
        for d in (run / "sites").iterdir()
        if SitePaths(d).manifest.exists()
    }

    def edit(party: str, d: dict[str, Any]) -> dict[str, Any]:
        if party == "server" or d["action"] != "round.train" or not d["details"].get("dp"):
            return d
        ledger = ledgers[party]
        charge = next(c for c in ledger.charges if c.round == d["round"] and c.run == d["run_id"])
        before = [
            c.epsilon_after for c in ledger.charges if c.round < d["round"] and c.run == d["run_id"]
        ]
        d["details"] = {
            **d["details"],
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "epsilon_max": ledger.epsilon_max,
            "steps": charge.steps,
            "epsilon_round": charge.epsilon_after - (before[-1] if before else 0.0),
            "run_epsilon_max": None,
            "noise_source": "site-csprng",
            "manifest_sha256": manifests.get(party),
            "privacy_unit": "record",
        }
        return d

    return edit
