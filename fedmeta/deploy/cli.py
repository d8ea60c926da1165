"""Command line: ``fedmeta provision``, ``fedmeta node
init|approve|approve-app|check|supernode|export-evidence``, ``fedmeta evidence import`` and
``fedmeta registry register|unregister`` (mounted by fedmeta/cli.py).

User errors end with one red line and exit code 2. ``node check`` exits 0 when
every check passes and 1 otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmeta.cli_common import fail as _fail

node_app = typer.Typer(
    help="Set up and check one institution's node (site directory).", no_args_is_help=True
)
evidence_app = typer.Typer(
    help="Coordinator: bring the sites' exported evidence of a run "
    "into its out-dir, for `fedmeta report`.",
    no_args_is_help=True,
)
registry_app = typer.Typer(
    help="Coordinator: register the sites' keys with the SuperLink and "
    "keep state/node-ids.txt in step (register-sites.sh calls it).",
    no_args_is_help=True,
)


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _show(*groups: tuple[str, list]) -> Console:
    """Print each item of each (label, items) group on its own line; return the console."""
    con = _console()
    for label, items in groups:
        for item in items:
            con.print(f"{label} {item}")
    return con


def _errors() -> tuple[type[BaseException], ...]:
    from fedmeta.audit import AuditError
    from fedmeta.deploy.federation import FederationError
    from fedmeta.deploy.kits import ProvisionError
    from fedmeta.deploy.node import NodeError
    from fedmeta.deploy.pki import PkiError
    from fedmeta.deploy.registry import RegistryError
    from fedmeta.deploy.request import RequestError

    return (
        FederationError,
        ProvisionError,
        NodeError,
        PkiError,
        AuditError,
        RequestError,
        RegistryError,
    )


def provision(
    federation: Annotated[
        Path,
        typer.Argument(help="federation TOML file (sites, SuperLink address, certificate names)"),
    ],
    out: Annotated[Path, typer.Option("--out", help="where the CA and the kits go")] = Path("kits"),
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="replace existing keys, the CA and manifests (every party needs its new kit)",
        ),
    ] = False,
    request: Annotated[
        list[Path] | None,
        typer.Option(
            "--request",
            help="a site's request file (from `fedmeta node init`): accept its "
            "public keys and issue its client certificate; repeat for several sites",
        ),
    ] = None,
) -> None:
    """Create the federation CA, the SuperLink certificate and the kits (keys kept unless --force).

    One kit per site and one for the coordinator; the CA key stays in OUT/ca/. Sites'
    private keys are never made here: each site sends a request file (public keys only).
    """
    from fedmeta.deploy.kits import provision as run

    try:
        report = run(federation, out, force=force, requests=tuple(request or ()))
    except (*_errors(), OSError) as exc:
        raise _fail(" ".join(str(exc).split())) from None
    con = _show(
        ("[green]created[/]", report.created),
        ("[dim]kept[/]   ", report.kept),
        ("[yellow]note:[/]", report.notes),
    )
    for name, digest in report.fingerprints.items():
        con.print(f"fingerprint {name}: {digest}")
    con.print(
        f"kits in {out}/: send sites/<id>/ to each site and coordinator/ to the "
        f"coordinator (no kit holds a site's private key); keep {out}/ca/ offline."
    )


@node_app.command("init")
def node_init(
    site_dir: Annotated[Path, typer.Argument(help="the site's state directory")],
    kit: Annotated[
        Path | None,
        typer.Option(
            "--kit", help="the site's kit from `fedmeta provision` (omit if unpacked in SITE_DIR)"
        ),
    ] = None,
    new_auth_key: Annotated[
        bool,
        typer.Option("--new-auth-key", help="rotate: retire the SuperNode key, create a new one"),
    ] = False,
    fingerprint: Annotated[
        str | None,
        typer.Option(
            "--fingerprint",
            help="the kit's fingerprint the provisioner read out to you: refuse "
            "a kit that differs from what was provisioned",
        ),
    ] = None,
    approve_release: Annotated[
        bool,
        typer.Option(
            "--approve-release/--no-approve-release",
            help="approve the app of the fedmeta "
            "release installed here (its release digest), as `fedmeta node approve-app "
            "--release` does",
        ),
    ] = True,
) -> None:
    """Lay out a site directory from its kit, create the site's keys here (0600), write the
    request file to send to the provisioner (public keys only).

    The privacy ledger and audit log are created by the first round.
    """
    from fedmeta.deploy.node import init_site

    try:
        report = init_site(site_dir, kit, new_auth_key=new_auth_key, fingerprint=fingerprint)
    except (*_errors(), OSError) as exc:
        raise _fail(" ".join(str(exc).split())) from None
    con = _show(
        ("[green]created[/]", report.created),
        ("[green]copied[/]", report.copied),
        ("[dim]kept[/]  ", report.kept),
        ("[yellow]note:[/]", report.notes),
    )
    if report.new_public_key:
        con.print(f"new public key: {report.new_public_key}")
    if report.request:
        con.print(
            f"request file: {report.request} (sha256 {report.request_sha256}): send it "
            "to the provisioner and read them the sha256 over another channel"
        )
    if approve_release:
        _approve_installed_release(con, site_dir)
    con.print(
        f"site directory ready: {report.site_dir}. Fill in manifest.toml, then run "
        f"`fedmeta node check {site_dir}`."
    )


@node_app.command("approve")
def node_approve(
    site_dir: Annotated[Path, typer.Argument(help="the site's state directory")],
    declaration: Annotated[
        Path, typer.Argument(help="the run declaration (TOML) the site's DPO accepted")
    ],
) -> None:
    """Approve a run declaration: the site trains only for rounds that carry one it approved.

    Records the declaration's SHA-256 in SITE_DIR/approved-declarations.jsonl.
    """
    from fedmeta.approvals import ApprovalError, approve_file
    from policies import DeclarationError

    if not site_dir.is_dir():
        raise _fail(f"{site_dir}: not a directory (run `fedmeta node init` first)")
    try:
        digest = approve_file(site_dir, declaration)
    except (DeclarationError, ApprovalError, OSError) as exc:
        raise _fail(" ".join(str(exc).split())) from None
    _console().print(f"approved {declaration} (sha256 {digest}) for {site_dir}")


def _approve_installed_release(con: Console, site_dir: Path) -> None:
    """node init: approve the installed release's app, or say why not (no failure)."""
    from fedmeta.deploy.appcheck import (
        AppApprovalError,
        approve,
        build_release_fab,
        release_digest,
    )
    from fedmeta.deploy.apphash import app_root

    try:
        digest = release_digest(build_release_fab(app_root()))
        new = approve(site_dir, "release_sha256", digest, "node init: installed release")
    except AppApprovalError as exc:
        con.print(f"[yellow]note:[/] installed release not approved: {exc}", markup=True)
        return
    con.print(
        f"{'approved' if new else 'kept approval of'} the installed fedmeta release's "
        f"app (release digest {digest})"
    )


