"""Text of the files in the kits: start scripts, READMEs, node config, manifest template.

Scripts are POSIX ``sh``; they find their own directory, so a kit (or a site
directory made from it) can live anywhere. Values are filled in with
:func:`render` (jinja2: ``{{name}}`` placeholders, a missing value is an error),
never by the shell at run time; values in TOML files go through the ``toml`` filter
(tomli-w), so a name is always quoted and escaped as TOML wants.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2
import tomli_w

from fedmeta.deploy.federation import Federation
from policies import SiteManifest, default_site_manifest
from policies.site_policy import SitePrivacyPolicy

TODO = "TODO"
TRANSPORT_SECURE = "tls+supernode-auth"
TRANSPORT_INSECURE = "insecure"
ENV_FILE = "flwr-offline.env"
ENV_TEMPLATE = """# Sourced by every script of this kit, and by you before any `flwr` command:
#   . ./{{env_file}}
# Flower and Ray never call home from this machine: no telemetry, no update check
# (a POST to Flower's servers with versions and OS), no runtime installs.
{{exports}}
"""


def env_file_text() -> str:
    """The kits' environment file, from :data:`fedmeta.offline.OFFLINE_ENV`."""
    from fedmeta.offline import OFFLINE_ENV

    exports = "\n".join(f"export {k}={v}" for k, v in OFFLINE_ENV.items())
    return render(ENV_TEMPLATE, env_file=ENV_FILE, exports=exports)


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (a string quoted and escaped, a list inline)."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined: raises, naming the placeholder
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
)
_ENV.filters["toml"] = toml_value


def render(template: str, **values: Any) -> str:
    """``template`` with its ``{{name}}`` placeholders filled in (jinja2); a placeholder
    without a value is a ValueError."""
    try:
        return _ENV.from_string(template).render(**values)
    except jinja2.UndefinedError as exc:
        raise ValueError(f"unfilled placeholder in template: {exc.message}") from None


# ---- site kit ------------------------------------------------------------------------
START_NODE = """#!/bin/sh
# Start the Flower SuperNode of site {{site_id}} (federation {{federation}}).
# Written by `fedmeta provision`; the node only connects OUT, to the coordinator's proxy.
#   ./start-node.sh              TLS with the site's client certificate (client.pem),
#                                server verified against ca.pem, SuperNode authentication
#   ./start-node.sh --insecure   no TLS, no authentication: tests on one machine only
set -eu
SITE_DIR="${SITE_DIR:-$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)}"
case "$SITE_DIR" in
  *'"'*|*'\\'*) echo "error: SITE_DIR must not contain quotes or backslashes" >&2; exit 2;;
esac
. "$SITE_DIR/{{env_file}}"
export FLWR_HOME="${FLWR_HOME:-$SITE_DIR/flwr-home}"
NODE_CONFIG="site-dir=\\"$SITE_DIR\\" site-id=\\"{{site_id}}\\" site-index={{site_index}}"
if [ "${1:-}" = "--insecure" ]; then
  echo "WARNING: site {{site_id}} connects WITHOUT TLS and WITHOUT node authentication" >&2
  export FEDMETA_TRANSPORT={{insecure}}
  exec fedmeta node supernode --insecure --superlink {{superlink}} \\
    --host 127.0.0.1 --port {{runtime_port}} --node-config "$NODE_CONFIG"
fi
if [ -n "${1:-}" ]; then echo "usage: $0 [--insecure]" >&2; exit 2; fi
for f in client.pem keys/tls-client.key keys/supernode-auth.key; do
  if [ ! -f "$SITE_DIR/$f" ]; then
    echo "error: $SITE_DIR/$f missing: send request-{{site_id}}.json to the provisioner," \\
      "then run 'fedmeta node init $SITE_DIR --kit KIT' with the kit it returns" >&2
    exit 2
  fi
done
export FEDMETA_TRANSPORT={{secure}}
export FEDMETA_TLS_CLIENT_CERT="$SITE_DIR/client.pem"
export FEDMETA_TLS_CLIENT_KEY="$SITE_DIR/keys/tls-client.key"
exec fedmeta node supernode --superlink {{superlink}} \\
  --root-certificates "$SITE_DIR/ca.pem" \\
  --auth-supernode-private-key "$SITE_DIR/keys/supernode-auth.key" \\
  --host 127.0.0.1 --port {{runtime_port}} --node-config "$NODE_CONFIG"
"""

