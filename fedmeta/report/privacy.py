"""Privacy statement per site: (epsilon, delta) from its durable ledger, in words and numbers."""

from __future__ import annotations

import math

from fedmeta.report.collect import RunFiles, SiteFiles
from fedmeta.report.evidence import ledger_evidence
from fedmeta.report.model import LedgerPoint, SitePrivacy

PRIVACY_UNIT = "one record (sample-level differential privacy)"


def unit_label(unit: str) -> str:
    """What the report calls the site's privacy unit (the ledger's ``privacy_unit``)."""
    if unit == "record":
        return PRIVACY_UNIT
    return (
        f"one {unit} (unit-level differential privacy: all records of one {unit} are "
        "sampled together and their summed gradient is clipped as one)"
    )


def group_privacy_note(unit: str, epsilon: float, delta: float) -> str:
    """For a per-record ledger: what the guarantee means for a person with k records."""
    if unit != "record":
        return ""
    return (
        f" The data name no unit column, so a person with k records at this site is "
        f"protected only by group privacy: ({epsilon:.3g}·k, k·e^((k-1)·{epsilon:.3g})·"
        f"{delta:g}) in the worst case, so epsilon grows roughly k-fold (k = 4 gives "
        f"{4 * epsilon:.3g}); declare unit_column in the data's schema to account per "
        "person."
    )


def _distinct(values: list) -> list:
    return sorted(set(values))


