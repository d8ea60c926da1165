"""What a site's ClientApp answers without training, and so without torch or Opacus:
the site's manifest, where a simulated site keeps its files, the site's audit log.

A deployed site starts a ClientApp process per message; only a training round needs
``fedmeta.site`` (torch, Opacus: seconds to import), so the queries (``identify``, the
run's end) import from here.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedmeta.audit import AuditLog
from fedmeta.config import RunConfig
from fedmeta.paths import RunPaths, SitePaths, simulated_site_id
from policies import SiteManifest, default_site_manifest, load_site_manifest


def load_manifest(site_dir: Path, site_id: str, cfg: RunConfig) -> SiteManifest:
    """``<site-dir>/manifest.toml`` if present, else a simulated hospital's defaults."""
    path = SitePaths(site_dir).manifest
    if path.exists():
        return load_site_manifest(path)
    # a simulated site on bundled public data accepts what the run config asks for,
    # a non-private run (--no-dp) included: it is then declared and reported as such
    budget = float(cfg.epsilon_max) if cfg.dp else math.inf
    return default_site_manifest(site_id, country=cfg.site_country).model_copy(
        update={"epsilon_max": budget, "delta": float(cfg.delta)}
    )


def simulation_site_dir(out_dir: str | Path, site_index: int) -> Path:
    return RunPaths(out_dir).site(simulated_site_id(site_index)).root


def site_audit_log(site_dir: Path, site_id: str) -> AuditLog:
    """The site's own signed audit log (its key in the site directory)."""
    paths = SitePaths(site_dir)
    return AuditLog.open(paths.audit_log, paths.audit_key, actor=site_id)
