"""Text of the files in the kits: start scripts, READMEs, node config, manifest template.

Scripts are POSIX ``sh``; they find their own directory, so a kit (or a site
directory made from it) can live anywhere. Values are filled in with
:func:`render` (``{{name}}`` placeholders), never by the shell at run time.
"""

from __future__ import annotations

import math
from typing import Any

from fedmeta.deploy.federation import Federation
from policies import SiteManifest, default_site_manifest
from policies.site_policy import SitePrivacyPolicy

TODO = "TODO"
TRANSPORT_SECURE = "tls+supernode-auth"
TRANSPORT_INSECURE = "insecure"
OFFLINE_EXPORTS = ("export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 "
                   "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1")


def render(template: str, **values: Any) -> str:
    out = template
    for key, val in values.items():
        out = out.replace("{{" + key + "}}", str(val))
    if "{{" in out:
        raise ValueError(f"unfilled placeholder in template: {out[out.index('{{'):][:40]}")
    return out


# ---- site kit ------------------------------------------------------------------------
START_NODE = """#!/bin/sh
# Start the Flower SuperNode of site {{site_id}} (federation {{federation}}).
# Written by `fedmeta provision`; the node only connects OUT to the SuperLink.
#   ./start-node.sh              TLS (verified against ca.pem) + SuperNode authentication
#   ./start-node.sh --insecure   no TLS, no authentication: tests on one machine only
set -eu
SITE_DIR="${SITE_DIR:-$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)}"
case "$SITE_DIR" in
  *'"'*|*'\\'*) echo "error: SITE_DIR must not contain quotes or backslashes" >&2; exit 2;;
esac
{{offline}}
export FLWR_HOME="${FLWR_HOME:-$SITE_DIR/flwr-home}"
NODE_CONFIG="site-dir=\\"$SITE_DIR\\" site-id=\\"{{site_id}}\\" site-index={{site_index}}"
if [ "${1:-}" = "--insecure" ]; then
  echo "WARNING: site {{site_id}} connects WITHOUT TLS and WITHOUT node authentication" >&2
  export FEDMETA_TRANSPORT={{insecure}}
  exec flower-supernode --insecure --superlink {{superlink}} \\
    --host 127.0.0.1 --port {{runtime_port}} --node-config "$NODE_CONFIG"
fi
if [ -n "${1:-}" ]; then echo "usage: $0 [--insecure]" >&2; exit 2; fi
export FEDMETA_TRANSPORT={{secure}}
exec flower-supernode --superlink {{superlink}} \\
  --root-certificates "$SITE_DIR/ca.pem" \\
  --auth-supernode-private-key "$SITE_DIR/keys/supernode-auth.key" \\
  --host 127.0.0.1 --port {{runtime_port}} --node-config "$NODE_CONFIG"
"""

NODE_TOML = """# Node config of site {{site_id}} in federation {{federation}}, written by
# `fedmeta provision`. `fedmeta node check` reads it; start-node.sh has the same values.
federation = "{{federation}}"
site_id = "{{site_id}}"
site_index = {{site_index}}
superlink = "{{superlink}}"
runtime_port = {{runtime_port}}
"""

SITE_README = """# Site kit: {{site_id}} (federation {{federation}})

Everything site {{site_id}} needs to run its node. The full guide is `docs/deploy.md`
of the fedmeta repository.

| file | what | secret |
|---|---|---|
| `ca.pem` | the federation CA: the node trusts only a SuperLink certified by it | no |
| `keys/supernode-auth.key` | the node's authentication key (ECDSA P-384, OpenSSH) | **yes, 0600** |
| `keys/supernode-auth.pub` | its public half; the coordinator registered it | no |
| `keys/audit-signing.pem` | signs this site's audit log (Ed25519) | **yes, 0600** |
| `keys/audit-signing.pub.pem` | its public half; the coordinator holds a copy | no |
| `manifest.toml` | who you are and what you allow: fill in every `TODO` | no |
| `node.toml` | site id, data partition, SuperLink address, local port | no |
| `start-node.sh` | starts the node | no |

1. `fedmeta node init <site-dir> --kit <this kit>` lays out the site directory
   (state: privacy ledger, audit log, keys, manifest).
2. Edit `<site-dir>/manifest.toml` (your DPO decides its values).
3. `fedmeta node check <site-dir>` must print all checks passed.
4. `<site-dir>/start-node.sh` starts the node. It only connects out, to
   `{{superlink}}` (TCP, TLS). It listens on 127.0.0.1:{{runtime_port}} only
   (Flower's local Runtime API); choose another port in `node.toml` and the
   script if that one is taken.

The exact command the script runs:

```
{{command}}
```
"""


