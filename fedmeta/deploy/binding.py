"""Identities bound, not claimed: the ServerApp maps a node to its site from the registry.

In a deployment, ``start-superlink.sh`` exports ``FEDMETA_NODE_REGISTRY`` (the coordinator
kit's ``state/node-ids.txt``, written when the coordinator registered each site's key),
and :func:`bind_site` answers which site a node id belongs to. The site id a node
*reports* is only checked against it: a node that is not in the registry, or that
reports another site's id, is refused (the caller audits the refusal). Without the
variable (a simulation, or the insecure mode's self-registered nodes) the reported id is
used.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedmeta.deploy.registry import RegistryError, read_registry
from fedmeta.paths import NODE_REGISTRY_ENV as REGISTRY_ENV


def bind_site(node_id: int, reported: str) -> tuple[str | None, str]:
    """(site id, '') for a node the registry knows and that reports that site's id;
    (None, reason) for a node to refuse. Without a registry: (reported, '')."""
    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return reported, ""
    try:
        by_node = {e.node_id: e.site_id for e in read_registry(Path(path)).values()}
    except (RegistryError, OSError) as exc:
        return None, f"node registry unreadable ({exc})"[:300]
    site = by_node.get(int(node_id))
    if site is None:
        return None, (
            f"node {node_id} is not registered for any site in the coordinator's "
            f"registry (it reported {reported!r})"
        )[:300]
    if reported != site:
        return None, (f"node {node_id} is registered for {site!r} but reported {reported!r}")[:300]
    return site, ""
