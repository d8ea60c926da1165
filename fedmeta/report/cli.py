"""``fedmeta report RUN_DIR``: the command, mounted by ``fedmeta/cli.py``.

Exit codes: 0 written; 1 an audit log failed verification (or the evidence
disagrees) and ``--allow-unverified`` was not given; 2 a user error (run
directory, option). Errors are one red line, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedmeta.cli_common import choice, choices_help
from fedmeta.cli_common import fail as _fail
from fedmeta.report.render import FORMATS


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def report_command(
    run_dir: Annotated[
        Path | None,
        typer.Argument(help="a run directory (fedmeta simulate --out; a deployment's out-dir)"),
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(
            help="a site-level report: only this site's data and what the federation shared with it"
        ),
    ] = None,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help=choices_help("report format", FORMATS),
            callback=choice("--format", "format", lambda: FORMATS),
        ),
    ] = "html",
    out: Annotated[
        Path | None, typer.Option(help="output file (default RUN_DIR/report[-SITE].html|json|md)")
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(help="a baseline run directory (e.g. FedAvg) to plot beside this run"),
    ] = None,
    trust: Annotated[
        list[str] | None,
        typer.Option(
            "--trust",
            help="the parties' public keys from outside the run directory "
            "(repeatable): a directory of <party>.pub.pem (the coordinator "
            "kit's site-audit-keys/), a key file, a trust file of "
            "'PARTY = KEY-OR-SHA256-FINGERPRINT' lines, or PARTY=VALUE",
        ),
    ] = None,
    epsilon_warn: Annotated[
        float,
        typer.Option(
            "--epsilon-warn",
            min=0.0,
            help="warn where a site's epsilon this run is above this (default 4)",
        ),
    ] = 4.0,
    allow_unverified: Annotated[
        bool,
        typer.Option(
            "--allow-unverified",
            help="write the report even if an audit log fails verification (with a red banner)",
        ),
    ] = False,
    site_dir: Annotated[
        Path | None,
        typer.Option(
            "--site-dir", help="a deployed site's own report, from its site directory (with --run)"
        ),
    ] = None,
    run: Annotated[str | None, typer.Option("--run", help="the run (with --site-dir)")] = None,
) -> None:
    """Compliance report for a data protection officer: Art. 30 record, DPIA summary,
    privacy per site, policy decisions, DPDP, learning results and audit verification."""
    from fedmeta.report import ReportError, UnverifiedRunError, generate

    if (site_dir is None) != (run is None) or (site_dir is None) == (run_dir is None):
        raise _fail("give RUN_DIR, or --site-dir SITE_DIR with --run RUN_ID", 2)
    try:
        if site_dir is not None:
            from fedmeta.deploy.evidence import EvidenceError, site_report

            try:
                path, report = site_report(site_dir, str(run), format_, out, allow_unverified)
            except EvidenceError as exc:
                raise ReportError(str(exc)) from None
        else:
            path, report = generate(
                run_dir,
                format_,
                out=out,
                site=site,
                allow_unverified=allow_unverified,
                baseline=baseline,
                trust=tuple(trust or ()),
                epsilon_warn=epsilon_warn,
            )
    except ReportError as exc:
        raise _fail(str(exc), 2) from None
    except UnverifiedRunError as exc:
        raise _fail(str(exc), 1) from None
    except OSError as exc:
        raise _fail(f"cannot write the report: {exc}", 2) from None
    if not report.checks_passed:
        _err().print(f"warning: {report.unverified_warning}", style="bold red", markup=False)
    elif not report.keys_trusted:
        _err().print(f"note: {report.evidence_basis}", style="yellow", markup=False)
    Console(highlight=False, soft_wrap=True).print(f"wrote {path}", markup=False)
