"""Audit section: each log's verification and the cross-checks between the run's files.

The logs are signed; ``metrics.jsonl``, ``summary.json``,
``policy-decisions.json`` and ``config.json`` are not. Each cross-check
compares what an unsigned file says with what a signed log or a site's ledger
says, so that every number the report shows from an unsigned file is backed
by evidence (or the report says it is not).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Any

from fedmeta.paths import METRICS_FILE, SITES_DIR, SUMMARY_FILE, RunPaths, SitePaths
from fedmeta.report.collect import LogRead, RunFiles, SiteFiles
from fedmeta.report.evidence import (
    ledger_evidence,
    manifest_hashes,
    metrics_signed,
    model_evidence,
    signed_manifest_hashes,
)
from fedmeta.report.model import AuditSection, CrossCheck, LogCheck, ReceiptCheck
from fedmeta.report.policy import min_cohort
from policies import suppress_small_counts

MODEL_CHECK = "the final model file is the model the server signed in run.end"


def log_check(files: RunFiles, log: LogRead) -> LogCheck:
    result = log.result
    receipts: list[ReceiptCheck] = []
    if result is not None:
        for receipt, good in result.receipts_checked:
            for source in log.receipt_sources.get(str(receipt), ["?"]):
                receipts.append(ReceiptCheck(receipt=str(receipt), ok=good, source=source))
    receipts += [
        ReceiptCheck(receipt=text[:100], ok=False, source=f"{src} (malformed)")
        for text, src in log.bad_receipts
    ]
    if not log.exists:
        status = "failed" if log.needed else "missing"
        problem = (
            "log missing although the server holds receipts of it"
            if log.needed
            else "no audit log (the site never trained)"
        )
    else:
        # "verified" only against a key from outside the run directory
        status = (
            ("verified" if log.key_source == "trusted" else "self-asserted") if log.ok else "failed"
        )
        problem = log.error or (result.problem if result is not None else None)
        if problem is None and log.bad_receipts:
            problem = f"{len(log.bad_receipts)} malformed receipt(s) held by other parties"
        failed = [src for r in receipts if not r.ok for src in [r.source]]
        if problem is not None and failed and log.error is None:
            problem += f" [receipt held by {', '.join(failed[:3])}]"
    return LogCheck(
        log=files.rel(log.path),
        party=log.party,
        status=status,
        ok=log.ok,
        entries=result.entries if result else 0,
        head=str(result.head) if result and result.head else None,
        last_checkpoint=str(result.last_checkpoint) if result and result.last_checkpoint else None,
        key_pinned=log.key_pinned and log.exists,
        key_source=log.key_source,
        key_file=(
            log.anchor.source
            if log.anchor is not None
            else files.rel(log.key_path)
            if log.key_path.exists()
            else None
        ),
        key_fingerprint=result.key_fingerprint if result else None,
        receipts=receipts,
        problem=problem,
    )


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _run_start(files: RunFiles) -> dict[str, Any]:
    for e in files.server_entries:
        if e.action == "run.start":
            return dict(e.details)
    return {}


def _hashes(files: RunFiles) -> list[CrossCheck]:
    start = _run_start(files)
    out = []
    for name, want, got in (
        (
            "config.json is the configuration the signed run.start entry names",
            start.get("config_sha256"),
            _sha(RunPaths(files.run_dir).config.read_text(encoding="utf-8")),
        ),
        (
            "the declaration in policy-decisions.json is the one the signed run.start entry names",
            start.get("declaration_sha256"),
            files.declaration.sha256(),
        ),
    ):
        ok = want == got
        out.append(
            CrossCheck(
                check=name,
                ok=ok,
                detail=(
                    f"sha256 {got}"
                    if ok
                    else f"file hashes to {got}, the signed log names {want} "
                    "(edited, or written by another fedmeta version)"
                ),
            )
        )
    return out


def _decisions(files: RunFiles, site: str | None) -> CrossCheck:
    def mine(s: Any) -> bool:
        return site is None or s in (None, site)

    logged = Counter(
        (
            e.rule_ids[0] if e.rule_ids else "",
            e.details.get("site"),
            e.decision,
            str(e.details.get("reason") or ""),
            str(e.details.get("references") or ""),
        )
        for e in files.server_entries
        if e.action == "policy.run" and mine(e.details.get("site"))
    )
    stated = Counter(
        (d.rule_id, d.site_id, d.outcome.value, d.reason[:500], "; ".join(d.references)[:500])
        for d in files.decisions
        if mine(d.site_id)
    )
    ok = logged == stated
    return CrossCheck(
        check="run-level decisions in policy-decisions.json (outcome, reason and legal "
        "references) equal the server log's signed policy.run entries",
        ok=ok,
        detail=f"{sum(stated.values())} decision(s)"
        if ok
        else f"{sum(stated.values())} in the file, {sum(logged.values())} in the log, or their "
        "outcome, reason or references differ",
    )


def _model(files: RunFiles) -> CrossCheck:
    logged = files.run_end.model_out if files.run_end is not None else None
    values = {
        "server log run.end": logged,
        SUMMARY_FILE: (files.summary or {}).get("model_sha256"),
        f"{METRICS_FILE} (last round)": files.metrics[-1].get("model_sha256")
        if files.metrics
        else None,
    }
    present = {k: v for k, v in values.items() if v}
    ok = logged is not None and len(set(present.values())) == 1
    return CrossCheck(
        check="final model hash agrees across the server log, summary and metrics",
        ok=ok,
        detail=(
            f"sha256 {logged}"
            if ok and logged
            else "; ".join(f"{k}: {v}" for k, v in values.items())
        ),
    )


def _model_file(files: RunFiles) -> CrossCheck | None:
    ev = model_evidence(files)
    if ev is None:
        return None
    # fatal only when the server's log itself is sound (else that failure comes first)
    return CrossCheck(
        check=MODEL_CHECK, ok=ev.ok, detail=ev.detail, fatal=ev.fatal and files.server_log.ok
    )


def _site_set(files: RunFiles) -> list[CrossCheck]:
    """The sites are the ones the server's signed log names; no more, no fewer."""
    named = files.named_sites()
    sites_dir = files.run_dir / SITES_DIR
    dirs = {p.name for p in sites_dir.iterdir() if p.is_dir()} if sites_dir.is_dir() else set()
    unsigned = set(files.manifests) | set(files.eligible)
    for m in files.metrics:
        unsigned.update(x for x in m.get("sampled") or [] if isinstance(x, str))
        unsigned.update(x for x in m.get("used") or [] if isinstance(x, str))
        for key in ("declined", "dropped", "lost", "receipts"):
            unsigned.update((m.get(key) or {}).keys())
    unsigned.update(x for x in (files.summary or {}).get("sites") or [] if isinstance(x, str))
    unsigned = {x for x in unsigned if not x.startswith("node-")}
    out = []
    phantom = sorted(dirs - set(named))
    out.append(
        CrossCheck(
            check="every site directory is a site the server's signed log names",
            ok=not phantom,
            detail=("not named by the server: " + ", ".join(phantom))
            if phantom
            else f"{len(dirs)} director{'y' if len(dirs) == 1 else 'ies'}",
        )
    )
    extra = sorted(unsigned - set(named))
    out.append(
        CrossCheck(
            check="the sites in metrics.jsonl, summary.json and policy-decisions.json are the "
            "ones the server's signed log names",
            ok=not extra,
            detail=("named only in unsigned files: " + ", ".join(extra))
            if extra
            else f"{len(named)} site(s) named by the server",
        )
    )
    trained = sorted(
        s for s, how in named.items() if how & {"sampled", "receipt"} and s not in dirs
    )
    out.append(
        CrossCheck(
            check="every site the server sampled has its files in the run directory",
            ok=not trained,
            detail=("missing: " + ", ".join(trained))
            if trained
            else f"{sum(1 for how in named.values() if how & {'sampled', 'receipt'})} "
            "sampled site(s)",
        )
    )
    quiet = sorted(
        s for s, how in named.items() if not how & {"sampled", "receipt"} and s not in dirs
    )
    if quiet:
        out.append(
            CrossCheck(
                check="every site the server's log names (never sampled) has a directory",
                ok=False,
                blocking=False,
                detail="no files for " + ", ".join(quiet),
            )
        )
    return out


