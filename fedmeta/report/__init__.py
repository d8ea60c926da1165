"""Compliance report for a data protection officer: ``fedmeta report RUN_DIR``.

::

    from fedmeta.report import write_report

    path = write_report(Path("runs/demo"))                      # runs/demo/report.html
    path = write_report(Path("runs/demo"), "json", site="site-3")  # one site's report

The report re-verifies every audit log of the run and refuses
(:class:`UnverifiedRunError`) when one fails, unless ``allow_unverified``; it then
carries a red banner (and ``"verified": false`` in JSON).

Keys: ``trust`` (``--trust``, :mod:`fedmeta.report.trust`) gives the parties'
public keys from outside the run directory. Without it every log is checked
only against keys found in the run directory: the report then says on its
first line, in every format, that its evidence is self-asserted, and
``"verified"`` stays false (``"checks_passed"`` says whether the logs are
intact and agree).

Modules, one concept each: ``model`` (the report's data, one canonical JSON;
``schema.json`` is its JSON Schema), ``collect`` (the only place that knows the
run directory's files; verifies the logs), ``trust`` (``--trust``: keys from
outside the run), ``evidence`` (which figures a signed entry backs),
``metrics_schema`` (the fields read from unsigned files), ``checks``
(verification results and cross-checks), ``records`` (parties, GDPR Art. 30), ``dpia`` (Art. 35(7)),
``privacy`` (per-site (epsilon, delta)), ``policy`` (decisions, exclusions,
rights, DPDP), ``learning``, ``build`` (assembles the report), ``plots`` and
``render`` (JSON, Markdown, HTML from ``templates/``).
"""

from __future__ import annotations

from pathlib import Path

from fedmeta.paths import RunPaths
from fedmeta.report.build import UnverifiedRunError, build_report
from fedmeta.report.collect import ReportError
from fedmeta.report.model import Report
from fedmeta.report.render import FORMATS, render

__all__ = [
    "FORMATS",
    "Report",
    "ReportError",
    "UnverifiedRunError",
    "build_report",
    "default_path",
    "generate",
    "write_report",
]

SUFFIX = {"html": ".html", "json": ".json", "md": ".md"}


def default_path(run_dir: Path, fmt: str, site: str | None = None) -> Path:
    """``RUN_DIR/report.<ext>``, or ``RUN_DIR/report-<site>.<ext>`` for a site report."""
    name = f"report-{site}" if site else "report"
    return Path(run_dir) / f"{name}{SUFFIX[fmt]}"


def generate(
    run_dir: Path,
    fmt: str = "html",
    out: Path | None = None,
    site: str | None = None,
    allow_unverified: bool = False,
    baseline: Path | None = None,
    trust: list[str] | tuple[str, ...] = (),
    epsilon_warn: float | None = None,
) -> tuple[Path, Report]:
    """Like :func:`write_report`, also returning the :class:`Report` written."""
    from fedmeta.report.trust import TrustError, load_trust

    try:
        anchors = load_trust(trust)
    except TrustError as exc:
        raise ReportError(str(exc)) from None
    if fmt not in FORMATS:
        raise ReportError(f"option '--format': {fmt!r} is not one of {', '.join(FORMATS)}")
    if baseline is not None and not RunPaths(baseline).metrics.is_file():
        raise ReportError(
            f"option '--baseline': {baseline}: not a run directory (no metrics.jsonl)"
        )
    report = build_report(
        Path(run_dir),
        site=site,
        allow_unverified=allow_unverified,
        baseline=baseline,
        trust=anchors,
        **({} if epsilon_warn is None else {"epsilon_warn": epsilon_warn}),
    )
    return render(report, fmt, out or default_path(run_dir, fmt, site)), report


def write_report(
    run_dir: Path,
    fmt: str = "html",
    out: Path | None = None,
    site: str | None = None,
    allow_unverified: bool = False,
    baseline: Path | None = None,
    trust: list[str] | tuple[str, ...] = (),
) -> Path:
    """Build the report of ``run_dir`` and write it as ``fmt``; returns the file written.

    Raises :class:`ReportError` (unusable run directory or option) and
    :class:`UnverifiedRunError` (a log failed verification, unless
    ``allow_unverified``).
    """
    return generate(run_dir, fmt, out, site, allow_unverified, baseline, trust)[0]
