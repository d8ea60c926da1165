"""The coordinator's front door: an nginx configuration that exposes only the Fleet API.

Flower 1.42's SuperLink serves its Fleet (``/v1/fleet/``), Control (``/v1/control/``) and
Runtime (``/v1/runtime/``) APIs on one port, and the Control API has no authentication.
So the SuperLink binds to 127.0.0.1 and nginx, from the distribution, listens for the
sites: mutual TLS against the federation CA, ``/v1/fleet/`` forwarded, everything else
answered 404. The configuration is rendered from ``nginx.conf.j2`` next to this module.
"""

from __future__ import annotations

from pathlib import Path

from fedmeta.deploy.federation import LOOPBACK_NAME, Federation
from fedmeta.deploy.templates import render

TEMPLATE = Path(__file__).with_name("nginx.conf.j2")
MAX_BODY = "1024m"


def nginx_conf(fed: Federation) -> str:
    """nginx.conf for the coordinator kit (paths relative to the kit; see the template)."""
    sl = fed.superlink
    listen = f"[{sl.bind}]:{sl.port}" if ":" in sl.bind else f"{sl.bind}:{sl.port}"
    return render(
        TEMPLATE.read_text(encoding="utf-8"),
        federation=fed.name,
        listen=listen,
        upstream=sl.local_address,
        upstream_name=LOOPBACK_NAME,
        cert="superlink.pem",
        key="superlink.key",
        ca="ca.pem",
        max_body=MAX_BODY,
    )