def _ledger(files: RunFiles, site: SiteFiles) -> CrossCheck | None:
    if site.ledger is None or not site.log.exists or site.log.error:
        return None
    ev = ledger_evidence(files, site)
    unsigned = sorted(ev.unsigned)
    detail = (
        "; ".join(ev.problems[:4])
        if ev.problems
        else (
            f"{ev.rounds} charge(s) equal the signed round.train entries"
            + (
                f"; NOT SIGNED by this site's log (shown unsigned): {', '.join(unsigned)}"
                if unsigned
                else ""
            )
        )
    )
    return CrossCheck(
        check=f"{site.site_id}: each privacy ledger charge equals what the site signed for "
        "that round",
        ok=ev.ok,
        detail=detail,
    )


def _manifest(files: RunFiles, site: SiteFiles) -> CrossCheck | None:
    signed = signed_manifest_hashes(files, site)
    if not signed:
        return None
    shown = manifest_hashes(files, site)
    ok = signed <= shown
    received = files.manifests.get(site.site_id)
    path = SitePaths(site.dir).manifest
    if ok and received is not None and path.is_file():
        from policies import load_site_manifest

        try:  # the file the site signed and the manifest the report shows must agree
            ok = load_site_manifest(path) == received
        except ValueError:
            ok = False
    return CrossCheck(
        check=f"{site.site_id}: the manifest shown is the one the site signed it applied",
        ok=ok,
        detail=f"manifest_sha256 {', '.join(sorted(signed))}"
        if ok
        else f"the site signed manifest_sha256 {', '.join(sorted(signed - shown))}; the manifest "
        "in the run directory hashes differently (edited)",
    )


