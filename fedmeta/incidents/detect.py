"""Find the signals of a run that open incidents, from the same verified evidence the
report reads (no new kind of check: what fedmeta already detects)."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from fedmeta.incidents.model import Incident
from fedmeta.report.checks import audit_section
from fedmeta.report.collect import RunFiles, read_run
from fedmeta.report.trust import Anchor

#: a site's refusal rule -> the incident it opens
SITE_REFUSALS = {
    "SITE-APP": "unapproved-code",
    "SITE-CONFIG": "unapproved-code",
    "SITE-SERVER-KEY": "server-key-mismatch",
}


def _time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _dpdp(files: RunFiles, site_id: str | None) -> bool:
    if site_id is None:
        return any("dpdp" in m.law_packs for m in files.manifests.values())
    m = files.manifests.get(site_id)
    return m is not None and "dpdp" in m.law_packs


def signals(
    run_dir: Path, aware_at: datetime, trust: dict[str, Anchor] | None = None
) -> list[Incident]:
    """Every incident the run's evidence shows, with ``aware_at`` = now (the scan)."""
    files = read_run(Path(run_dir), None, trust)
    audit = audit_section(files, None)
    out: list[Incident] = []

    def add(
        kind: str, site: str | None, summary: str, source: str, occurred: datetime | None = None
    ) -> None:
        out.append(
            Incident(
                id=Incident.make_id(kind, files.run_id, site, source),
                kind=kind,  # type: ignore[arg-type]
                run_id=files.run_id,
                site_id=site,
                summary=" ".join(summary.split())[:500],
                source=source,
                occurred_at=occurred,
                aware_at=aware_at,
                dpdp=_dpdp(files, site),
            )
        )

    covered: set[str] = set()  # parties whose log already opened an incident
    for lg in audit.logs:
        site = lg.party if lg.party in files.sites else None
        bad = [r for r in lg.receipts if not r.ok]
        also = f"; {len(bad)} receipt(s) other parties hold do not match it" if bad else ""
        if lg.status == "failed":
            add("log-verification-failed", site, f"{lg.log}: {lg.problem}{also}", lg.log)
            covered.add(lg.party)
        elif bad:
            add(
                "receipt-mismatch",
                site,
                f"{len(bad)} receipt(s) do not match {lg.log}, "
                f"first: {bad[0].receipt[:24]} from {bad[0].source}",
                f"{lg.log} receipts",
            )
            covered.add(lg.party)
    for c in audit.cross_checks:
        if c.ok or any(
            re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", f"{c.check} {c.detail}")
            for p in covered
        ):
            continue  # a consequence of a log incident already opened
        kind = (
            "model-hash-mismatch"
            if c.fatal or ("model" in c.check and "hash" in c.check)
            else "receipt-mismatch"
            if "receipt" in c.check
            else "evidence-mismatch"
        )
        add(kind, None, f"{c.check}: {c.detail}", f"cross-check: {c.check}")
    for e in files.server_entries:
        if e.action == "security.insecure":
            add(
                "insecure-transport",
                None,
                "the server ran without TLS or node authentication (asked for by name)",
                f"server log seq {e.seq}",
                _time(e.time),
            )
        if e.action == "site.unusable":
            add(
                "unknown-node",
                None,
                f"node refused: {e.details.get('reason')}",
                f"server log seq {e.seq}",
                _time(e.time),
            )
    for m in files.round_lines:
        for site, why in (m.get("dropped") or {}).items():
            add(
                "update-rejected",
                str(site),
                f"round {m.get('round')}: update of {site} rejected: {why}",
                f"metrics.jsonl round {m.get('round')} {site}",
            )
    # what sites refused on their own authority: unapproved code, a round under another key
    times = [
        t
        for t in (_time(e.time) for e in files.server_entries if e.run_id == files.run_id)
        if t is not None
    ]
    start, end = (min(times), max(times)) if times else (None, None)
    for s in files.sites.values():
        for e in s.log.entries:
            kind = next((SITE_REFUSALS[r] for r in e.rule_ids if r in SITE_REFUSALS), None)
            when = _time(e.time)
            in_run = e.run_id == files.run_id or (  # an app refused before it knew the run
                e.action == "app.refuse"
                and start is not None
                and when is not None
                and start <= when <= end
            )
            if kind and e.decision == "deny" and in_run:
                add(
                    kind,
                    s.site_id,
                    f"{s.site_id} refused: {e.details.get('reason') or e.action}",
                    f"sites/{s.site_id} log seq {e.seq}",
                    when,
                )
    for s in files.sites.values():
        if s.ledger is not None and s.ledger.epsilon() > s.ledger.epsilon_max * (1 + 1e-9):
            add(
                "epsilon-overspend",
                s.site_id,
                f"{s.site_id}'s ledger holds epsilon "
                f"{s.ledger.epsilon():.4g}, past its budget {s.ledger.epsilon_max:g}",
                f"sites/{s.site_id} ledger",
            )
    return out
