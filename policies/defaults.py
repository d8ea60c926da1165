"""Ready-made declarations for simulations and examples.

``policies/examples/`` holds three TOML files a simulation can load as they are:
``run.toml`` (a research run with the server in Germany), ``site.toml`` (a
German hospital, GDPR) and ``site-in.toml`` (an Indian hospital, DPDP). They
pass every site-level rule together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from policies.countries import adequacy_list, is_eea
from policies.declarations import (
    RunDeclaration,
    SiteManifest,
    load_run_declaration,
    load_site_manifest,
)

EXAMPLES_DIR = Path(__file__).parent / "examples"
EXAMPLE_RUN = EXAMPLES_DIR / "run.toml"
EXAMPLE_SITE = EXAMPLES_DIR / "site.toml"
EXAMPLE_SITE_IN = EXAMPLES_DIR / "site-in.toml"


def example_run_declaration() -> RunDeclaration:
    """``policies/examples/run.toml``."""
    return load_run_declaration(EXAMPLE_RUN)


def example_site_manifest(name: str = "site") -> SiteManifest:
    """``policies/examples/<name>.toml`` (``site`` or ``site-in``)."""
    return load_site_manifest(EXAMPLES_DIR / f"{name}.toml")


def default_site_manifest(
    site_id: str, country: str = "DE", feature_columns: Sequence[str] = ()
) -> SiteManifest:
    """A hospital site for simulations that accepts the example run.

    A site in India gets the ``dpdp`` pack on the s.17(2)(b) research route (so
    synthetic records need no consent metadata); any other site gets the
    ``gdpr`` pack on Art. 6(1)(e) and, outside the EEA and full adequacy, an SCC
    so the example run (server in DE) may send it the model.
    """
    country = country.upper()
    common = dict(
        site_id=site_id,
        institution=f"Simulated hospital {site_id}",
        country=country,
        role="joint-controller",
        data_categories=frozenset({"health", "demographic"}),
        data_subjects=frozenset({"patients"}),
        approved_purposes=frozenset({"research.model-training", "care.diagnosis-support"}),
        retention_days=3650,
        log_retention_days=730,
        epsilon_max=10.0,
        delta=1e-5,
        feature_columns=tuple(feature_columns),
        # bundled public data sets carry no collection dates
        collection_dates_recorded=False,
    )
    if country == "IN":
        return SiteManifest.model_validate(
            {
                **common,
                "dpdp_ground": "17(2)(b)",
                "law_packs": ("dpdp",),
                "transfer_safeguards": ("SCC-2021/914-C2C",),
            }
        )
    adequate = (
        country in adequacy_list().countries and not adequacy_list().countries[country].partial
    )
    safeguards = () if is_eea(country) or adequate else ("SCC-2021/914-C2C",)
    simulated_law = f"{country}: none (a simulated site on bundled public data relies on no law)"
    return SiteManifest.model_validate(
        {
            **common,
            "lawful_basis": "e",
            "art6_3_law": simulated_law,
            "art9_condition": "j",
            "art9_law": simulated_law,
            "law_packs": ("gdpr",),
            "transfer_safeguards": safeguards,
        }
    )