def start_node_command(superlink: str, site_id: str, site_index: int, runtime_port: int) -> str:
    node_config = f'site-dir="$SITE_DIR" site-id="{site_id}" site-index={site_index}'
    return (f"flower-supernode --superlink {superlink} --root-certificates $SITE_DIR/ca.pem "
            f"--auth-supernode-private-key $SITE_DIR/keys/supernode-auth.key "
            f"--host 127.0.0.1 --port {runtime_port} --node-config '{node_config}'")


# ---- coordinator kit -------------------------------------------------------------------
START_SUPERLINK = """#!/bin/sh
# Start the SuperLink of federation {{federation}} (written by `fedmeta provision`).
#   ./start-superlink.sh             TLS + SuperNode authentication (only registered nodes)
#   ./start-superlink.sh --insecure  no TLS, no authentication: tests on one machine only
# State (registered nodes, runs) lives in $SUPERLINK_STATE (default: ./state).
set -eu
KIT="$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)"
STATE="${SUPERLINK_STATE:-$KIT/state}"
mkdir -p "$STATE"
{{offline}}
export FLWR_HOME="${FLWR_HOME:-$STATE/flwr-home}"
if [ "${1:-}" = "--insecure" ]; then
  echo "WARNING: SuperLink WITHOUT TLS and WITHOUT SuperNode authentication" >&2
  export FEDMETA_TRANSPORT={{insecure}}
  exec flower-superlink --insecure --host {{bind}} --port {{port}} \\
    --database "$STATE/superlink.db" --disable-runtime-dependency-installation
fi
if [ -n "${1:-}" ]; then echo "usage: $0 [--insecure]" >&2; exit 2; fi
export FEDMETA_TRANSPORT={{secure}}
exec flower-superlink --ssl-ca-certfile "$KIT/ca.pem" \\
  --ssl-certfile "$KIT/superlink.pem" --ssl-keyfile "$KIT/superlink.key" \\
  --enable-supernode-auth --host {{bind}} --port {{port}} \\
  --database "$STATE/superlink.db" --disable-runtime-dependency-installation
"""

REGISTER_SITES = """#!/bin/sh
# Register the sites' SuperNode public keys with the running SuperLink.
#   ./register-sites.sh CONNECTION [SITE_ID ...]    (default: every site of the federation)
# CONNECTION is a [superlink.NAME] of $FLWR_HOME/config.toml (see flwr-connection.toml).
# Node ids are appended to state/node-ids.txt as "SITE_ID NODE_ID".
set -u
KIT="$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)"
{{offline}}
CONNECTION="${1:?usage: $0 CONNECTION [SITE_ID ...]}"
shift
[ $# -gt 0 ] || set -- {{site_ids}}
mkdir -p "$KIT/state"
rc=0
for site in "$@"; do
  key="$KIT/site-keys/$site.pub"
  if [ ! -f "$key" ]; then echo "error: no key for site $site ($key)" >&2; rc=1; continue; fi
  if out=$(flwr supernode register "$key" "$CONNECTION" --name "$site" --format json); then
    node=$(printf '%s\\n' "$out" | sed -n 's/.*"node-id": *\\([0-9][0-9]*\\).*/\\1/p')
    echo "$site $node" >> "$KIT/state/node-ids.txt"
    echo "registered $site as node $node"
  else
    echo "error: $site not registered (already registered? see above)" >&2
    rc=1
  fi
done
exit $rc
"""

CONNECTION_TOML = """# Add this to $FLWR_HOME/config.toml (default ~/.flwr/config.toml) on the
# machine where the coordinator runs `flwr`. root-certificates must be an
# absolute path: fix it if you move this kit.
[superlink.{{federation}}]
address = "{{address}}"
root-certificates = "{{ca_path}}"
"""

COORDINATOR_README = """# Coordinator kit (federation {{federation}})

| file | what | secret |
|---|---|---|
| `ca.pem` | the federation CA certificate | no |
| `superlink.pem`, `superlink.key` | the SuperLink's TLS certificate and key | key: **yes, 0600** |
| `site-keys/<site>.pub` | the SuperNode public keys to register | no |
| `site-audit-keys/<site>.pub.pem` | the sites' audit-log public keys (to verify logs) | no |
| `federation.toml` | the federation file this kit was made from | no |
| `flwr-connection.toml` | the `flwr` connection to add to `$FLWR_HOME/config.toml` | no |
| `start-superlink.sh` | starts the SuperLink (TLS, only registered nodes) | no |
| `register-sites.sh` | registers the sites' keys, records node ids in `state/node-ids.txt` | no |

The SuperLink listens on {{bind}}:{{port}} (TCP, TLS). Sites connect to it; it
never connects to them. Its certificate names: {{names}}.

The CA private key is not here: it stays in the `ca/` folder next to the kits,
offline, with whoever provisions the federation.

The exact command `start-superlink.sh` runs:

```
{{command}}
```
"""


