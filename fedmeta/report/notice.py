"""``fedmeta notice RUN_DIR``: the public study notice, from what the run declared.

It is built from the run declaration (controllers, purpose, server country,
retention, differential privacy) and the manifests the sites sent (institution,
country, data, lawful basis and the law behind it, transfer safeguards), so the
notice says what the run really does. What only the controllers can write
(why individual notice is impossible, under GDPR Art. 14(5)(b)) is left as a
TODO line that must be completed before publication.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedmeta.paths import RunPaths
from fedmeta.report.collect import ReportError, RunFiles, read_run
from fedmeta.report.records import legal_basis
from fedmeta.report.render import _env
from policies import get_purpose
from policies.countries import country_name
from policies.gdpr import transfer_ground


def study_notice(files: RunFiles) -> str:
    """The notice as Markdown."""
    decl = files.declaration
    manifests = [
        files.manifests[k]
        for k in sorted(files.manifests)
        if not files.eligible or k in files.eligible
    ]
    controllers: list[dict[str, Any]] = [
        {
            "name": p.name,
            "country": p.country,
            "contact": p.contact_email,
            "dpo": p.dpo_contact,
            "role": "coordinating controller" if i == 0 else "",
        }
        for i, p in enumerate((decl.controller, *decl.joint_controllers))
    ]
    named = {c["name"] for c in controllers}
    for m in manifests:
        if m.institution not in named:
            controllers.append(
                {
                    "name": m.institution,
                    "country": m.country,
                    "contact": m.dpo_contact or "TODO: contact",
                    "dpo": m.dpo_contact,
                    "role": m.role,
                }
            )
    sites = []
    for m in manifests:
        ground, _ = transfer_ground(decl.server_country, m.transfer_safeguards)
        transfer = (
            ""
            if not ground or "no third-country transfer" in ground
            else f"updates to {country_name(decl.server_country)}: {ground}"
        )
        sites.append(
            {
                "institution": m.institution,
                "country_name": country_name(m.country),
                "categories": ", ".join(sorted(m.data_categories)),
                "subjects": ", ".join(sorted(m.data_subjects)),
                "bases": "; ".join(legal_basis(files, m)) + ".",
                "transfer": transfer,
                "retention_days": m.retention_days,
            }
        )
    if decl.dp_enabled and decl.epsilon is not None:
        dp = (
            f"the study declares that each hospital's updates over the whole study satisfy "
            f"({decl.epsilon:g}, {decl.delta:g})-differential privacy for each of its "
            "records, and each hospital enforces its own budget."
        )
    else:
        dp = "NOT used in this run (declared non-private)."
    dpdp = [m.institution for m in manifests if "dpdp" in m.law_packs]
    controller_lines = "\n".join(
        f"- **{c['name']}** ({c['country']}){', ' + c['role'] if c['role'] else ''}: contact "
        f"{c['contact']}" + (f"; data protection officer: {c['dpo']}" if c["dpo"] else "")
        for c in controllers
    )
    site_lines = "\n".join(
        f"- **{s['institution']}** ({s['country_name']}): {s['categories']} data about "
        f"{s['subjects']}, from the hospital's own records. {s['bases']}"
        for s in sites
    )
    transfer_lines = "\n".join(
        f"- {s['institution']}: {s['transfer']}" for s in sites if s["transfer"]
    )
    retention = "; ".join(f"{s['institution']}: {s['retention_days']} days" for s in sites)
    contact_lines = "\n".join(
        f"- {c['name']}: {c['contact']}" + (f" (DPO: {c['dpo']})" if c["dpo"] else "")
        for c in controllers
    )
    return (
        _env(False)
        .get_template("notice.md.j2")
        .render(
            controller_lines=controller_lines,
            site_lines=site_lines,
            transfer_lines=transfer_lines,
            retention=retention,
            contact_lines=contact_lines,
            purpose=get_purpose(decl.purpose),
            run_id=files.run_id,
            today=datetime.now(UTC).date().isoformat(),
            coordinator=decl.controller.name,
            model_days=decl.model_retention_days,
            log_days=decl.log_retention_days,
            server_country=country_name(decl.server_country),
            dp_sentence=dp,
            dpdp_sites=", ".join(dpdp),
        )
    )


def notice_command(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (fedmeta simulate --out)")],
    out: Annotated[
        Path | None, typer.Option(help="output file (default RUN_DIR/study-notice.md)")
    ] = None,
) -> None:
    """Write the public study notice (GDPR Art. 14 and 26(2), DPDP s.5) for a run."""
    try:
        files = read_run(run_dir)
    except ReportError as exc:
        Console(stderr=True, highlight=False).print(f"error: {exc}", style="bold red", markup=False)
        raise typer.Exit(2) from None
    target = out or RunPaths(run_dir).study_notice
    target.write_text(study_notice(files), encoding="utf-8")
    Console(highlight=False).print(f"wrote {target} (complete every TODO before publishing)")
