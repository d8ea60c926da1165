"""Fixtures for the policy tests; plain helpers live in policy_helpers.py."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

sys.path.insert(0, str(HERE))

from policy_helpers import make_run, make_site  # noqa: E402

from policies import RunDeclaration, SiteManifest  # noqa: E402


@pytest.fixture
def run() -> RunDeclaration:
    return make_run()


@pytest.fixture
def de_site() -> SiteManifest:
    return make_site()


@pytest.fixture
def in_site() -> SiteManifest:
    return make_site("site-in")
