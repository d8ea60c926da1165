"""A site's rights register in the report and on the command line.

The register (``<site-dir>/rights-register.csv``, ``fedmeta.data.rights_register``)
is the site's own, unsigned record of requests and decisions. The report shows
only counts per type and decision, suppressed below the site's minimum cohort
size, with how many answers were late against the legal deadline;
``fedmeta rights SITE_DIR`` shows the site's own staff every request with its
deadline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmeta.data.rights_register import RightsRegisterError, load_rights_register
from fedmeta.report.model import Count, RightsRegisterRow
from policies import suppress_small_counts
from policies.rights import DEADLINE_REFERENCES, RightsRequest, summarise

SOURCE = "the site's rights register (rights-register.csv; kept by the site, not signed)"


def register_rows(
    site_id: str, site_dir: Path, k: int, on: date
) -> tuple[list[RightsRegisterRow], RegisterFacts | None]:
    """Suppressed counts of one site's register (none when it keeps no register)."""
    requests = load_rights_register(site_dir)
    if requests is None:
        return [], None
    summary = summarise(requests, on)
    cells = {f"{t}/{d}": n for (t, d), n in summary.by_type_decision.items()}
    shown = suppress_small_counts(cells, k)
    rows = [
        RightsRegisterRow(
            site_id=site_id,
            type=key.split("/")[0],
            decision=key.split("/")[1],
            count=shown[key],
            source=SOURCE,
        )
        for key in cells
    ]
    facts = RegisterFacts(
        overdue=_suppress(summary.overdue, k),
        pending=_suppress(summary.pending, k),
        erased_at_source=summary.erased_at_source,
        erasure_requests=summary.erasure_requests,
    )
    return rows, facts


@dataclass(frozen=True)
class RegisterFacts:
    """What the erasure note and findings need from a register."""

    overdue: Count
    pending: Count
    erased_at_source: int
    erasure_requests: int


def _suppress(n: int, k: int) -> Count:
    return suppress_small_counts({"n": n}, k)["n"]


# ---- command ------------------------------------------------------------------------------


def rights_command(
    site_dir: Annotated[Path, typer.Argument(help="a site's state directory")],
    on: Annotated[
        str | None, typer.Option(help="the date to check deadlines on (YYYY-MM-DD; default today)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show a site's rights register: every request with its legal deadline, late ones first."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        when = date.fromisoformat(on) if on else datetime.now(UTC).date()
    except ValueError:
        err.print(
            f"error: option '--on': {on!r} is not a date (YYYY-MM-DD)",
            style="bold red",
            markup=False,
        )
        raise typer.Exit(2) from None
    try:
        requests = load_rights_register(site_dir)
    except RightsRegisterError as exc:
        err.print(f"error: {exc}", style="bold red", markup=False)
        raise typer.Exit(1) from None
    if requests is None:
        err.print(
            f"error: {site_dir}: no rights-register.csv (see fedmeta.data.rights_register"
            " for the format)",
            style="bold red",
            markup=False,
        )
        raise typer.Exit(2)
    ordered = sorted(requests, key=lambda r: (not r.overdue(when), r.deadline))
    if as_json:
        typer.echo(json.dumps([_as_dict(r, when) for r in ordered], indent=2))
        return
    table = Table(title=f"rights register of {site_dir} on {when.isoformat()}")
    for col in ("request", "type", "law", "received", "deadline", "decision", "decided", "late"):
        table.add_column(col)
    for r in ordered:
        late = "LATE" if r.overdue(when) else ""
        table.add_row(
            r.request_id,
            r.type,
            r.law,
            r.received.isoformat(),
            r.deadline.isoformat(),
            r.decision + (f" ({r.ground})" if r.ground else ""),
            r.decided.isoformat() if r.decided else "-",
            late,
        )
    console = Console(highlight=False)
    console.print(table)
    for law, ref in DEADLINE_REFERENCES.items():
        console.print(f"deadline ({law}): {ref}")
    late = sum(r.overdue(when) for r in requests)
    if late:
        console.print(f"{late} request(s) answered late or overdue", style="bold red")


def _as_dict(r: RightsRequest, on: date) -> dict:
    return {
        "request_id": r.request_id,
        "type": r.type,
        "law": r.law,
        "received": r.received.isoformat(),
        "deadline": r.deadline.isoformat(),
        "decision": r.decision,
        "ground": r.ground,
        "decided": r.decided.isoformat() if r.decided else None,
        "extended": r.extended,
        "erased_at_source": r.erased_at_source,
        "effect_on_models": r.effect_on_models,
        "overdue": r.overdue(on),
    }
