"""Loading run declarations and site manifests: examples, errors, fuzzing."""

from __future__ import annotations

import math
import tempfile
import tomllib
from datetime import date
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import (
    EXAMPLE_RUN,
    EXAMPLE_SITE,
    EXAMPLE_SITE_IN,
    DeclarationError,
    RunDeclaration,
    SiteManifest,
    default_site_manifest,
    eligible_sites,
    evaluate_run,
    load_run_declaration,
    load_site_manifest,
    parse_run_declaration,
    parse_site_manifest,
)
from policies.countries import adequacy_list, eea_countries, iso_countries

SITE_TOML = EXAMPLE_SITE.read_text(encoding="utf-8")
RUN_TOML = EXAMPLE_RUN.read_text(encoding="utf-8")


# ---- the shipped examples ---------------------------------------------------


def test_examples_load_and_pass_every_rule():
    run = load_run_declaration(EXAMPLE_RUN)
    de = load_site_manifest(EXAMPLE_SITE)
    india = load_site_manifest(EXAMPLE_SITE_IN)
    assert run.purpose == "research.model-training"
    assert (run.lawful_basis, run.special_category_condition) == ("e", "j")
    assert de.art9_condition == "j" and de.art9_law and de.art9_law.startswith("DE: ")
    assert de.art6_3_law and de.art6_3_law.startswith("DE: ")
    assert run.server_country == "DE" and run.min_sites_per_round == 2
    assert (run.dp_enabled, run.epsilon, run.delta) == (True, 8.0, 1e-5)
    assert de.country == "DE" and de.law_packs == ("gdpr",) and "health" in de.data_categories
    assert "patients" in de.data_subjects
    assert india.country == "IN" and india.law_packs == ("dpdp",)
    decisions = evaluate_run(run, [de, india])
    assert all(d.outcome.value == "allow" for d in decisions), [
        d.reason for d in decisions if d.denied
    ]
    assert eligible_sites(decisions, [de, india]) == [de, india]


@pytest.mark.parametrize("country", ["DE", "FR", "IN", "US", "BR", "CH"])
def test_default_site_manifest_accepts_the_example_run(country):
    run = load_run_declaration(EXAMPLE_RUN)
    sites = [default_site_manifest("sim-0", country), default_site_manifest("sim-1")]
    decisions = evaluate_run(run, sites)
    # every rule but the gates accepts them: the example registry and DPIA name no "sim-*"
    gates = ("GDPR-35", "GDPR-26-28")
    assert not [d.reason for d in decisions if d.denied and d.rule_id not in gates]
    (parties,) = [d for d in decisions if d.rule_id == "GDPR-26-28"]
    assert parties.denied and parties.reason.startswith("sim-0: no party in the registry")
    (gate,) = [d for d in decisions if d.rule_id == "GDPR-35"]
    assert gate.denied and "new site(s) not assessed: sim-0, sim-1" in gate.reason
    assert (f"new country(ies) not assessed: {country}" in gate.reason) == (
        country not in ("DE", "FR", "IN")
    )
    assert sites[0].country == country
    assert sites[0].law_packs == (("dpdp",) if country == "IN" else ("gdpr",))


def test_canonical_dicts_are_sorted_and_json_ready():
    site = load_site_manifest(EXAMPLE_SITE)
    d = site.to_dict()
    assert d["data_categories"] == sorted(d["data_categories"])
    assert d["approved_purposes"] == sorted(site.approved_purposes)
    assert SiteManifest.model_validate(d) == site
    run = load_run_declaration(EXAMPLE_RUN)
    assert RunDeclaration.model_validate(run.to_dict()) == run


def test_reference_data():
    assert len(iso_countries()) == 249 and "GB" in iso_countries() and "UK" not in iso_countries()
    # 30 EEA states plus EU territories with ISO codes of their own (outermost regions, Åland)
    assert len(eea_countries()) == 37 and {"DE", "NO", "IS", "LI", "GR"} <= eea_countries()
    assert {"RE", "GP", "MQ", "GF", "YT", "MF", "AX"} <= eea_countries()
    adequacy = adequacy_list()
    assert adequacy.as_of == date(2026, 11, 30) and "2026/179" in adequacy.source
    assert {"CH", "GB", "JP", "KR", "US", "CA", "BR"} <= set(adequacy.countries)
    assert adequacy.countries["US"].partial and not adequacy.countries["CH"].partial
    assert adequacy.countries["JP"].partial and "private" in adequacy.countries["JP"].scope
    assert not adequacy.countries["BR"].partial  # Implementing Decision (EU) 2026/179
    for code in ("US", "CA", "IL", "KR", "JP"):
        assert adequacy.countries[code].note, code  # scope notes a DPO must read
    assert set(adequacy.countries) <= set(iso_countries())
    assert not set(adequacy.countries) & eea_countries()


