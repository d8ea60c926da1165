"""Fixtures for the policy tests; plain helpers live in policy_helpers.py."""

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# tests/ is on sys.path (tests/conftest.py), so the folder tests/policies could be
# imported as a namespace package named "policies" instead of the real package,
# which the editable install only finds after sys.path. Put the repository first.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if getattr(sys.modules.get("policies"), "__file__", "") is None:
    del sys.modules["policies"]
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
