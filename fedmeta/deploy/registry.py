"""The coordinator's registry of nodes: which node id belongs to which site, and which key.

``state/node-ids.txt`` in the coordinator kit, one line per site::

    SITE_ID NODE_ID SHA256:KEY_FINGERPRINT

Written only by ``register-sites.sh`` / ``unregister-site.sh`` (``fedmeta registry
register|unregister``), which call ``flwr supernode register|unregister`` on the
coordinator's loopback connection and update the file in the same step, atomically.
A site is registered once per key: running it again is a no-op; a changed key (after a
rotation) gets a new node id and the old node is unregistered. Any failure exits
non-zero and never writes an empty or partial line. The ServerApp maps each node to
its site from this file (:mod:`fedmeta.deploy.binding`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedmeta.deploy import pki
from fedmeta.paths import FEDERATION_FILE, SITE_NODE_KEYS_DIR
from fedmeta.paths import NODE_REGISTRY as REGISTRY


class RegistryError(RuntimeError):
    """The registry or a registration failed; one line."""


@dataclass(frozen=True)
class Entry:
    site_id: str
    node_id: int
    fingerprint: str


def read_registry(path: Path) -> dict[str, Entry]:
    """site id -> entry; a malformed line raises RegistryError naming file and line."""
    path = Path(path)
    entries: dict[str, Entry] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].startswith("SHA256:"):
            raise RegistryError(
                f"{path}:{no}: expected 'SITE_ID NODE_ID SHA256:FINGERPRINT', "
                f"got {line.strip()!r}: fix or remove the line"
            )
        if parts[0] in entries:
            raise RegistryError(f"{path}:{no}: site {parts[0]} appears twice")
        entries[parts[0]] = Entry(parts[0], int(parts[1]), parts[2])
    return entries


def write_registry(path: Path, entries: dict[str, Entry]) -> None:
    lines = ["# site node-id key-fingerprint (written by register-sites.sh; do not edit)"]
    lines += [
        f"{e.site_id} {e.node_id} {e.fingerprint}"
        for e in sorted(entries.values(), key=lambda e: e.site_id)
    ]
    pki.write_public(Path(path), ("\n".join(lines) + "\n").encode())


def _flwr(args: list[str]) -> subprocess.CompletedProcess:
    from fedmeta.offline import OFFLINE_ENV

    try:
        return subprocess.run(
            ["flwr", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **OFFLINE_ENV},
        )
    except FileNotFoundError:
        raise RegistryError(
            "flwr not found: activate the environment fedmeta is installed in"
        ) from None
    except subprocess.TimeoutExpired:
        raise RegistryError(
            f"flwr {' '.join(args[:2])}: no answer within 120 s: is the SuperLink running?"
        ) from None


def _json(out: str) -> dict:
    try:
        return json.loads(out[out.index("{") :])
    except ValueError:
        return {}


def _why(res: subprocess.CompletedProcess) -> str:
    data = _json(res.stdout)
    text = str(data.get("error-message") or data.get("error") or "") or (
        res.stderr.strip() or res.stdout.strip()
    )
    return " ".join(text.split())[-300:] or f"exit code {res.returncode}"


def flwr_register(key: Path, connection: str, site_id: str) -> int:
    res = _flwr(
        ["supernode", "register", str(key), connection, "--name", site_id, "--format", "json"]
    )
    data = _json(res.stdout)
    node = str(data.get("node-id", ""))
    if res.returncode != 0 or not data.get("success", True) or not re.fullmatch(r"\d+", node):
        raise RegistryError(f"site {site_id}: `flwr supernode register` failed: {_why(res)}")
    return int(node)


def flwr_unregister(node_id: int, connection: str) -> None:
    res = _flwr(["supernode", "unregister", str(node_id), connection, "--format", "json"])
    data = _json(res.stdout)
    if res.returncode != 0 or data.get("success") is False:
        raise RegistryError(f"node {node_id}: `flwr supernode unregister` failed: {_why(res)}")


def register_sites(kit: Path, connection: str, sites: list[str]) -> list[str]:
    """Register each site's current key (coordinator kit's ``site-keys/``); returns lines
    to print. Raises RegistryError after the first failure (earlier ones stay recorded)."""
    from fedmeta.deploy.federation import load_federation

    kit = Path(kit)
    fed = load_federation(kit / FEDERATION_FILE)
    sites = sites or [s.id for s in fed.sites]
    known = {s.id for s in fed.sites}
    path = kit / REGISTRY
    entries = read_registry(path)
    done: list[str] = []
    for site in sites:
        if site not in known:
            raise RegistryError(f"site {site}: not in {kit / 'federation.toml'}")
        key_path = kit / SITE_NODE_KEYS_DIR / f"{site}.pub"
        if not key_path.exists():
            raise RegistryError(
                f"site {site}: no key at {key_path}: provision with the site's "
                "request (fedmeta provision ... --request FILE)"
            )
        fingerprint = pki.node_fingerprint(pki.load_node_public(key_path))
        old = entries.get(site)
        if old is not None and old.fingerprint == fingerprint:
            done.append(f"{site}: already registered as node {old.node_id}")
            continue
        node = flwr_register(key_path, connection, site)
        entries[site] = Entry(site, node, fingerprint)
        write_registry(path, entries)
        done.append(f"registered {site} as node {node}")
        if old is not None:
            flwr_unregister(old.node_id, connection)
            done.append(f"unregistered {site}'s former node {old.node_id} (key rotated)")
    return done


def unregister_sites(kit: Path, connection: str, sites: list[str]) -> list[str]:
    """Unregister each site's node and drop its line; unknown sites are an error."""
    kit = Path(kit)
    path = kit / REGISTRY
    entries = read_registry(path)
    done: list[str] = []
    if not sites:
        raise RegistryError("name the site(s) to unregister")
    for site in sites:
        entry = entries.get(site)
        if entry is None:
            raise RegistryError(f"site {site}: not in {path} (nothing to unregister)")
        flwr_unregister(entry.node_id, connection)
        del entries[site]
        write_registry(path, entries)
        done.append(f"unregistered {site} (node {entry.node_id})")
    return done