# ---- malformed files: one line naming the file and the field ----------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    if "dpia_file" in text:  # a run declaration names its DPIA file beside it
        dpia = EXAMPLE_RUN.with_name("dpia.toml")
        (tmp_path / "dpia.toml").write_text(dpia.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def _replace(text: str, line_start: str, new_line: str | None) -> str:
    lines = text.splitlines()
    out = [
        (new_line if line.startswith(line_start) else line)
        for line in lines
        if not (new_line is None and line.startswith(line_start))
    ]
    return "\n".join(line for line in out if line is not None) + "\n"


SITE_CASES = [
    # (line to change, new line or None to delete, expected message fragment)
    ("lawful_basis", 'lawful_basis = "g"', "field 'lawful_basis': must be one of a, b, c, d, e, f"),
    ("country", 'country = "UK"', "field 'country': 'UK' is not an ISO 3166 code: use GB"),
    ("country", 'country = "Germany"', "field 'country': must be an ISO 3166 alpha-2"),
    ("site_id", None, "field 'site_id': is required: add it"),
    (
        "retention_days",
        'retention_days = "ten years"',
        "field 'retention_days': must be a valid integer",
    ),
    ("retention_days", "retention_days = -1", "field 'retention_days': must be greater than 0"),
    (
        "law_packs",
        'law_packs = ["gdpr", "hipaa"]',
        "field 'law_packs[1]': must be one of gdpr, dpdp",
    ),
    ("law_packs", "law_packs = []", "field 'law_packs': must name at least one of gdpr, dpdp"),
    (
        "gdpr_child_age",
        "gdpr_child_age = 18",
        "field 'gdpr_child_age': must be less than or equal to 16",
    ),
    (
        "approved_purposes",
        'approved_purposes = ["selling"]',
        "field 'approved_purposes[0]': must be one of research.model-training",
    ),
    (
        "transfer_safeguards",
        'transfer_safeguards = ["BCR"]',
        "field 'transfer_safeguards[0]': must be 'adequacy' or an SCC reference",
    ),
    ("epsilon_max", 'epsilon_max = "10"', "field 'epsilon_max': must be a valid number"),
    ("epsilon_max", "epsilon_max = nan", "field 'epsilon_max': must be greater than 0"),
    ("delta", "delta = 1.5", "field 'delta': must be less than 1"),
    ("data_subjects", 'data_subjects = "patients"', "field 'data_subjects': must be a list"),
    (
        "role",
        'role = "owner"',
        "field 'role': must be one of controller, joint-controller, processor",
    ),
    (
        "site_id",
        'site_id = "jane.doe@hospital.example"',
        "field 'site_id': must be a pseudonymous id",
    ),
    (
        "min_cohort_size",
        "min_cohort_sise = 5",
        "field 'min_cohort_sise': is not a known field: remove it or fix its spelling "
        "(did you mean 'min_cohort_size'?)",
    ),
    (
        "dpdp_ground",
        'dpdp_ground = "legitimate-interests"',
        "field 'dpdp_ground': must be one of consent, 7(a)",
    ),
]


@pytest.mark.parametrize(("line", "new", "expected"), SITE_CASES)
def test_site_manifest_errors_name_file_and_field(tmp_path, line, new, expected):
    text = SITE_TOML if line != "dpdp_ground" else EXAMPLE_SITE_IN.read_text(encoding="utf-8")
    path = _write(tmp_path, "site.toml", _replace(text, line + " ", new))
    with pytest.raises(DeclarationError) as err:
        load_site_manifest(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


RUN_CASES = [
    ("purpose", 'purpose = "research"', "field 'purpose': must be one of research.model-training"),
    (
        "special_category_condition",
        'special_category_condition = "k"',
        "field 'special_category_condition': must be one of a, g, h, i, j",
    ),
    ("server_country", 'server_country = "EL"', "field 'server_country': 'EL' is the EU's code"),
    ("epsilon", None, "field 'epsilon': is required when dp_enabled is true"),
    ("epsilon", "epsilon = inf", "field 'epsilon': must be a finite number"),
    ("dp_enabled", 'dp_enabled = "yes"', "field 'dp_enabled': must be a valid boolean"),
    (
        "min_sites_per_round",
        "min_sites_per_round = 0",
        "field 'min_sites_per_round': must be greater than or equal to 1",
    ),
    (
        "log_retention_days",
        "log_retention_days = 1.5",
        "field 'log_retention_days': must be a valid integer",
    ),
    (
        'contact_email = "privacy@consortium',
        'contact_email = "nobody"',
        "field 'controller.contact_email': must be an e-mail address",
    ),
    (
        'contact_email = "privacy@hospital-in',
        "contact_email = 42",
        "field 'joint_controllers[1].contact_email'",
    ),
]


@pytest.mark.parametrize(("line", "new", "expected"), RUN_CASES)
def test_run_declaration_errors_name_file_and_field(tmp_path, line, new, expected):
    sep = "" if "=" in line else " "
    path = _write(tmp_path, "run.toml", _replace(RUN_TOML, line + sep, new))
    with pytest.raises(DeclarationError) as err:
        load_run_declaration(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert expected in message


def test_relative_name_in_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "site.toml", _replace(SITE_TOML, "lawful_basis ", 'lawful_basis = "z"'))
    with pytest.raises(
        DeclarationError, match=r"^site\.toml: field 'lawful_basis': must be one of"
    ):
        load_site_manifest("site.toml")


def test_not_toml_missing_file_and_multiple_errors(tmp_path):
    bad = _write(tmp_path, "site.toml", 'site_id = "x"\ncountry = \n')
    with pytest.raises(DeclarationError, match=r"site\.toml: not valid TOML: .*fix the syntax"):
        load_site_manifest(bad)
    with pytest.raises(DeclarationError, match=r"nope\.toml: file not found"):
        load_site_manifest(tmp_path / "nope.toml")
    with pytest.raises(DeclarationError, match="is a directory"):
        load_run_declaration(tmp_path)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DeclarationError):
        load_run_declaration(binary)
    empty = _write(tmp_path, "empty.toml", "")
    with pytest.raises(
        DeclarationError, match=r"empty\.toml: field '\w+': is required: add it \(and \d+ more"
    ):
        load_site_manifest(empty)


# ---- fuzzing: anything TOML can hold fails only with DeclarationError -------

toml_scalars = (
    st.text(max_size=30)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.datetimes()
    | st.dates()
    | st.sampled_from(
        [
            "a",
            "e",
            "j",
            "DE",
            "IN",
            "UK",
            "gdpr",
            "dpdp",
            "health",
            "minors",
            "research.model-training",
            "SCC-2021/914-C2C",
            "adequacy",
            "consent",
        ]
    )
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
SITE_FIELDS = list(SiteManifest.model_fields)
RUN_FIELDS = list(RunDeclaration.model_fields)
SITE_BASE = tomllib.loads(SITE_TOML)
RUN_BASE = tomllib.loads(RUN_TOML)


def _check(parse, data, source):
    try:
        result = parse(data, source)
    except DeclarationError as exc:
        message = str(exc)
        assert message.startswith(f"{source}: ") and "\n" not in message
    else:
        assert isinstance(result, (SiteManifest, RunDeclaration))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(SITE_FIELDS) | st.text(max_size=12), toml_values, max_size=12)
)
def test_fuzz_site_dicts(data):
    _check(parse_site_manifest, data, "fuzz-site.toml")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SITE_FIELDS), toml_values)
