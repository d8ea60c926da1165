"""Where fedmeta's files lie, and the environment variables it reads and sets.

The one module that knows the layout of a run directory, a site directory and the
deployment kits; every other module asks it. Plain Python (``pathlib`` and
``dataclasses`` only), so the command line, the report and the deployment tools
load it without torch or Flower.

A run directory (written by ``server/run.py``, the simulated sites and the
privacy ledgers)::

    config.json  metrics.jsonl  summary.json  policy-decisions.json  final_model.pt
    audit/server-audit-log.jsonl   keys/server-audit-signing.pem (+ .pub.pem)
    checkpoints/round-NNNNNN.pt    incidents/incidents.json  shots-curve.json
    sites/<id>/...                 (a site directory, below)

A site directory (a simulated site under ``sites/<id>``, or a deployed node's)::

    manifest.toml  privacy-ledger.jsonl  site.json  approved-declarations.jsonl
    approved-apps.jsonl  server-audit.pub.pem (the pinned server key)
    audit/audit-log.jsonl          keys/audit-signing.pem (+ .pub.pem)
    keys/noise-secret  keys/supernode-auth.key (+ .pub)  keys/tls-client.key  client.pem
    ca.pem  node.toml  start-node.sh  runs/<run-id>/...  exports/

Constants are paths *relative* to the directory they live in (what a record or
a kit lists); :class:`RunPaths` and :class:`SitePaths` join them to a directory::

    RunPaths(run_dir).metrics            # run_dir / "metrics.jsonl"
    RunPaths(run_dir).site("site-1").ledger
    SitePaths(site_dir).audit_log
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# ---- environment variables -------------------------------------------------------------
RUN_CONFIG_ENV = "FEDMETA_RUN_CONFIG"
"""The run directory's config.json, for the ServerApp (set by ``fedmeta simulate``)."""
TRANSPORT_ENV = "FEDMETA_TRANSPORT"
"""How sites are reached: simulation, or a deployment's transport (start scripts)."""
RESUME_ENV = "FEDMETA_RESUME"
""""1": continue the run directory's stopped run (``fedmeta simulate --resume``)."""
ALLOW_NETWORK_ENV = "FEDMETA_ALLOW_NETWORK"
""""1": run a local simulation in this machine's own network namespace."""
NODE_REGISTRY_ENV = "FEDMETA_NODE_REGISTRY"
"""The coordinator's node-id registry (exported by ``start-superlink.sh``)."""
TLS_CLIENT_CERT_ENV = "FEDMETA_TLS_CLIENT_CERT"
"""A site's TLS client certificate (exported by ``start-node.sh``)."""
TLS_CLIENT_KEY_ENV = "FEDMETA_TLS_CLIENT_KEY"
"""A site's TLS client key (exported by ``start-node.sh``)."""
SERVER_AUDIT_KEY_ENV = "FEDMETA_SERVER_AUDIT_KEY"
"""The coordinator's server audit signing key (exported by ``start-superlink.sh``)."""
HEARTBEAT_ENV = "FEDMETA_HEARTBEAT_INTERVAL_S"
"""Seconds between a site node's heartbeats, as it declares them to the SuperLink."""

ENV_NAMES = (
    RUN_CONFIG_ENV,
    TRANSPORT_ENV,
    RESUME_ENV,
    ALLOW_NETWORK_ENV,
    NODE_REGISTRY_ENV,
    TLS_CLIENT_CERT_ENV,
    TLS_CLIENT_KEY_ENV,
    SERVER_AUDIT_KEY_ENV,
    HEARTBEAT_ENV,
)
"""Every FEDMETA_* variable fedmeta reads or sets."""

