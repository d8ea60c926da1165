"""The tamper suite: an attacker holding a copy of a run directory tries each attack.

One real simulated run (the session's ``run_dir``) is the clean base; every
attack works on its own copy. The data protection officer registered the
parties' public keys before the attack (``registered``: a directory laid out
like the coordinator kit's ``site-audit-keys/``, plus the server's key) and
passes them with ``--trust``. Each attack must make the report refuse, or state
the failure (a figure shown as unsigned, evidence called self-asserted); the
clean run and a consistent re-signing with the parties' own keys pass with no
false alarm.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from forge import contract_fields, log_paths, rewrite_run
from helpers import fedmeta

from fedmeta.audit import verify_log
from fedmeta.paths import RunPaths, SitePaths
from fedmeta.report import ReportError, UnverifiedRunError, build_report
from fedmeta.report.model import Report
from fedmeta.report.trust import load_trust

pytestmark = pytest.mark.slow

SITES = ("site-0", "site-1", "site-2")


@pytest.fixture(scope="module")
def registered(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("registered")
    shutil.copyfile(RunPaths(run_dir).server_pubkey, keys / "server-audit-signing.pub.pem")
    for site in SITES:
        shutil.copyfile(RunPaths(run_dir).site(site).audit_pubkey, keys / f"{site}.pub.pem")
    return keys


@pytest.fixture
def run(run_dir: Path, tmp_path: Path) -> Path:
    """A fresh copy of the clean run for one attack."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("report*"))
    return out