def test_fuzz_one_site_field(field, value):
    _check(parse_site_manifest, {**SITE_BASE, field: value}, "site.toml")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(RUN_FIELDS), toml_values)
def test_fuzz_one_run_field(field, value):
    _check(parse_run_declaration, {**RUN_BASE, field: value}, "run.toml")


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.sampled_from(RUN_FIELDS) | st.text(max_size=12), toml_values, max_size=12)
)
def test_fuzz_run_dicts(data):
    _check(parse_run_declaration, data, "fuzz-run.toml")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_file_bytes(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.toml"
        path.write_bytes(content)
        try:
            load_site_manifest(path)
        except DeclarationError as exc:
            assert "\n" not in str(exc)


def test_parse_rejects_non_table():
    with pytest.raises(DeclarationError, match="must be a TOML table"):
        parse_site_manifest([1, 2], "x.toml")  # type: ignore[arg-type]


def test_non_finite_and_special_values():
    with pytest.raises(DeclarationError, match="epsilon_max"):
        parse_site_manifest({**SITE_BASE, "epsilon_max": -math.inf}, "s.toml")
    site = parse_site_manifest({**SITE_BASE, "epsilon_max": math.inf}, "s.toml")
    assert math.isinf(site.epsilon_max)
    site = parse_site_manifest({**SITE_BASE, "country": " de "}, "s.toml")
    assert site.country == "DE"