def start_superlink_command(bind: str, port: int) -> str:
    return ("flower-superlink --ssl-ca-certfile $KIT/ca.pem --ssl-certfile $KIT/superlink.pem "
            "--ssl-keyfile $KIT/superlink.key --enable-supernode-auth "
            f"--host {bind} --port {port} --database $STATE/superlink.db "
            "--disable-runtime-dependency-installation")


# ---- manifest template -----------------------------------------------------------------
FIELD_NOTES = {
    "site_id": "Pseudonymous site id: appears in messages, logs and reports.",
    "institution": "Legal name of the institution (the controller at this site).",
    "country": "ISO 3166 alpha-2 country where the data and the node are.",
    "role": "controller | joint-controller | processor",
    "dpo_contact": "Contact of the data protection officer.",
    "data_categories": "What data the node trains on (special categories: GDPR Art. 9(1)).",
    "data_subjects": "Whose data.",
    "approved_purposes": "Purposes this site allows its data to be used for.",
    "lawful_basis": "GDPR Art. 6(1) letter (a-f).",
    "art6_3_law": "For basis (c) or (e): 'XX: <the law laying it down>' (GDPR Art. 6(3)).",
    "art9_condition": "GDPR Art. 9(2) letter for special-category data (a, g, h, i, j).",
    "art9_law": "For (g)-(j): 'XX: <the Union or Member State law relied on>'.",
    "art9_3_secrecy": "For (h): the professional secrecy duty of the staff (Art. 9(3)).",
    "minor_age": "Age under which your national law treats a data subject as a minor.",
    "minors_law": "'XX: <the national law on research with minors' data>'.",
    "minors_need_guardian_consent": "Whether that law needs a guardian's consent.",
    "collection_dates_recorded": "Whether records carry collection dates (undated are left out).",
    "dpdp_ground": "DPDP Act 2023 ground: consent, 7(a)-7(i), 17(2)(b).",
    "retention_days": "Records are used at most this many days after collection.",
    "log_retention_days": "How long this site keeps its logs.",
    "transfer_safeguards": "'adequacy' or SCC references (SCC-2021/914-C2C ...).",
    "epsilon_max": "Largest privacy loss (sample-level epsilon) this site accepts in total.",
    "delta": "Largest delta this site accepts.",
    "law_packs": "Which rules apply: gdpr, dpdp.",
    "gdpr_child_age": "GDPR Art. 8 age of digital consent in this country (13-16).",
    "restricted_countries": "Countries notified under DPDP s.16(1).",
    "min_cohort_size": "Counts below this are suppressed in reports.",
    "feature_columns": "The only columns a trainer may read (GDPR Art. 5(1)(c)); [] for demos.",
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def manifest_template(site_id: str, country: str, federation: Federation) -> str:
    """A site manifest that passes the example run's rules, with TODOs to fill in."""
    base: SiteManifest = default_site_manifest(site_id, country=country)
    data = base.model_dump(mode="json", exclude_none=True)
    data["institution"] = f"{TODO}: legal name of the institution"
    data["dpo_contact"] = f"{TODO}: e-mail of the data protection officer"
    for key in ("art6_3_law", "art9_law"):
        if key in data:
            data[key] = f"{base.country}: {TODO}: the law your institution relies on"
    data["collection_dates_recorded"] = True
    lines = [f"# Site manifest of {site_id} (federation {federation.name}), written by",
             "# `fedmeta provision`. Your DPO decides every value; replace each TODO.",
             "# Fields: policies/declarations.py (SiteManifest); example: "
             "policies/examples/site.toml.", ""]
    data.pop("privacy", None)
    privacy = SitePrivacyPolicy().model_dump(mode="json")  # the cautious defaults, spelled out
    order = list(FIELD_NOTES) + [k for k in data if k not in FIELD_NOTES]
    for key in order:
        if key not in data:
            continue
        if key in FIELD_NOTES:
            lines.append(f"# {FIELD_NOTES[key]}")
        lines.append(f"{key} = {_toml_value(data[key])}")
    lines += ["", "# The site's own privacy policy, enforced at this site every round whatever",
              "# the coordinator asks (docs/threat-model.md; fields: policies/site_policy.py).",
              "[privacy]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in privacy.items()
              if value is not None]
    return "\n".join(lines) + "\n"