@pytest.fixture(scope="module")
def contract_run(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean run re-signed with the parties' own keys so that each site's round.train
    also signs delta, accountant, epsilon_max and its manifest hash."""
    out = tmp_path_factory.mktemp("contract") / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("report*"))
    rewrite_run(out, edit=contract_fields(out))
    return out


def report(run: Path, registered: Path | None = None, **kw) -> Report:
    trust = load_trust([str(registered)]) if registered is not None else None
    return build_report(run, trust=trust, **kw)


def refused(run: Path, registered: Path | None = None, **kw) -> str:
    with pytest.raises(UnverifiedRunError) as exc:
        report(run, registered, **kw)
    return str(exc.value)


def site(run: Path, name: str) -> Path:
    return RunPaths(run).site(name).root


def ledger_lines(run: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in SitePaths(site(run, name)).ledger.read_text().splitlines()]


def write_ledger(run: Path, name: str, lines: list[dict]) -> None:
    SitePaths(site(run, name)).ledger.write_text(
        "".join(json.dumps(x, sort_keys=True, separators=(",", ":")) + "\n" for x in lines)
    )


# ---- clean runs: no false alarm ------------------------------------------------------------


def test_clean_run_with_registered_keys_is_verified(run_dir, registered):
    r = report(run_dir, registered)
    assert r.verified and r.checks_passed and r.keys_trusted
    assert all(c.ok for c in r.audit.cross_checks), [c for c in r.audit.cross_checks if not c.ok]
    assert {lg.status for lg in r.audit.logs} <= {"verified", "missing"}
    assert not [f for f in r.findings if f.severity == "error"]
    assert r.learning.evidence == "signed by the server"
    assert r.evidence_basis.startswith("EVIDENCE:") and "SIMULATION" in r.evidence_basis
    if r.unsigned:  # sites that do not yet sign the ledger fields: named on the first line
        assert "shown UNSIGNED" in r.evidence_basis


def test_clean_run_without_trust_is_self_asserted_never_verified(run_dir):
    r = report(run_dir)
    assert r.checks_passed and not r.verified and not r.keys_trusted
    assert r.evidence_basis.startswith("SELF-ASSERTED EVIDENCE")
    assert {lg.status for lg in r.audit.logs} <= {"self-asserted", "missing"}


def test_consistent_resigning_with_own_keys_passes(contract_run, registered):
    r = report(contract_run, registered)
    assert r.verified, [c for c in r.audit.cross_checks if not c.ok]
    assert all(not p.unsigned_fields for p in r.privacy)  # every ledger figure signed
    assert r.unsigned == [] and "UNSIGNED" not in r.evidence_basis


# ---- keys ----------------------------------------------------------------------------------


def test_key_substitution_with_resigning(run, registered):
    rewrite_run(run, keys={p: Ed25519PrivateKey.generate() for p in log_paths(run)})
    r = report(run)  # a perfectly consistent forgery: only outside keys can tell
    assert r.checks_passed and not r.verified and r.evidence_basis.startswith("SELF-ASSERTED")
    assert "not the key given for server by --trust" in refused(run, registered)
    for name in SITES:  # the sites' registered keys alone catch it as well
        assert "--trust" in refused(run, registered / f"{name}.pub.pem")


def test_a_sites_own_key_file_and_a_fingerprint_file_work_as_is(run_dir, tmp_path):
    own = RunPaths(run_dir).site("site-1").audit_pubkey  # kit layout
    r = build_report(run_dir, site="site-1", trust=load_trust([str(own)]))
    logs = {lg.party: lg for lg in r.audit.logs}
    assert logs["site-1"].status == "verified" and logs["server"].status == "self-asserted"
    fp = logs["site-1"].key_fingerprint
    trust_file = tmp_path / "trust.txt"
    trust_file.write_text(f"# registered 2026\nsite-1 = {fp}\n")
    assert load_trust([str(trust_file)])["site-1"].fingerprint == fp
    trust_file.write_text(f"site-1 = {fp[:23]}\n")  # a shortened fingerprint
    with pytest.raises(ValueError, match="full SHA-256"):
        load_trust([str(trust_file)])


# ---- the set of sites ------------------------------------------------------------------------


def test_phantom_site(run, registered):
    shutil.copytree(site(run, "site-1"), site(run, "site-9"))
    for reg in (None, registered):
        msg = refused(run, reg)
        assert "site-9" in msg


def test_hidden_site(run, registered):
    shutil.rmtree(site(run, "site-1"))
    for name in ("metrics.jsonl",):  # and scrub it from the unsigned files
        path = run / name
        path.write_text(path.read_text().replace('"site-1"', '"site-0"'))
    assert "site-1" in refused(run, registered)


def test_log_filed_under_another_party(run):
    a, b = site(run, "site-0") / "audit", site(run, "site-1") / "audit"
    a.rename(run / "tmp-audit")
    b.rename(a)
    (run / "tmp-audit").rename(b)
    for name in ("site-0", "site-1"):  # keys swapped too: only the actor can tell
        k = site(run, name) / "keys"
        k.rename(run / f"keys-{name}")
    (run / "keys-site-0").rename(site(run, "site-1") / "keys")
    (run / "keys-site-1").rename(site(run, "site-0") / "keys")
    assert "actor" in refused(run)


# ---- the model -------------------------------------------------------------------------------


def test_model_swap_stops_the_report(run):
    obj = torch.load(RunPaths(run).model, weights_only=True)
    obj["state_dict"] = {k: torch.zeros_like(v) for k, v in obj["state_dict"].items()}
    torch.save(obj, RunPaths(run).model)
    msg = refused(run, allow_unverified=True)  # even --allow-unverified writes nothing
    assert "final model file" in msg and "replaced" in msg


# ---- the privacy ledger ------------------------------------------------------------------------


def test_ledger_noise_multiplier_forged(run):
    lines = ledger_lines(run, "site-1")
    lines[1]["noise_multiplier"] = 4.0
    write_ledger(run, "site-1", lines)
    assert "noise_multiplier" in refused(run)


def test_ledger_charge_dropped(run):
    lines = ledger_lines(run, "site-1")
    del lines[-1]
    write_ledger(run, "site-1", lines)
    assert "site-1" in refused(run)


def forge_ledger(run: Path, name: str, field: str, value: object) -> None:
    """Set ``field`` in the header (epsilon_max, delta, accountant) and/or the charges."""
    lines = ledger_lines(run, name)
    for line in lines:
        if field in line and (line["kind"] == "header" or field != "epsilon_max"):
            line[field] = value
    write_ledger(run, name, lines)


def signs(run: Path, name: str, field: str) -> bool:
    log = SitePaths(site(run, name)).audit_log
    return any(
        e["action"] == "round.train" and field in e["details"]
        for e in map(json.loads, log.read_text().splitlines())
    )


@pytest.mark.parametrize(("field", "value"), [("epsilon_max", 100.0), ("delta", 1e-9)])
def test_ledger_header_forged(run, field, value):
    forge_ledger(run, "site-1", field, value)
    if signs(run, "site-1", field):  # sites that sign the field: refused
        assert field in refused(run)
        return
    r = report(run)  # sites that do not sign it yet: the report says the figure is unsigned
    p = next(p for p in r.privacy if p.site_id == "site-1")
    assert field in p.unsigned_fields and "UNSIGNED" in p.statement
    assert any(field in f.message and "unsigned" in f.message for f in r.findings)


@pytest.mark.parametrize(
    ("field", "value"),
    [("epsilon_max", 100.0), ("delta", 1e-9), ("noise_multiplier", 4.0), ("accountant", "rdp")],
)
def test_ledger_forged_against_signed_site_fields(contract_run, tmp_path, registered, field, value):
    run = tmp_path / "run"
    shutil.copytree(contract_run, run)
    forge_ledger(run, "site-2", field, value)
    assert field in refused(run, registered)


def test_ledger_charge_dropped_against_signed_site_fields(contract_run, tmp_path, registered):
    run = tmp_path / "run"
    shutil.copytree(contract_run, run)
    lines = ledger_lines(run, "site-2")
    write_ledger(run, "site-2", lines[:-1])
    assert "dropped" in refused(run, registered) or "site-2" in refused(run, registered)


def test_manifest_edited_against_the_signed_hash(contract_run, tmp_path, registered):
    run = tmp_path / "run"
    shutil.copytree(contract_run, run)
    path = SitePaths(site(run, "site-2")).manifest
    path.write_text(path.read_text().replace('"IN"', '"DE"'))
    assert "manifest" in refused(run, registered)


# ---- unsigned texts and files ------------------------------------------------------------------


def test_decision_reason_edited(run):
    path = RunPaths(run).decisions
    doc = json.loads(path.read_text())
    doc["decisions"][0]["reason"] = "approved by the DPO"
    path.write_text(json.dumps(doc))
    assert "reason" in refused(run)


def test_config_edited_is_a_failure_not_a_warning(run):
    path = RunPaths(run).config
    doc = json.loads(path.read_text())
    doc["rounds"] = 1
    path.write_text(json.dumps(doc, indent=2))
    assert "config.json" in refused(run)


def test_learning_results_edited(run):
    path = RunPaths(run).metrics
    path.write_text(path.read_text().replace('"adapted": 0.', '"adapted": 0.9', 1))
    assert "metrics.jsonl" in refused(run)


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("metrics.jsonl", b"\xff\xfe not utf-8\n", "not UTF-8"),
        ("config.json", b"\xff\xfe", "not UTF-8"),
        ("policy-decisions.json", b'{"run": "x", "declaration": {', "not JSON"),
        ("summary.json", b"[1, 2]", "expected a JSON dict"),
        ("metrics.jsonl", b'{"round": 1, "used": "site-0"}\n', "'used'"),
    ],
)
def test_malformed_unsigned_file_is_one_line_naming_it(run, name, data, needle):
    (run / name).write_bytes(data)
    with pytest.raises(ReportError) as exc:
        report(run)
    msg = str(exc.value)
    assert name in msg and needle in msg and "\n" not in msg
    res = fedmeta("report", str(run), isolate=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "name",
    [
        "metrics.jsonl",
        "final_model.pt",
        "sites/site-1/privacy-ledger.jsonl",
        "sites/site-1/audit/audit-log.jsonl",
    ],
)
def test_a_fifo_in_place_of_a_file_never_blocks(run, name):
    import os

    (run / name).unlink()
    os.mkfifo(run / name)
    with pytest.raises((ReportError, UnverifiedRunError)) as exc:
        report(run)
    assert "regular file" in str(exc.value)


# ---- the server's end of the run -------------------------------------------------------------


def _server_lines(run: Path) -> list[bytes]:
    return RunPaths(run).server_log.read_bytes().splitlines(keepends=True)


def test_the_end_of_the_clean_run_is_anchored_at_every_site(run_dir):
    r = report(run_dir)
    check = next(c for c in r.audit.cross_checks if "anchored" in c.check)
    assert check.ok and all(s in check.detail for s in SITES)


def test_server_tail_dropped_and_summary_edited(run):
    lines = _server_lines(run)
    RunPaths(run).server_log.write_bytes(b"".join(lines[:-2]))
    summary = json.loads(RunPaths(run).summary.read_text())
    head = verify_log(RunPaths(run).server_log).head
    summary["audit_head"] = str(head)
    RunPaths(run).summary.write_text(json.dumps(summary))
    msg = refused(run)
    assert "run.anchor" in msg and "truncated" in msg  # the sites hold the dropped head
    for name in SITES:  # and with the sites' anchors cut off too (as in an older run)
        log = SitePaths(site(run, name)).audit_log
        log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))
    summary.pop("anchors", None)
    RunPaths(run).summary.write_text(json.dumps(summary))
    msg = refused(run, allow_unverified=True)  # a model without a signed run.end: stop
    assert "run.end" in msg


def test_server_run_end_edited_without_the_key(run):
    path = RunPaths(run).server_log
    data = bytearray(path.read_bytes())
    at = data.rindex(b'"action":"run.end"')
    at = data.index(b'"model_out":"', at) + len(b'"model_out":"')
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    path.write_bytes(bytes(data))
    assert "server-audit-log.jsonl" in refused(run)


def test_server_tail_rewritten_with_the_servers_key(run, registered):
    """Round's end and run.end rewritten (zeroed model), re-signed with the server's key,
    summary.json and metrics.jsonl made to agree: caught by the sites' anchors."""
    obj = torch.load(RunPaths(run).model, weights_only=True)
    obj["state_dict"] = {k: torch.zeros_like(v) for k, v in obj["state_dict"].items()}
    torch.save(obj, RunPaths(run).model)
    from fedmeta.meta.updates import model_digest
    from fedmeta.report.evidence import file_sha256

    digest = model_digest({k: v.numpy() for k, v in obj["state_dict"].items()})

    def edit(party, d):
        if party == "server" and d["action"] == "run.end":
            d["model_out"] = digest
            d["details"] = {**d["details"], "model_file_sha256": file_sha256(RunPaths(run).model)}
        return d

    for name in ("summary.json",):
        doc = json.loads((run / name).read_text())
        doc["model_sha256"] = digest
        (run / name).write_text(json.dumps(doc))
    path = RunPaths(run).metrics
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[-1]["model_sha256"] = digest
    path.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in recs))
    rewrite_run(run, edit=edit, only={"server"})  # the server's key holder, alone
    assert verify_log(RunPaths(run).server_log).ok  # a valid log on its own
    for reg in (None, registered):  # each site's run.anchor entry holds the true final head
        assert "run.anchor" in refused(run, reg)