def _fmt_list(values: list, fmt: str = "{:g}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(values[0])} to {fmt.format(values[-1])}"


def _declined_rounds(files: RunFiles, site_id: str) -> list[int]:
    return [m["round"] for m in files.round_lines if site_id in (m.get("declined") or {})]


def site_privacy(files: RunFiles, site: SiteFiles) -> SitePrivacy:
    ledger = site.ledger
    declined = _declined_rounds(files, site.site_id)
    clip = files.config.max_grad_norm
    if ledger is None or not files.config.dp:
        joined = [m["round"] for m in files.round_lines if site.site_id in (m.get("used") or [])]
        why = (
            "trained WITHOUT differential privacy in this run (dp off): no (epsilon, delta) "
            "bound holds for the updates it released"
            if not files.config.dp
            else "has no privacy ledger in this run directory: it released nothing under DP "
            "here" + (" (ledger unreadable)" if site.ledger_error else "")
        )
        return SitePrivacy(
            site_id=site.site_id,
            dp=bool(files.config.dp and ledger is not None),
            privacy_unit=PRIVACY_UNIT,
            accountant=None,
            delta=None,
            epsilon_run=None,
            epsilon_total=None,
            epsilon_max=None,
            budget_left=None,
            noise_multipliers=[],
            sample_rates=[],
            steps_per_round=[],
            steps_total=0,
            clip_norm=None,
            rounds_joined=joined,
            rounds_declined=declined,
            earlier_charges=0,
            statement=f"{site.site_id} {why}.",
            points=[],
        )
    mine = [c for c in ledger.charges if c.run == files.run_id]
    earlier = [c for c in ledger.charges if c.run != files.run_id]
    total = float(ledger.epsilon())
    from fedmeta.privacy.budget import epsilon

    if not earlier:
        run_eps = mine[-1].epsilon_after if mine else 0.0
    else:  # compose this run's releases alone (Opacus's accountant, same as the ledger)
        run_eps = float(epsilon([c.step for c in mine], ledger.delta, ledger.accountant))
    sigmas = _distinct([c.noise_multiplier for c in mine])
    rates = _distinct([c.sample_rate for c in mine])
    steps = _distinct([c.steps for c in mine])
    left = max(0.0, ledger.epsilon_max - total)
    rounds = [c.round for c in mine]
    unit = ledger.privacy_unit
    noun = "of its records" if unit == "record" else unit
    if mine:
        released = (
            f"what the site released in run {files.run_id} is ({run_eps:.3g}, "
            f"{ledger.delta:g})-differentially private for each {noun} "
            f"({ledger.accountant.upper()} accountant; noise multiplier {_fmt_list(sigmas)}, "
            f"sampling rate {_fmt_list(rates, '{:.4g}')}, {_fmt_list(steps, '{:d}')} DP-SGD "
            f"steps in each of {len(mine)} round(s))"
        )
    else:
        released = f"the site released nothing in run {files.run_id}, which cost it no privacy"
    statement = (
        f"For {site.site_id}, one {unit} is the privacy unit: {released}; over every run it "
        f"ever joined it has spent epsilon {total:.3g} of its budget of "
        f"{ledger.epsilon_max:g}, leaving {left:.3g}."
        + group_privacy_note(unit, total, ledger.delta)
    )
    if declined:
        statement += f" It declined {len(declined)} round(s) ({', '.join(map(str, declined))})."
    points = [
        LedgerPoint(
            run=c.run, round=c.round, epsilon_after=c.epsilon_after, this_run=c.run == files.run_id
        )
        for c in ledger.charges
    ]
    enforced = _enforced(files, site)
    if enforced:
        source = {
            "site-csprng": "the site's own CSPRNG (a secret the coordinator never sees)",
            "seeded": "seeded from the run seed (a simulation: reproducible, no guarantee "
            "against the coordinator)",
        }.get(str(enforced.get("noise_source")), str(enforced.get("noise_source")))
        cap = enforced.get("run_epsilon_max")
        statement += (
            f" The site enforced, as it signed in its log: noise from {source}; its "
            f"privacy policy sha256 {enforced.get('site_policy_sha256')}; the run "
            f"declaration it approved, sha256 {enforced.get('declaration_sha256')}"
            + (f"; a per-run cap of epsilon {cap:g}" if isinstance(cap, int | float) else "")
            + "."
        )
    unsigned = sorted(ledger_evidence(files, site).unsigned)
    if unsigned:
        statement += (
            f" UNSIGNED: {', '.join(unsigned)} come from the site's ledger file only; "
            "its signed log does not hold them, so they are not verified."
        )
    before = (
        float(epsilon([c.step for c in earlier], ledger.delta, ledger.accountant))
        if earlier
        else 0.0
    )
    return SitePrivacy(
        epsilon_before=before,
        unsigned_fields=unsigned,
        site_id=site.site_id,
        dp=True,
        privacy_unit=unit_label(unit),
        accountant=ledger.accountant,
        delta=ledger.delta,
        epsilon_run=run_eps,
        epsilon_total=total,
        epsilon_max=ledger.epsilon_max,
        budget_left=left,
        noise_multipliers=sigmas,
        sample_rates=rates,
        steps_per_round=steps,
        steps_total=sum(c.steps for c in mine),
        clip_norm=clip,
        rounds_joined=rounds,
        rounds_declined=declined,
        earlier_charges=len(earlier),
        statement=statement,
        points=points,
        noise_source=_str_or_none(enforced.get("noise_source")),
        site_policy_sha256=_str_or_none(enforced.get("site_policy_sha256")),
        declaration_sha256=_str_or_none(enforced.get("declaration_sha256")),
        run_epsilon_cap=(
            float(enforced["run_epsilon_max"])
            if isinstance(enforced.get("run_epsilon_max"), int | float)
            else None
        ),
    )


DEFAULT_EPSILON_WARN = 4.0
"""Above this epsilon a site's guarantee is flagged as weak (the report's --epsilon-warn)."""


def plain_sentence(p: SitePrivacy) -> str:
    """The guarantee in plain words: the odds ratio e^epsilon an observer can gain."""
    if not p.dp or p.epsilon_run is None or p.delta is None:
        return (
            f"{p.site_id}: no differential-privacy guarantee holds for what it released "
            "in this run."
        )
    if not p.rounds_joined:
        return f"{p.site_id} released nothing in this run, so it spent no privacy."
    odds = math.exp(p.epsilon_run)
    text = (
        f"{p.site_id}: epsilon {p.epsilon_run:.3g} this run: whoever sees all it released "
        f"can become at most {odds:.3g} times more sure (e^{p.epsilon_run:.3g}) whether "
        f"any one record was used, except with probability {p.delta:g}."
    )
    if (
        p.epsilon_total is not None
        and p.epsilon_max is not None
        and p.epsilon_total > p.epsilon_run * 1.0001
    ):
        text += (
            f" Over all its runs: epsilon {p.epsilon_total:.3g} of a budget of {p.epsilon_max:g}."
        )
    return text


def with_plain_language(p: SitePrivacy, records: object, epsilon_warn: float) -> SitePrivacy:
    """``p`` with its plain sentence and warnings: epsilon above ``epsilon_warn``, delta
    above 1/n for the ``records`` the site evaluated (an int; a suppressed count is small
    enough that delta > 1/n cannot hold for any delta below 1/5)."""
    warnings = []
    if p.dp and p.epsilon_run is not None and p.epsilon_run > epsilon_warn:
        warnings.append(
            f"epsilon {p.epsilon_run:.3g} this run is above the warning level "
            f"{epsilon_warn:g}: a weak guarantee (an observer's odds may rise "
            f"{math.exp(p.epsilon_run):.3g}-fold)"
        )
    if (
        p.dp
        and p.delta is not None
        and isinstance(records, int)
        and records > 0
        and p.delta > 1.0 / records
    ):
        warnings.append(
            f"delta {p.delta:g} is above 1/n = {1.0 / records:.3g} for the "
            f"{records} records evaluated: a mechanism could then release one "
            "record outright; use delta well below 1/n"
        )
    return p.model_copy(update={"plain": plain_sentence(p), "warnings": warnings})


def _enforced(files: RunFiles, site: SiteFiles) -> dict:
    """What the site signed it enforced in this run's last DP round (round.train details)."""
    trains = [
        e
        for e in site.log.entries
        if e.action == "round.train" and e.run_id == files.run_id and e.details.get("dp")
    ]
    return dict(trains[-1].details) if trains else {}


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def privacy_section(files: RunFiles) -> list[SitePrivacy]:
    return [
        site_privacy(files, s) for s in files.sites.values() if s.ledger is not None or s.log.exists
    ]