@node_app.command("approve-app")
def node_approve_app(
    site_dir: Annotated[Path, typer.Argument(help="the site's state directory")],
    fab_hash: Annotated[
        str | None,
        typer.Option(
            "--fab-hash", help="the app's SHA-256 (64 hex digits) the coordinator read out"
        ),
    ] = None,
    fab: Annotated[
        Path | None,
        typer.Option("--fab", help="the app bundle (.fab from `flwr build`) the coordinator sent"),
    ] = None,
    release: Annotated[
        bool,
        typer.Option("--release", help="the fedmeta release installed here (or in --release-dir)"),
    ] = False,
    release_dir: Annotated[
        Path | None,
        typer.Option("--release-dir", help="an unpacked fedmeta release (source tree) to approve"),
    ] = None,
) -> None:
    """Approve an app: the site's ClientApp runs only apps whose FAB hash, or whose release
    digest (what of the app runs at a site), the site approved; any other is refused before
    it is installed, on record. Records SITE_DIR/approved-apps.jsonl and logs `app.approve`."""
    from fedmeta.deploy.appcheck import (
        AppApprovalError,
        approve,
        build_release_fab,
        fab_sha256,
        normalize_hash,
        release_digest,
    )
    from fedmeta.deploy.apphash import app_root

    chosen = [x for x in (fab_hash, fab, release or release_dir) if x]
    if len(chosen) != 1:
        raise _fail("give exactly one of --fab-hash HEX, --fab FILE, --release [--release-dir DIR]")
    if not site_dir.is_dir():
        raise _fail(f"{site_dir}: not a directory (run `fedmeta node init` first)")
    try:
        if fab_hash is not None:
            kind, digest, source = "fab_sha256", normalize_hash(fab_hash), "--fab-hash"
        elif fab is not None:
            data = fab.read_bytes()
            release_digest(data)  # refuse a file that is no app bundle
            kind, digest, source = "fab_sha256", fab_sha256(data), f"--fab {fab.name}"
        else:
            root = release_dir or app_root()
            kind, source = "release_sha256", f"release {root.name}"
            digest = release_digest(build_release_fab(root))
        _log_approval(site_dir, kind, digest, source)  # signed first: no silent approval
        new = approve(site_dir, kind, digest, source)
    except (AppApprovalError, OSError, *_errors()) as exc:
        raise _fail(" ".join(str(exc).split())) from None
    what = "FAB sha256" if kind == "fab_sha256" else "release digest"
    _console().print(
        f"{'approved' if new else 'already approved'}: {what} {digest} for {site_dir}", markup=False
    )


