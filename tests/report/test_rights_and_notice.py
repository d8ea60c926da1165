"""Rights beyond consent at the site: the register, its legal deadlines, the report's counts
(suppressed), ``fedmeta rights`` and the public study notice (``fedmeta notice``)."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmeta.cli import app
from fedmeta.data.rights_register import REGISTER_FILE, RightsRegisterError, load_rights_register
from fedmeta.paths import RunPaths
from fedmeta.report import write_report
from policies.rights import RightsRequest, add_months, summarise

HEADER = (
    "request_id,type,law,received,decision,ground,decided,extended,erased_at_source,"
    "effect_on_models"
)


def _register(site_dir: Path, rows: list[str]) -> Path:
    path = site_dir / REGISTER_FILE
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def test_legal_deadlines():
    assert add_months(date(2026, 1, 31), 1) == date(2026, 2, 28)  # clamped to the month
    assert add_months(date(2027, 11, 15), 3) == date(2028, 2, 15)
    gdpr = RightsRequest("R1", "erasure", "gdpr", date(2026, 3, 31))
    assert gdpr.deadline == date(2026, 4, 30)  # Art. 12(3): one month
    extended = RightsRequest("R2", "access", "gdpr", date(2026, 3, 31), extended=True)
    assert extended.deadline == date(2026, 6, 30)  # two further months
    dpdp = RightsRequest("R3", "grievance", "dpdp", date(2026, 1, 1))
    assert dpdp.deadline == date(2026, 4, 1)  # at most 90 days
    assert not gdpr.overdue(date(2026, 4, 30)) and gdpr.overdue(date(2026, 5, 1))
    late = RightsRequest(
        "R4",
        "objection",
        "gdpr",
        date(2026, 1, 1),
        decision="refused",
        ground="GDPR Art. 21(6): necessary for a public-interest task",
        decided=date(2026, 3, 1),
    )
    assert late.overdue(date(2026, 3, 1))  # answered, but after the deadline
    s = summarise([gdpr, extended, dpdp, late], date(2026, 5, 1))
    assert s.overdue == 3 and s.pending == 3
    assert s.by_type_decision[("objection", "refused")] == 1


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"decision": "refused", "decided": date(2026, 2, 1)}, "a refusal must state its ground"),
        ({"decision": "granted"}, "needs the date of the decision"),
        ({"decision": "granted", "decided": date(2025, 1, 1)}, "before received"),
        ({"type": "forget-me"}, "type: must be one of"),
        ({"erased_at_source": True, "type": "access"}, "only an erasure request"),
    ],
)
def test_bad_requests_are_refused(kwargs, fragment):
    values = {"request_id": "R", "type": "erasure", "law": "gdpr", "received": date(2026, 1, 1)}
    values.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        RightsRequest(**values)


def test_register_file_errors_name_file_line_and_column(tmp_path):
    assert load_rights_register(tmp_path) is None
    _register(
        tmp_path,
        [
            "R1,erasure,gdpr,2026-01-05,granted,,2026-01-20,,true,",
            "R2,objection,gdpr,2026-13-01,,,,,,",
        ],
    )
    with pytest.raises(
        RightsRegisterError,
        match=r"rights-register.csv line 3: column "
        r"'received': '2026-13-01' is not a date",
    ):
        load_rights_register(tmp_path)
    _register(tmp_path, ["R1,erasure,gdpr,2026-01-05,,,,,,", "R1,erasure,gdpr,2026-01-06,,,,,,"])
    with pytest.raises(RightsRegisterError, match="line 3, column 'request_id': duplicate"):
        load_rights_register(tmp_path)
    (tmp_path / REGISTER_FILE).write_text("request_id,type,name\n")
    with pytest.raises(RightsRegisterError, match="line 1: header"):
        load_rights_register(tmp_path)


def test_rights_command_lists_deadlines_and_late_requests(tmp_path):
    _register(
        tmp_path,
        [
            "R1,erasure,gdpr,2026-01-05,granted,,2026-01-20,,true,",
            "R2,objection,gdpr,2026-01-10,,,,,,",
        ],
    )
    res = CliRunner().invoke(app, ["rights", str(tmp_path), "--on", "2026-03-01", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["request_id"]: r for r in json.loads(res.output)}
    assert rows["R2"]["overdue"] and rows["R2"]["deadline"] == "2026-02-10"
    assert not rows["R1"]["overdue"] and rows["R1"]["erased_at_source"]
    assert list(rows) == ["R2", "R1"]  # late first
    res = CliRunner().invoke(app, ["rights", str(tmp_path / "nowhere")])
    assert res.exit_code == 2


def test_report_counts_the_registers_suppressed_and_flags_late_answers(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    site = RunPaths(copy).site("site-1").root
    rows = [f"E{i},erasure,gdpr,2026-01-0{i + 1},granted,,2026-01-20,,true," for i in range(6)]
    rows += [
        "O1,objection,gdpr,2026-01-10,refused,GDPR Art. 21(6) public task,2026-01-30,,,",
        "O2,objection,gdpr,2020-01-10,,,,,,",
    ]  # long overdue
    _register(site, rows)
    out = write_report(copy, "json", out=tmp_path / "r.json", allow_unverified=True)
    report = json.loads(out.read_text())
    reg = {
        (r["site_id"], r["type"], r["decision"]): r["count"]
        for r in report["policy"]["rights_register"]
    }
    assert reg[("site-1", "erasure", "granted")] == 6
    assert reg[("site-1", "objection", "refused")] == "<5"  # one request: suppressed
    assert report["policy"]["rights_overdue"]["site-1"] == "<5"
    assert any("answered late or overdue" in f["message"] for f in report["findings"])
    text = json.dumps(report)
    assert "O1" not in text and "E0" not in text  # request ids stay at the site


def test_study_notice_says_what_the_run_declared(run_dir, tmp_path):
    out = tmp_path / "notice.md"
    res = CliRunner().invoke(app, ["notice", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    for heading in (
        "Who is responsible (joint controllers)",
        "essence of the arrangement",
        "Which data, from where, on which legal basis",
        "Your rights",
        "Art. 14(5)(b)",
    ):
        assert heading in text
    assert "Hospital site-0" in text and "Art. 21(6)" in text
    assert "Data Protection Board of India" in text  # site-2 is a DPDP site
    assert "TODO" in text  # what only the controllers can write stays visibly open