NODE_TOML = """# Node config of site {{site_id}} in federation {{federation}}, written by
# `fedmeta provision`. `fedmeta node check` reads it; start-node.sh has the same values.
federation = {{federation | toml}}
site_id = {{site_id | toml}}
site_index = {{site_index | toml}}
superlink = {{superlink | toml}}
runtime_port = {{runtime_port | toml}}
"""

SITE_README = """# Site kit: {{site_id}} (federation {{federation}})

Everything site {{site_id}} needs to run its node, except its private keys: those are
created on the site's machine by `fedmeta node init` and never leave it. The full
guide is `docs/deploy.md` of the fedmeta repository.

| file | what | secret |
|---|---|---|
| `ca.pem` | the federation CA: the node trusts only a server certified by it | no |
| `client.pem` | the site's TLS client certificate (once its request is accepted) | no |
| `manifest.toml` | who you are and what you allow: fill in every `TODO` | no |
| `node.toml` | site id, data partition, coordinator address, local port | no |
| `{{env_file}}` | Flower's telemetry and update checks off (sourced by the script) | no |
| `start-node.sh` | starts the node | no |

1. `fedmeta node init <site-dir> --kit <this kit>` lays out the site directory and
   creates the site's keys in `<site-dir>/keys/` (0600): SuperNode key, audit-signing
   key, TLS client key. It writes `<site-dir>/request-{{site_id}}.json` (public keys
   and a certificate signing request only) and prints its SHA-256.
2. Send the request file to the provisioner; confirm its SHA-256 over the phone.
3. With the kit the provisioner sends back (it now holds `client.pem`), run
   `fedmeta node init <site-dir> --kit <kit>` again.
4. Edit `<site-dir>/manifest.toml` (your DPO decides its values);
   `fedmeta node check <site-dir>` must print all checks passed.
5. `<site-dir>/start-node.sh` starts the node. It only connects out, to
   `{{superlink}}` (HTTPS, mutual TLS). It listens on 127.0.0.1:{{runtime_port}} only
   (Flower's local Runtime API).

The exact command the script runs:

```
{{command}}
```
"""


def start_node_command(superlink: str, site_id: str, site_index: int, runtime_port: int) -> str:
    node_config = f'site-dir="$SITE_DIR" site-id="{site_id}" site-index={site_index}'
    return (
        "FEDMETA_TLS_CLIENT_CERT=$SITE_DIR/client.pem "
        "FEDMETA_TLS_CLIENT_KEY=$SITE_DIR/keys/tls-client.key "
        f"fedmeta node supernode --superlink {superlink} "
        "--root-certificates $SITE_DIR/ca.pem "
        f"--auth-supernode-private-key $SITE_DIR/keys/supernode-auth.key "
        f"--host 127.0.0.1 --port {runtime_port} --node-config '{node_config}'"
    )


# ---- coordinator kit -------------------------------------------------------------------
START_SUPERLINK = """#!/bin/sh
# Start the SuperLink of federation {{federation}} (written by `fedmeta provision`).
#   ./start-superlink.sh             TLS + SuperNode authentication, on 127.0.0.1:{{local_port}}
#                                    only; sites reach its Fleet API through start-proxy.sh
#   ./start-superlink.sh --insecure  no TLS, no authentication: tests on one machine only;
#                                    own state (state-insecure/), 127.0.0.1:{{port}}
#                                    unless INSECURE_BIND says otherwise
# State (registered nodes, runs) lives in $SUPERLINK_STATE (default: ./state).
set -eu
KIT="$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)"
. "$KIT/{{env_file}}"
# every run's server log is signed with the federation's one key (pinned at the sites)
export FEDMETA_SERVER_AUDIT_KEY="$KIT/keys/server-audit-signing.pem"
if [ "${1:-}" = "--insecure" ]; then
  STATE="${SUPERLINK_STATE:-$KIT/state-insecure}"
  mkdir -p "$STATE"
  export FLWR_HOME="${FLWR_HOME:-$STATE/flwr-home}"
  echo "WARNING: SuperLink WITHOUT TLS and WITHOUT SuperNode authentication" >&2
  export FEDMETA_TRANSPORT={{insecure}}
  exec flower-superlink --insecure --host "${INSECURE_BIND:-127.0.0.1}" --port {{port}} \\
    --database "$STATE/superlink.db" --disable-runtime-dependency-installation
fi
if [ -n "${1:-}" ]; then echo "usage: $0 [--insecure]" >&2; exit 2; fi
STATE="${SUPERLINK_STATE:-$KIT/state}"
mkdir -p "$STATE"
export FLWR_HOME="${FLWR_HOME:-$STATE/flwr-home}"
export FEDMETA_TRANSPORT={{secure}}
# the ServerApp maps nodes to sites from this registry (written by register-sites.sh)
export FEDMETA_NODE_REGISTRY="$STATE/node-ids.txt"
exec flower-superlink --ssl-ca-certfile "$KIT/ca.pem" \\
  --ssl-certfile "$KIT/superlink.pem" --ssl-keyfile "$KIT/superlink.key" \\
  --enable-supernode-auth --host 127.0.0.1 --port {{local_port}} \\
  --database "$STATE/superlink.db" --disable-runtime-dependency-installation
"""

