"""One site id, one country code and one error line for every file fedmeta reads."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policies.countries import iso_countries
from policies.validation import (
    SITE_ID_PATTERN,
    Country,
    SiteId,
    check_country,
    check_site_id,
    format_validation_error,
)


class Site(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: SiteId
    country: Country
    rounds: int = Field(default=1, ge=1)


SITE_ID_CHARS = string.ascii_letters + string.digits + "._-"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_a_site_id_exactly_when_it_matches_the_one_pattern(text):
    ok = (
        0 < len(text) <= 64
        and text[0].isascii()
        and text[0].isalnum()
        and all(c in SITE_ID_CHARS for c in text)
    )
    try:
        assert check_site_id(text) == text and ok
    except ValueError as exc:
        assert not ok and "\n" not in str(exc) and "such as site-de-01" in str(exc)
    assert bool(SITE_ID_PATTERN.fullmatch(text)) == ok


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=6)
    | st.sampled_from(sorted(iso_countries()))
    .map(lambda c: st.sampled_from([c, c.lower(), f" {c} "]))
    .flatmap(lambda s: s)
)
def test_any_text_is_a_country_exactly_when_it_is_an_iso_code(text):
    code = text.strip().upper()
    try:
        got = check_country(text)
    except ValueError as exc:
        assert code not in iso_countries() and "\n" not in str(exc) and "ISO 3166" in str(exc)
    else:
        assert got == code and code in iso_countries()


def test_the_eu_codes_for_the_uk_and_greece_say_which_to_use():
    with pytest.raises(ValueError, match="use GB"):
        check_country("uk")
    with pytest.raises(ValueError, match="GR for Greece"):
        check_country("EL")


def test_the_types_are_the_ones_every_model_uses():
    from fedmeta.deploy.federation import SiteEntry
    from fedmeta.deploy.request import SiteRequest
    from policies.declarations import RunDeclaration, SiteManifest
    from policies.dpia import DpiaScope

    def meta(model, name):
        return model.model_fields[name].metadata

    site_id, country = SiteId.__metadata__, Country.__metadata__
    assert meta(SiteManifest, "site_id") == list(site_id)
    assert meta(SiteManifest, "country") == list(country)
    assert meta(RunDeclaration, "server_country") == list(country)
    assert meta(SiteEntry, "id") == list(site_id) and meta(SiteEntry, "country") == list(country)
    assert meta(SiteRequest, "site_id") == list(site_id)
    assert DpiaScope.model_fields["countries"].annotation == frozenset[Country]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"id": "s-1", "country": "de", "roundz": 2},
            "site.toml: field 'roundz': is not a known field: remove it or fix its spelling "
            "(did you mean 'rounds'?)",
        ),
        ({"country": "DE"}, "site.toml: field 'id': is required: add it"),
        (
            {"id": "-x", "country": "XX", "rounds": 0},
            "site.toml: field 'id': must be a pseudonymous id of at most 64 letters, digits, '.', "
            "'_' or '-' such as site-de-01 (got '-x') (and 2 more problem(s))",
        ),
        (
            {"id": "s", "country": "DE", "rounds": "many"},
            "site.toml: field 'rounds': must be a valid integer, unable to parse string as an "
            "integer (got 'many')",
        ),
    ],
)
def test_one_line_names_the_file_the_field_and_what_to_do(data, expected):
    with pytest.raises(ValidationError) as exc:
        Site.model_validate(data)
    assert format_validation_error(exc.value, "site.toml", model=Site) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "country", "rounds", "other", "x\ny"]),
        st.none() | st.integers() | st.text(max_size=300) | st.lists(st.text()),
        max_size=4,
    )
)
def test_any_document_gives_a_model_or_one_bounded_line_naming_the_file(data):
    try:
        Site.model_validate(data)
    except ValidationError as exc:
        line = format_validation_error(exc, "f.toml", model=Site, noun="option")
        assert "\n" not in line and line.startswith("f.toml: ") and len(line) <= 500