# ---- the last line: edited or torn -------------------------------------------------------------


def test_edited_last_line_is_a_failure_not_a_crash(run):
    log = SitePaths(site(run, "site-1")).audit_log
    lines = log.read_bytes().splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b'"round":', b'"round";', 1)
    log.write_bytes(b"".join(lines))
    r = verify_log(log)
    assert not r.ok and not r.partial_tail
    assert "site-1" in refused(run)
    res = fedmeta(
        "audit",
        "repair",
        str(log),
        "--key",
        str(SitePaths(site(run, "site-1")).audit_key),
        isolate=False,
    )
    assert res.returncode == 1 and "nothing to repair" in res.stderr
    assert log.read_bytes() == b"".join(lines)


def test_torn_last_line_is_a_crash_that_repair_handles(run):
    log = SitePaths(site(run, "site-1")).audit_log
    with log.open("ab") as fh:
        fh.write(b'{"action":"round.tr')
    r = verify_log(log)
    assert not r.ok and r.partial_tail
    assert "site-1" in refused(run)
    res = fedmeta(
        "audit",
        "repair",
        str(log),
        "--key",
        str(SitePaths(site(run, "site-1")).audit_key),
        isolate=False,
    )
    assert res.returncode == 0, res.stderr
    assert verify_log(log).ok