# ---- a run directory -------------------------------------------------------------------
AUDIT_DIR = "audit"  # audit logs (a run's server log, a site's log)
KEYS_DIR = "keys"  # private keys (0700), with the public halves beside them
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DECISIONS_FILE = "policy-decisions.json"
MODEL_FILE = "final_model.pt"
SERVER_AUDIT_LOG = Path(AUDIT_DIR) / "server-audit-log.jsonl"
SERVER_AUDIT_KEY = Path(KEYS_DIR) / "server-audit-signing.pem"
SERVER_AUDIT_PUBKEY = Path(KEYS_DIR) / "server-audit-signing.pub.pem"
SITES_DIR = "sites"
CHECKPOINT_DIR = "checkpoints"
INCIDENTS_DIR = "incidents"
INCIDENTS_FILE = "incidents.json"
INCIDENTS_LOG = "audit-log.jsonl"  # in incidents/
INCIDENTS_KEY = "incident-signing.pem"  # in incidents/
SHOTS_CURVE = "shots-curve.json"  # what `fedmeta evaluate` writes into the first run directory
STUDY_NOTICE = "study-notice.md"

# ---- a site directory ------------------------------------------------------------------
MANIFEST_FILE = "manifest.toml"
LEDGER_FILE = "privacy-ledger.jsonl"
MARKER_FILE = "site.json"  # names the site a ledger belongs to
SITE_AUDIT_LOG = Path(AUDIT_DIR) / "audit-log.jsonl"
SITE_AUDIT_KEY = Path(KEYS_DIR) / "audit-signing.pem"
SITE_AUDIT_PUBKEY = Path(KEYS_DIR) / "audit-signing.pub.pem"
NOISE_SECRET = Path(KEYS_DIR) / "noise-secret"
DECLARATION_APPROVALS = "approved-declarations.jsonl"
APP_APPROVALS = "approved-apps.jsonl"
PINNED_SERVER_KEY = "server-audit.pub.pem"  # the coordinator's audit key, in a site kit too
NODE_KEY = Path(KEYS_DIR) / "supernode-auth.key"
NODE_PUB = Path(KEYS_DIR) / "supernode-auth.pub"
TLS_KEY = Path(KEYS_DIR) / "tls-client.key"
RETIRED_KEYS = Path(KEYS_DIR) / "retired"
CLIENT_CERT = "client.pem"
CA_CERT = "ca.pem"
NODE_TOML = "node.toml"
NODE_SCRIPT = "start-node.sh"
RUNS_DIR = "runs"  # one sub-directory per run the site took part in (its run record)
EXPORTS_DIR = "exports"

# ---- a coordinator kit -----------------------------------------------------------------
NODE_REGISTRY = Path("state") / "node-ids.txt"
FEDERATION_FILE = "federation.toml"
SITE_NODE_KEYS_DIR = "site-keys"  # <site>.pub: the sites' SuperNode public keys
SITE_AUDIT_KEYS_DIR = "site-audit-keys"  # <site>.pub.pem: the sites' audit public keys


def simulated_site_id(index: int) -> str:
    """The id of the ``index``-th simulated site (its directory under ``sites/``)."""
    return f"site-{index}"


@dataclass(frozen=True)
class SitePaths:
    """The files of one site directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_FILE

    @property
    def audit_log(self) -> Path:
        return self.root / SITE_AUDIT_LOG

    @property
    def audit_key(self) -> Path:
        return self.root / SITE_AUDIT_KEY

    @property
    def audit_pubkey(self) -> Path:
        return self.root / SITE_AUDIT_PUBKEY


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def decisions(self) -> Path:
        return self.root / DECISIONS_FILE

    @property
    def model(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def server_log(self) -> Path:
        return self.root / SERVER_AUDIT_LOG

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_AUDIT_KEY

    @property
    def server_pubkey(self) -> Path:
        return self.root / SERVER_AUDIT_PUBKEY

    @property
    def shots_curve(self) -> Path:
        return self.root / SHOTS_CURVE

    @property
    def study_notice(self) -> Path:
        return self.root / STUDY_NOTICE

    @property
    def sites(self) -> Path:
        return self.root / SITES_DIR

    def site(self, site_id: str) -> SitePaths:
        """The directory of site ``site_id`` in this run (``sites/<id>``)."""
        return SitePaths(self.sites / site_id)