def _site_declaration(files: RunFiles, site: SiteFiles) -> CrossCheck | None:
    want = _run_start(files).get("declaration_sha256")
    signed = {
        str(e.details["declaration_sha256"])
        for e in site.log.entries
        if e.action == "round.train"
        and e.run_id == files.run_id
        and e.details.get("declaration_sha256")
    }
    if not signed or want is None:
        return None
    ok = signed == {want}
    return CrossCheck(
        check=f"{site.site_id}: the declaration the site signed is the server's",
        ok=ok,
        detail=f"sha256 {want}"
        if ok
        else f"the site signed {', '.join(sorted(signed))}, the server {want}",
    )


def _anchors(files: RunFiles) -> CrossCheck | None:
    """The end of the run is held outside the server: each site that took part logged the
    server's final head (``run.anchor``), checked as a receipt of the server's log."""
    if files.run_end is None:
        return None
    took_part = sorted(s for s, how in files.named_sites().items() if "sampled" in how)
    anchored = sorted(
        s.site_id
        for s in files.sites.values()
        if any(e.action == "run.anchor" and e.run_id == files.run_id for e in s.log.entries)
    )
    missing = [s for s in took_part if s not in anchored]
    return CrossCheck(
        check="the end of the run is anchored at the sites (each logged the server's final head)",
        ok=not missing,
        blocking=False,
        detail=f"anchored at {', '.join(anchored)}"
        if not missing
        else (
            f"not anchored at {', '.join(missing)}: the server's last entries are held only by "
            "summary.json there"
            if anchored
            else "anchored at no site: the server's last round "
            "and run.end are held only by summary.json (a server key holder could rewrite them)"
        ),
    )


def _metrics_file(files: RunFiles) -> CrossCheck | None:
    signed = metrics_signed(files)
    if signed is None:
        return None
    return CrossCheck(
        check="metrics.jsonl (learning results, per-round figures) is the file the server "
        "signed in run.end",
        ok=signed,
        detail="sha256 matches" if signed else "the file was changed after the run",
    )


def _used_rounds(files: RunFiles, site_id: str) -> list[int]:
    return [m["round"] for m in files.round_lines if site_id in (m.get("used") or [])]


def _replied_rounds(files: RunFiles, site_id: str) -> list[int]:
    return [
        m["round"]
        for m in files.round_lines
        if site_id in (m.get("used") or [])
        or site_id in (m.get("declined") or {})
        or site_id in (m.get("dropped") or {})
    ]


