"""``--trust``: the provisioned kits' keys work as they are; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmeta.audit.keys import fingerprint, load_public_key, public_raw_b64
from fedmeta.deploy.kits import provision
from fedmeta.deploy.node import init_site
from fedmeta.paths import SitePaths
from fedmeta.report.trust import TrustError, load_trust

FED = """name = "trustfed"
[superlink]
host = "fl.example.org"
port = 9093

[[sites]]
id = "site-de-01"
country = "DE"
index = 0

[[sites]]
id = "site-in-01"
country = "in"
"""


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Provisioned kits after each site sent its request (its keys are born at the site,
    in ``<tmp>/sites/<site-id>/keys/``; the coordinator kit receives the public halves)."""
    tmp = tmp_path_factory.mktemp("kits")
    (tmp / "federation.toml").write_text(FED)
    provision(tmp / "federation.toml", tmp / "kits")
    for site in ("site-de-01", "site-in-01"):
        site_dir = tmp / "sites" / site
        init_site(site_dir, kit=tmp / "kits" / "sites" / site)
        provision(
            tmp / "federation.toml", tmp / "kits", requests=[site_dir / f"request-{site}.json"]
        )
    return tmp / "kits"


def own_key(kits: Path, site: str) -> Path:
    """The site's own public audit key, as its node init wrote it at the site."""
    return SitePaths(kits.parent / "sites" / site).audit_pubkey


def fp(path: Path) -> str:
    return fingerprint(load_public_key(path))


def test_coordinator_site_audit_keys_directory(kits: Path) -> None:
    trust = load_trust([str(kits / "coordinator" / "site-audit-keys")])
    assert set(trust) == {"site-de-01", "site-in-01"}
    for site, anchor in trust.items():
        own = own_key(kits, site)
        assert anchor.fingerprint == fp(own) and len(anchor.fingerprint) == 7 + 64


def test_a_sites_own_key_file_as_is(kits: Path) -> None:
    own = own_key(kits, "site-in-01")
    assert load_trust([str(own)])["site-in-01"].fingerprint == fp(own)
    assert load_trust([f"site-in-01={own}"])["site-in-01"].fingerprint == fp(own)


def test_trust_file_with_keys_and_fingerprints(kits: Path, tmp_path: Path) -> None:
    de = kits / "coordinator" / "site-audit-keys" / "site-de-01.pub.pem"
    raw = load_public_key(own_key(kits, "site-in-01"))
    f = tmp_path / "trust.txt"
    f.write_text(
        f"# registered at the kick-off\nsite-de-01 = {fp(de)}\n"
        f"site-in-01 = {public_raw_b64(raw)}\nserver = {de}\n"
    )
    trust = load_trust([str(f)])
    assert trust["site-de-01"].fingerprint == fp(de) == trust["server"].fingerprint
    assert trust["site-in-01"].fingerprint == fingerprint(raw)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nothing-here", "no such file"),
        ("site-1=sha256:abcd", "full SHA-256"),
        ("site-1=not-a-key", "neither a key file"),
        ("bad party!=sha256:" + "0" * 64, "not a party id"),
    ],
)
def test_bad_trust_arguments_are_one_line(spec: str, needle: str) -> None:
    with pytest.raises(TrustError) as exc:
        load_trust([spec])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_two_keys_for_one_party_is_an_error(kits: Path) -> None:
    de = own_key(kits, "site-de-01")
    other = own_key(kits, "site-in-01")
    with pytest.raises(TrustError, match="another key"):
        load_trust([str(de), f"site-de-01={other}"])