START_PROXY = """#!/bin/sh
# The federation's front door (written by `fedmeta provision`): nginx on {{bind}}:{{port}},
# mutual TLS against ca.pem, only /v1/fleet/ forwarded to the SuperLink on
# 127.0.0.1:{{local_port}}. Configuration: nginx.conf; logs: $STATE/nginx/.
set -eu
KIT="$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)"
STATE="${SUPERLINK_STATE:-$KIT/state}"
mkdir -p "$STATE/nginx/tmp"
NGINX="${NGINX:-nginx}"
if ! command -v "$NGINX" >/dev/null 2>&1; then
  echo "error: nginx not found: install your distribution's package (Debian: apt-get" \\
    "install nginx-light)" >&2
  exit 2
fi
exec "$NGINX" -e stderr -p "$STATE/nginx/" -c "$KIT/nginx.conf" -g 'daemon off;'
"""

REGISTER_SITES = """#!/bin/sh
# Register the sites' SuperNode public keys with the running SuperLink and record
# "SITE_ID NODE_ID KEY_FINGERPRINT" in state/node-ids.txt (the ServerApp's registry).
#   ./register-sites.sh CONNECTION [SITE_ID ...]    (default: every site of the federation)
# A site already registered with its current key is left alone; a site whose key changed
# gets a new node id and its old node is unregistered. Exits non-zero on any failure.
set -eu
KIT="$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)"
. "$KIT/{{env_file}}"
exec fedmeta registry register "$KIT" "$@"
"""

UNREGISTER_SITE = """#!/bin/sh
# Unregister sites' nodes from the running SuperLink and drop them from state/node-ids.txt.
#   ./unregister-site.sh CONNECTION SITE_ID [SITE_ID ...]
set -eu
KIT="$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)"
. "$KIT/{{env_file}}"
exec fedmeta registry unregister "$KIT" "$@"
"""

KIT_PLACEHOLDER = "@KIT@"
CONNECTION_TOML = """# The `flwr` connection of federation {{federation}}, for the coordinator only:
# the address is the SuperLink's loopback port (the Control API is not exposed). Add it,
# with @KIT@ replaced by this kit's absolute path, from inside the kit:
#   sed "s|@KIT@|$PWD|" flwr-connection.toml >> "${FLWR_HOME:-$HOME/.flwr}/config.toml"
[superlink.{{federation}}]
address = {{address | toml}}
root-certificates = "@KIT@/ca.pem"
"""

COORDINATOR_README = """# Coordinator kit (federation {{federation}})

| file | what | secret |
|---|---|---|
| `ca.pem` | the federation CA certificate | no |
| `superlink.pem`, `.key` | TLS certificate and key (proxy, SuperLink) | key: **yes, 0600** |
| `site-keys/<site>.pub` | the sites' SuperNode public keys (from their requests) | no |
| `site-audit-keys/<site>.pub.pem` | the sites' audit-log public keys (to verify logs) | no |
| `federation.toml` | the federation file this kit was made from | no |
| `nginx.conf`, `start-proxy.sh` | the front door: Fleet API only, mutual TLS | no |
| `start-superlink.sh` | the SuperLink, TLS, on 127.0.0.1:{{local_port}} only | no |
| `flwr-connection.toml` | the `flwr` connection (loopback) for `$FLWR_HOME/config.toml` | no |
| `register-sites.sh`, `unregister-site.sh` | SuperLink nodes and `state/node-ids.txt` | no |
| `{{env_file}}` | Flower's telemetry and update checks off: `. ./{{env_file}}` before `flwr` | no |

Sites reach {{bind}}:{{port}} (nginx, HTTPS with a client certificate of the federation
CA, `/v1/fleet/` only). The SuperLink listens on 127.0.0.1:{{local_port}}: its Control
API (`flwr run`, `stop`, `log`, `supernode register`) and Runtime API are reachable from
this machine only. Certificate names: {{names}}.

The CA private key is not here: it stays in the `ca/` folder next to the kits,
offline, with whoever provisions the federation. No site's private key is anywhere
in the kits: sites create their own and send requests (public keys only).

The exact command `start-superlink.sh` runs:

```
{{command}}
```
"""