def _log_approval(site_dir: Path, kind: str, digest: str, source: str) -> None:
    """`app.approve` in the site's signed audit log, when the site has its audit key."""
    from fedmeta.audit import AuditLog
    from fedmeta.deploy.appcheck import RULE
    from fedmeta.paths import SITE_AUDIT_KEY as AUDIT_KEY
    from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG

    if not (site_dir / AUDIT_KEY).exists():
        return
    node = {}
    try:
        from fedmeta.deploy.node import read_node_toml

        node = read_node_toml(site_dir)
    except (*_errors(), OSError):
        pass
    actor = str(node.get("site_id") or site_dir.name)
    with AuditLog.open(site_dir / AUDIT_LOG, site_dir / AUDIT_KEY, actor=actor) as log:
        log.append(
            "app.approve",
            run_id="-",
            decision="allow",
            rule_ids=[RULE],
            details={kind: digest, "source": source[:200]},
        )


@node_app.command("check")
def node_check(
    site_dir: Annotated[Path, typer.Argument(help="the site's state directory")],
    superlink: Annotated[
        str | None, typer.Option("--superlink", help="HOST:PORT (default: node.toml's)")
    ] = None,
    root_cert: Annotated[
        Path | None, typer.Option("--root-cert", help="CA certificate (default: SITE_DIR/ca.pem)")
    ] = None,
    no_connect: Annotated[
        bool, typer.Option("--no-connect", help="skip the SuperLink reachability check")
    ] = False,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="only test TCP reachability, no TLS (insecure deployments)"
        ),
    ] = False,
) -> None:
    """Check a site directory: manifest, keys, ledger, audit log, TLS to the SuperLink.

    Exit 0 when every check passes, 1 otherwise.
    """
    from fedmeta.deploy.node import check_site

    if not site_dir.is_dir():
        raise _fail(f"{site_dir}: not a directory")
    checks = check_site(
        site_dir,
        superlink=superlink,
        root_cert=root_cert,
        connect=not no_connect,
        insecure=insecure,
    )
    table = Table(title=f"node check: {site_dir}", show_lines=False)
    table.add_column("", width=4)
    table.add_column("check")
    table.add_column("result", overflow="fold")
    for c in checks:
        mark = "[red]FAIL[/]" if not c.ok else ("[yellow]WARN[/]" if c.warning else "[green]ok[/]")
        table.add_row(mark, c.name, c.detail, style=None)
    con = _console()
    con.print(table)
    bad = [c.name for c in checks if not c.ok]
    if bad:
        con.print(f"[bold red]{len(bad)} check(s) failed:[/] {', '.join(bad)}")
        raise typer.Exit(1)
    con.print("[bold green]all checks passed[/]")


@node_app.command(
    "supernode",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
)
def node_supernode(ctx: typer.Context) -> None:
    """Run flower-supernode (same arguments) presenting the site's TLS client certificate
    (FEDMETA_TLS_CLIENT_CERT / FEDMETA_TLS_CLIENT_KEY); start-node.sh calls it."""
    from fedmeta.deploy.supernode import main

    raise typer.Exit(main(list(ctx.args)))


