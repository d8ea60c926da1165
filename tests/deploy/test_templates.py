"""Deployment templates are rendered by jinja2, TOML values by tomli-w."""

from __future__ import annotations

import math
import re
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.deploy import templates as t
from policies.validation import SITE_ID_PATTERN

NODE = {
    "federation": "fed-1",
    "site_id": "site-de-01",
    "site_index": 3,
    "superlink": "fl.example.org:9093",
    "runtime_port": 9094,
}


def placeholders(template: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)", template))


def test_a_placeholder_without_a_value_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unfilled placeholder.*'runtime_port'"):
        t.render(t.NODE_TOML, **{k: v for k, v in NODE.items() if k != "runtime_port"})


@pytest.mark.parametrize(
    "name",
    [
        "START_NODE",
        "NODE_TOML",
        "SITE_README",
        "START_SUPERLINK",
        "START_PROXY",
        "REGISTER_SITES",
        "UNREGISTER_SITE",
        "CONNECTION_TOML",
        "COORDINATOR_README",
        "SYSTEMD_UNIT",
        "ENV_TEMPLATE",
    ],
)
def test_every_template_renders_whole(name):
    template = getattr(t, name)
    out = t.render(template, **{k: f"<{k}>" for k in placeholders(template)})
    assert "{{" not in out and "}}" not in out
    assert all(f"<{k}>" in out for k in placeholders(template))


@settings(max_examples=100, deadline=None)
@given(
    federation=st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,20}", fullmatch=True),
    site_id=st.from_regex(SITE_ID_PATTERN, fullmatch=True),
    superlink=st.text(max_size=30),
    port=st.integers(1, 65535),
)
def test_node_toml_reads_back_whatever_the_values(federation, site_id, superlink, port):
    text = t.render(
        t.NODE_TOML,
        federation=federation,
        site_id=site_id,
        site_index=0,
        superlink=superlink,
        runtime_port=port,
    )
    back = tomllib.loads(text)
    assert back == {
        "federation": federation,
        "site_id": site_id,
        "site_index": 0,
        "superlink": superlink,
        "runtime_port": port,
    }
    conn = tomllib.loads(t.render(t.CONNECTION_TOML, federation=federation, address=superlink))
    assert conn["superlink"][federation]["address"] == superlink


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(
        st.booleans(),
        st.integers(-(10**6), 10**6),
        st.text(max_size=20),
        st.floats(allow_nan=False),
        st.lists(st.text(max_size=5), max_size=4),
    )
)
def test_toml_value_is_one_line_toml(value):
    text = t.toml_value(value)
    assert "\n" not in text
    back = tomllib.loads(f"v = {text}")["v"]
    assert back == value or (isinstance(value, float) and math.isclose(back, value))