def start_superlink_command(local_port: int) -> str:
    return (
        "flower-superlink --ssl-ca-certfile $KIT/ca.pem --ssl-certfile $KIT/superlink.pem "
        "--ssl-keyfile $KIT/superlink.key --enable-supernode-auth "
        f"--host 127.0.0.1 --port {local_port} --database $STATE/superlink.db "
        "--disable-runtime-dependency-installation"
    )


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
    lines = [
        f"# Site manifest of {site_id} (federation {federation.name}), written by",
        "# `fedmeta provision`. Your DPO decides every value; replace each TODO.",
        "# Fields: policies/declarations.py (SiteManifest); example: policies/examples/site.toml.",
        "",
    ]
    data.pop("privacy", None)
    privacy = SitePrivacyPolicy().model_dump(mode="json")  # the cautious defaults, spelled out
    order = list(FIELD_NOTES) + [k for k in data if k not in FIELD_NOTES]
    for key in order:
        if key not in data:
            continue
        if key in FIELD_NOTES:
            lines.append(f"# {FIELD_NOTES[key]}")
        lines.append(f"{key} = {toml_value(data[key])}")
    lines += [
        "",
        "# The site's own privacy policy, enforced at this site every round whatever",
        "# the coordinator asks (docs/threat-model.md; fields: policies/site_policy.py).",
        "[privacy]",
    ]
    lines += [f"{key} = {toml_value(value)}" for key, value in privacy.items() if value is not None]
    return "\n".join(lines) + "\n"


# ---- service units and versions ------------------------------------------------------------
SYSTEMD_UNIT = """# systemd unit: {{what}} (written by `fedmeta provision`). Install it with the
# placeholders filled in, e.g.
#   sed -e "s|@DIR@|$PWD|" -e "s|@VENV@|/opt/fedmeta/venv|" -e "s|@USER@|fedmeta|" \\
#     systemd/{{name}} > /etc/systemd/system/{{name}}
#   systemctl daemon-reload && systemctl enable --now {{name}}
[Unit]
Description={{what}}
After=network-online.target{{after}}
Wants=network-online.target
# never give up restarting (the default gives up after 5 starts in 10 s)
StartLimitIntervalSec=0

[Service]
Type=simple
User=@USER@
WorkingDirectory=@DIR@
Environment=PATH=@VENV@/bin:/usr/local/bin:/usr/bin:/bin
ExecStart=@DIR@/{{script}}
Restart=on-failure
# Flower refuses a SuperNode that comes back within ~60 s of losing it (error 2004);
# a shorter back-off ends in a restart loop and then "failed"
RestartSec={{restart_sec}}
# stop the whole cgroup: Flower's SuperExec and every ClientApp/ServerApp child with it,
# so a stopped or killed node leaves no training process behind
KillMode=control-group
KillSignal=SIGTERM
TimeoutStopSec=30
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full

[Install]
WantedBy=multi-user.target
"""
RESTART_SEC = 75  # > Flower's ~60 s reactivation lockout


def systemd_unit(name: str, what: str, script: str, after: str = "") -> str:
    return render(
        SYSTEMD_UNIT,
        name=name,
        what=what,
        script=script,
        after=f" {after}" if after else "",
        restart_sec=RESTART_SEC,
    )


@lru_cache(maxsize=1)
def constraints_text() -> str:
    """``constraints.txt``: fedmeta and every distribution it needs, pinned to the versions
    installed where `fedmeta provision` runs (the coordinator's release). Read once per
    process (every kit gets the same; each look-up scans the installed distributions)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [("fedmeta", frozenset())]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = canonicalize_name(dist.metadata["Name"])
        if key in pins and not extras:
            continue
        pins[key] = dist.version.split("+", 1)[0]  # torch 2.13.0+cpu: the build is the site's
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    lines = [
        "# Exact versions of the coordinator's release (written by `fedmeta provision`).",
        "# Install a site with the same ones:  pip install -c constraints.txt fedmeta",
        "# (torch's build, CPU or CUDA, is the site's choice; its version is pinned).",
    ]
    return "\n".join(lines + [f"{k}=={v}" for k, v in sorted(pins.items())]) + "\n"
