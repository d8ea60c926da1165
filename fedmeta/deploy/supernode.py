"""``fedmeta node supernode``: Flower's ``flower-supernode`` presenting the site's TLS client
certificate to the coordinator's proxy (mutual TLS).

Flower 1.42's SuperNode reaches the Fleet API with ``httpx`` and builds its TLS context
from ``--root-certificates`` only: it has no option for a client certificate. The
coordinator's nginx front requires one (``ssl_verify_client on``), so a stock
``flower-supernode`` cannot reach the Fleet API through it. This launcher runs the
unmodified ``flower-supernode`` entry point in this process after giving
``FleetHttpClient.from_server_address`` (the one place the SuperNode's Fleet client is
built) a TLS context that also holds the client certificate and key named by
``FEDMETA_TLS_CLIENT_CERT`` / ``FEDMETA_TLS_CLIENT_KEY``. Nothing else of Flower changes;
the node still authenticates with its SuperNode key, verifies the server against
``--root-certificates`` and keeps every other flag. If the installed Flower no longer
has that hook, the launcher refuses to start (one line) instead of connecting without
the certificate. Its SuperExec and ClientApp processes are started through
:mod:`fedmeta.deploy.lifeline`, so that they die with the node, and every ClientApp
process checks the run's app against the site's approvals before installing it
(:mod:`fedmeta.deploy.appcheck`); ``--isolation process``, where a ClientApp process
started elsewhere would run the app, is refused. ``FEDMETA_HEARTBEAT_INTERVAL_S`` (10 to
1800 s) sets the heartbeat interval the node declares, hence how soon the SuperLink notices
that it is gone (after two missed heartbeats; Flower's default interval is 30 s).
"""

from __future__ import annotations

import inspect
import os
import ssl
import sys
from pathlib import Path

from fedmeta.paths import HEARTBEAT_ENV
from fedmeta.paths import TLS_CLIENT_CERT_ENV as CERT_ENV
from fedmeta.paths import TLS_CLIENT_KEY_ENV as KEY_ENV

# seconds between the node's heartbeats as it declares them to the SuperLink (HEARTBEAT_ENV),
# which marks the node offline (its pending messages answered "Node Unavailable") after two
# missed ones; Flower's default is 30 s, so a killed node is noticed after 40-60 s
HEARTBEAT_RANGE = (10.0, 1800.0)  # what Flower's SuperLink accepts
_HEARTBEAT_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")
_HOOK_PARAMS = ["server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"]


class LauncherError(RuntimeError):
    """The SuperNode cannot be started with a client certificate; one line."""


def client_context(root_certificates: bytes | str | None, cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ client context verifying the server against ``root_certificates``
    (PEM bytes or a file; None: the system store) and presenting ``cert``/``key``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if isinstance(root_certificates, bytes):
        ctx.load_verify_locations(cadata=root_certificates.decode("ascii"))
    elif isinstance(root_certificates, str):
        ctx.load_verify_locations(cafile=root_certificates)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise LauncherError(
            f"{cert} / {key}: cannot load the TLS client certificate and key "
            f"({exc}); run `fedmeta node init` with the kit that holds "
            "client.pem"
        ) from None
    return ctx


def install_client_certificate(cert: Path, key: Path) -> None:
    """Make every Fleet API client of this process present ``cert``/``key``."""
    from flwr.supernode.fleet_http_client import FleetHttpClient

    original = FleetHttpClient.from_server_address
    params = list(inspect.signature(original).parameters)
    if params != _HOOK_PARAMS:  # a Flower release that builds its client differently
        raise LauncherError(
            "the installed Flower's FleetHttpClient.from_server_address takes "
            f"({', '.join(params)}), not ({', '.join(_HOOK_PARAMS)}): this fedmeta release "
            "cannot add the TLS client certificate; install the Flower version of the "
            "coordinator's constraints file"
        )

    def from_server_address(
        cls, server_address, insecure, root_certificates, interceptors, *, retry_invoker=None
    ):
        if insecure:
            return original.__func__(
                cls,
                server_address,
                insecure,
                root_certificates,
                interceptors,
                retry_invoker=retry_invoker,
            )
        return cls(
            f"https://{server_address}",
            interceptors=interceptors,
            verify=client_context(root_certificates, cert, key),
            retry_invoker=retry_invoker,
        )

    FleetHttpClient.from_server_address = classmethod(from_server_address)


def set_heartbeat_interval(value: str | None) -> None:
    """Declare ``value`` seconds as this node's heartbeat interval (None: Flower's default).

    Flower reads ``HEARTBEAT_DEFAULT_INTERVAL`` from its modules' globals when the node
    connects and at every heartbeat; both modules that use it get ``value``."""
    if value is None or not value.strip():
        return
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    low, high = HEARTBEAT_RANGE
    if not low <= seconds <= high:
        raise LauncherError(
            f"{HEARTBEAT_ENV}={value!r}: give seconds between {low:g} and "
            f"{high:g} (the SuperLink refuses other intervals), or unset it"
        )
    import importlib

    modules = [importlib.import_module(name) for name in _HEARTBEAT_MODULES]
    missing = [m.__name__ for m in modules if not hasattr(m, "HEARTBEAT_DEFAULT_INTERVAL")]
    if missing:
        raise LauncherError(
            f"{HEARTBEAT_ENV} is set but the installed Flower's "
            f"{', '.join(missing)} no longer reads HEARTBEAT_DEFAULT_INTERVAL: "
            "unset it, or install the Flower version of the coordinator's "
            "constraints file"
        )
    for module in modules:
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def isolation(args: list[str]) -> str | None:
    """The value of ``--isolation`` in ``args`` (the last one wins, as in argparse)."""
    found = None
    for i, arg in enumerate(args):
        if arg == "--isolation":
            found = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith("--isolation="):
            found = arg.split("=", 1)[1]
    return found


def main(argv: list[str] | None = None) -> int:
    """Run ``flower-supernode`` with ``argv``, presenting the client certificate."""
    args = list(sys.argv[1:] if argv is None else argv)
    if isolation(args) not in (None, "subprocess"):
        print(
            "error: --isolation process would let a ClientApp process started elsewhere "
            "run the app unchecked: fedmeta node supernode starts every ClientApp itself "
            "(subprocess isolation) and checks its app against the site's approvals "
            "(fedmeta node approve-app)",
            file=sys.stderr,
        )
        return 2
    try:
        set_heartbeat_interval(os.environ.get(HEARTBEAT_ENV))
    except LauncherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if "--insecure" not in args:
        if not cert or not key:
            print(
                f"error: set {CERT_ENV} and {KEY_ENV} (start-node.sh does) to the site's "
                "client.pem and keys/tls-client.key",
                file=sys.stderr,
            )
            return 2
        try:
            from fedmeta.deploy.pki import read_private

            read_private(Path(key))  # refuses a key others can read
            install_client_certificate(Path(cert), Path(key))
        except (LauncherError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from flwr.supernode.cli import flower_supernode

    from fedmeta.deploy.lifeline import install_in_supernode

    try:  # its SuperExec and every ClientApp die with it (fedmeta.deploy.lifeline)
        install_in_supernode()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.argv = ["flower-supernode", *args]
    result = flower_supernode()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
