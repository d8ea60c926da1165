"""``fedmeta incident scan|list|show|decide RUN_DIR``: mounted by ``fedmeta/cli.py``.

Errors are one red line with exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmeta.cli_common import fail as _fail
from fedmeta.incidents.clocks import clocks
from fedmeta.incidents.model import KIND_TEXT, Decision
from fedmeta.incidents.store import IncidentError, IncidentStore, now
from fedmeta.paths import RunPaths

incident_app = typer.Typer(
    help="Incidents opened from the run's signals, with the GDPR "
    "Art. 33/34 and DPDP r.7 clocks and the notify decision.",
    no_args_is_help=True,
)
RunDir = Annotated[Path, typer.Argument(help="a run directory")]
IncidentId = Annotated[str, typer.Argument(help="an incident id (see `fedmeta incident list`)")]


def _store(run_dir: Path) -> IncidentStore:
    if not RunPaths(run_dir).metrics.is_file() and not RunPaths(run_dir).server_log.parent.is_dir():
        raise _fail(f"{run_dir}: not a run directory (fedmeta simulate --out)")
    return IncidentStore(run_dir)


@incident_app.command("scan")
def scan_command(run_dir: RunDir) -> None:
    """Open an incident for every signal in the run not seen before (audited)."""
    from fedmeta.incidents.detect import signals
    from fedmeta.report.collect import ReportError

    store = _store(run_dir)
    try:
        new = store.open_new(signals(run_dir, now()))
    except (ReportError, IncidentError) as exc:
        raise _fail(str(exc)) from None
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{len(new)} new incident(s); {len(store.load())} in {store.path}", markup=False)
    for i in new:
        console.print(f"  {i.id} {i.kind}: {i.summary}", markup=False)


@incident_app.command("list")
def list_command(run_dir: RunDir) -> None:
    """Every incident of the run with its status and the nearest deadline."""
    try:
        incidents = _store(run_dir).load()
    except IncidentError as exc:
        raise _fail(str(exc)) from None
    at = now()
    t = Table(title=f"Incidents of {run_dir}")
    for col in ("id", "kind", "site", "aware at (UTC)", "GDPR Art. 33 (72 h)", "status"):
        t.add_column(col)
    for i in incidents:
        art33 = clocks(i, at)[0]
        t.add_row(
            i.id,
            i.kind,
            i.site_id or "-",
            i.aware_at.isoformat(timespec="minutes"),
            art33.state(at, i.decision is not None),
            i.status,
        )
    Console(highlight=False).print(t)
    if not incidents:
        Console(highlight=False).print("no incident (run `fedmeta incident scan` first)")


@incident_app.command("show")
def show_command(run_dir: RunDir, incident_id: IncidentId) -> None:
    """One incident: what was seen, the clocks side by side, the decision."""
    try:
        i = _store(run_dir).get(incident_id)
    except IncidentError as exc:
        raise _fail(str(exc)) from None
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"{i.id} ({i.kind}): {KIND_TEXT[i.kind]}", markup=False)
    console.print(
        f"what: {i.summary}\nwhere: {i.source}\nsite: {i.site_id or '-'}\n"
        f"occurred: {i.occurred_at.isoformat() if i.occurred_at else 'not recorded'}"
        f"\naware: {i.aware_at.isoformat()}\nstatus: {i.status}",
        markup=False,
    )
    at = now()
    console.print("legal clocks (from aware):", markup=False)
    for c in clocks(i, at):
        deadline = c.deadline.isoformat(timespec="minutes") if c.deadline else "without delay"
        console.print(
            f"  {c.reference}: {c.duty}; deadline {deadline}; "
            f"{c.state(at, i.decision is not None)}; {c.in_force}",
            markup=False,
        )
    if i.decision is not None:
        console.print(
            f"reasons (Art. 33(5)): {i.decision.reasons} ({i.decision.decided_by}, "
            f"{i.decision.decided_at.isoformat()})",
            markup=False,
        )


@incident_app.command("decide")
def decide_command(
    run_dir: RunDir,
    incident_id: IncidentId,
    notify: Annotated[
        bool,
        typer.Option(
            "--notify/--no-notify", help="notify the supervisory authority (GDPR Art. 33(1))"
        ),
    ],
    reasons: Annotated[str, typer.Option(help="why (recorded under Art. 33(5))")],
    by: Annotated[str, typer.Option(help="who decides (e.g. the controller's DPO)")],
    subjects: Annotated[
        bool, typer.Option("--subjects/--no-subjects", help="tell the data subjects (Art. 34)")
    ] = False,
    dpdp_board: Annotated[
        bool,
        typer.Option("--dpdp-board/--no-dpdp-board", help="intimate the DPDP Board (Rules r.7)"),
    ] = False,
) -> None:
    """Record the notify / do-not-notify decision with its reasons (audited; final)."""
    try:
        d = Decision(
            notify_authority=notify,
            notify_subjects=subjects,
            notify_dpdp_board=dpdp_board,
            reasons=reasons,
            decided_by=by,
            decided_at=now(),
        )
    except ValueError as exc:
        raise _fail(f"option '--reasons' or '--by': {str(exc).splitlines()[-1].strip()}") from None
    try:
        updated = _store(run_dir).decide(incident_id, d)
    except IncidentError as exc:
        raise _fail(str(exc)) from None
    Console(highlight=False, soft_wrap=True).print(f"{updated.id}: {updated.status}", markup=False)