def _epsilon(files: RunFiles, site: SiteFiles) -> CrossCheck | None:
    if site.ledger is None:
        return None
    charges = {c.round: c.epsilon_after for c in site.ledger.charges if c.run == files.run_id}
    logged = {
        e.round: e.epsilon
        for e in site.log.entries
        if e.action == "round.train" and e.run_id == files.run_id and e.epsilon is not None
    }
    bad = []
    for r in _used_rounds(files, site.site_id):
        reported = (
            next(m for m in files.round_lines if m["round"] == r)
            .get("epsilon", {})
            .get(site.site_id)
        )
        if (
            reported is None
            or r not in charges
            or not math.isclose(reported, charges[r], rel_tol=1e-9, abs_tol=1e-12)
        ):
            bad.append(f"round {r}: metrics {reported}, ledger {charges.get(r)}")
        elif r in logged and not math.isclose(logged[r], charges[r], rel_tol=1e-9):
            bad.append(f"round {r}: site log {logged[r]}, ledger {charges[r]}")
    return CrossCheck(
        check=f"{site.site_id}: epsilon reported to the server equals its ledger and its log",
        ok=not bad,
        detail="; ".join(bad) or f"{len(_used_rounds(files, site.site_id))} round(s)",
    )


def _exclusions(files: RunFiles, site: SiteFiles) -> CrossCheck | None:
    logged = {
        e.round: dict(e.counts)
        for e in site.log.entries
        if e.action == "policy.records" and e.run_id == files.run_id
    }
    if not logged:
        return None
    bad = []
    for r in _replied_rounds(files, site.site_id):
        line = next(m for m in files.round_lines if m["round"] == r)
        reported = (line.get("exclusions") or {}).get(site.site_id, {})
        # a site releases counts below its minimum cohort size as "<k" (fedmeta.site)
        released = {
            k: v for k, v in suppress_small_counts(logged.get(r, {}), min_cohort(site)).items() if v
        }
        if r in logged and reported != released:
            bad.append(f"round {r}")
    return CrossCheck(
        check=f"{site.site_id}: exclusion counts the server received equal the site's signed "
        "policy.records entries",
        ok=not bad,
        detail=("differ in " + ", ".join(bad)) if bad else f"{len(logged)} round(s)",
    )


def _receipts(files: RunFiles, site: SiteFiles) -> CrossCheck | None:
    in_metrics = {
        (m["round"], v)
        for m in files.round_lines
        for s, v in (m.get("receipts") or {}).items()
        if s == site.site_id
    }
    in_log = {
        (e.round, str(e.details.get("receipt")))
        for e in files.server_entries
        if e.action == "round.receipt" and e.details.get("site") == site.site_id
    }
    if not in_metrics and not in_log:
        return None
    ok = in_metrics == in_log
    return CrossCheck(
        check=f"{site.site_id}: receipts in metrics.jsonl equal the server log's round.receipt "
        "entries",
        ok=ok,
        detail=f"{len(in_log)} receipt(s)"
        if ok
        else f"{len(in_metrics)} in metrics, {len(in_log)} in the log, or they differ",
    )


def audit_section(files: RunFiles, site: str | None) -> AuditSection:
    logs = [log_check(files, files.server_log)]
    logs += [log_check(files, s.log) for s in files.sites.values()]
    checks = [*_hashes(files), _decisions(files, site), _model(files)]
    for extra in (
        _model_file(files) if site is None else None,
        _metrics_file(files),
        _anchors(files) if site is None else None,
    ):
        if extra is not None:
            checks.append(extra)
    if site is None:
        checks += _site_set(files)
    for s in files.sites.values():
        for check in (
            _epsilon(files, s),
            _ledger(files, s),
            _exclusions(files, s),
            _receipts(files, s),
            _manifest(files, s),
            _site_declaration(files, s),
        ):
            if check is not None:
                checks.append(check)
        if s.ledger_error:
            checks.append(
                CrossCheck(
                    check=f"{s.site_id}: privacy ledger readable",
                    ok=False,
                    detail=s.ledger_error[:300],
                )
            )
    all_ok = all(lg.status != "failed" for lg in logs) and all(c.ok for c in checks if c.blocking)
    return AuditSection(all_verified=all_ok, logs=logs, cross_checks=checks)