def _registry_run(fn, kit: Path, connection: str, sites: list[str]) -> None:
    try:
        lines = fn(kit, connection, sites)
    except (*_errors(), OSError) as exc:
        raise _fail(" ".join(str(exc).split()), code=1) from None
    con = _console()
    for line in lines:
        con.print(line, markup=False)


@registry_app.command("register")
def registry_register(
    kit: Annotated[Path, typer.Argument(help="the coordinator kit")],
    connection: Annotated[str, typer.Argument(help="the `flwr` connection (federation name)")],
    sites: Annotated[list[str] | None, typer.Argument(help="site ids (default: all)")] = None,
) -> None:
    """Register the sites' current SuperNode keys; record SITE NODE_ID FINGERPRINT in
    state/node-ids.txt. A rotated key's old node is unregistered. Exit 1 on any failure."""
    from fedmeta.deploy.registry import register_sites

    _registry_run(register_sites, kit, connection, list(sites or []))


@registry_app.command("unregister")
def registry_unregister(
    kit: Annotated[Path, typer.Argument(help="the coordinator kit")],
    connection: Annotated[str, typer.Argument(help="the `flwr` connection (federation name)")],
    sites: Annotated[list[str], typer.Argument(help="site ids")],
) -> None:
    """Unregister the sites' nodes and drop them from state/node-ids.txt. Exit 1 on failure."""
    from fedmeta.deploy.registry import unregister_sites

    _registry_run(unregister_sites, kit, connection, list(sites))


@node_app.command("export-evidence")
def node_export_evidence(
    site_dir: Annotated[Path, typer.Argument(help="the site's state directory")],
    run: Annotated[
        str,
        typer.Option(
            "--run",
            help="the run's id (the server's run.start; the directory under SITE_DIR/runs/)",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="file to write (default SITE_DIR/exports/evidence-<site>-<run>.json)"
        ),
    ] = None,
) -> None:
    """Export the site's signed evidence of one run (audit log up to the run's end, ledger
    lines, manifest and its hash) for the coordinator's report. Prints the file's SHA-256."""
    from fedmeta.deploy.evidence import EvidenceError, export_evidence

    try:
        path, digest = export_evidence(site_dir, run, out)
    except (EvidenceError, OSError) as exc:
        raise _fail(" ".join(str(exc).split())) from None
    _console().print(
        f"wrote {path} (sha256 {digest}): send it to the coordinator and read "
        "them the sha256 over another channel",
        markup=False,
    )


@evidence_app.command("import")
def evidence_import(
    out_dir: Annotated[Path, typer.Argument(help="the run's out-dir on the coordinator")],
    files: Annotated[list[Path], typer.Argument(help="evidence files the sites exported")],
    keys: Annotated[
        Path | None,
        typer.Option(
            "--keys",
            help="the audit keys the sites registered: the coordinator kit's "
            "site-audit-keys/ (a file's key must be its site's)",
        ),
    ] = None,
) -> None:
    """Check each site's evidence file (run, registered key, signed log, ledger) and lay it out
    as OUT_DIR/sites/<site>/. Exit 2 on the first file refused."""
    from fedmeta.deploy.evidence import EvidenceError, import_evidence

    con = _console()
    if keys is None:
        con.print(
            "[yellow]note:[/] no --keys: each file's key is only checked when the report "
            "is given --trust"
        )
    for f in files:
        try:
            got = import_evidence(out_dir, f, keys)
        except (EvidenceError, OSError) as exc:
            raise _fail(" ".join(str(exc).split())) from None
        con.print(
            f"imported {got.site}: {got.entries} verified log entries, rounds trained "
            f"{got.rounds_trained or 'none'}, key {got.key_fingerprint} -> {got.path}",
            markup=False,
        )


def run_command(
    app_dir: Annotated[Path, typer.Argument(help="the fedmeta app (a checkout of the release)")],
    federation: Annotated[str, typer.Argument(help="the `flwr` connection (federation name)")],
    run_config: Annotated[
        str | None,
        typer.Option("--run-config", help="the run's settings (a TOML file, as for flwr run)"),
    ] = None,
) -> None:
    """Coordinator: `flwr run APP FEDERATION --stream` (update check and telemetry off) with
    per-round progress, ending non-zero when the run was refused, stopped or failed."""
    from fedmeta.deploy.runner import main

    raise typer.Exit(main(app_dir, federation, run_config))
