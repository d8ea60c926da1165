"""One institution's node: what happens at a site in a training round.

Everything that protects the site's data is decided here, from the site's own
files; nothing in the round config can weaken it (docs/threat-model.md). Each
decision is written to the site's audit log *before* the action it allows:

0. the site's privacy policy (manifest ``[privacy]``) against what the round
   asks: DP on, accountant, delta, sigma, clipping norm, steps, batch;
1. the run declaration must be one the site approved (``fedmeta node approve``);
2. site-level rules (purpose, lawful basis, transfers, DP ...) for that
   declaration; a denial declines the round with the rule and its reference;
3. record-level rules (consent, withdrawal, erasure, children, retention) on
   record metadata re-read this round: excluded records never reach the
   trainer, only counts by rule leave (suppressed below the minimum cohort);
4. the sampling rate and planned sigma against the policy, then, under the
   ledger's lock: a replayed round, epsilon_max, the per-run and per-round caps;
5. charge the durable ledger, then run the inner loop (DP-SGD with Opacus, noise
   and sampling from the site's CSPRNG when deployed) from theta, and reply phi
   with privatised metrics only and the audit log's head (receipt).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmeta.approvals import approved
from fedmeta.audit import AuditLog
from fedmeta.config import (
    RunConfig,
    build_task,
    inner_lr,
    resolve_device,
    run_declaration,
    sites_per_round,
)
from fedmeta.data.loaders.site import load_site_records
from fedmeta.data.record_meta import load_record_meta
from fedmeta.data.records import Records
from fedmeta.data.tasks.base import Pool, Task
from fedmeta.meta.fomaml import fomaml_site_update
from fedmeta.meta.updates import model_digest
from fedmeta.paths import MANIFEST_FILE, TRANSPORT_ENV
from fedmeta.privacy.budget import expected_batch_size, noise_for_target, poisson_rate
from fedmeta.privacy.dp_training import DPSettings, dp_mode, train_steps
from fedmeta.privacy.ledger import PrivacyLedger
from fedmeta.privacy.noise import SEEDED, SITE_CSPRNG, SiteRandomness, load_or_create_secret
from fedmeta.privacy.units import RECORD, count_units
from fedmeta.site_files import load_manifest, site_audit_log
from policies import (
    RecordMeta,
    RunDeclaration,
    SiteManifest,
    evaluate_records,
    evaluate_site,
    load_site_manifest,
)
from policies.engine import suppress_small_counts
from policies.site_policy import (
    Refusal,
    RoundRequest,
    SitePrivacyPolicy,
    canonical_json,
    check_round,
)

META_STRATEGIES = ("reptile", "fomaml")  # sites train on episodes (labels per episode)


@dataclass(frozen=True)
class SiteReply:
    """What a site sends back for one round (weights stay torch tensors here)."""

    site_id: str
    declined: bool
    reason: str = ""
    state: dict[str, torch.Tensor] | None = None
    num_examples: int = 0
    steps: int = 0
    epsilon_round: float = 0.0
    epsilon_total: float = 0.0
    dp: bool = True
    excluded: dict[str, int | str] = field(default_factory=dict)
    """Exclusion counts by rule as released: 1..k-1 read "<k" (k = min_cohort_size)."""
    receipt: str = ""


class SiteSetupError(RuntimeError):
    """A deployed site's directory cannot be used (one line, names the file)."""


def round_seed(seed: int, server_round: int, site_index: int) -> int:
    """Deterministic per-(run seed, round, site) seed."""
    return int(np.random.SeedSequence([seed, server_round, site_index]).generate_state(1)[0])


def planned_rounds(cfg: RunConfig) -> int:
    """Rounds a site plans ``target-epsilon`` over: how often it expects to be sampled.

    The server samples max(min-sites, round(fraction * sites)) of the sites each
    round, so a site joins Binomial(rounds, p) rounds. Planning for every round
    would leave most of the budget unspent (a site in half the rounds spent ~5.5
    of a target of 8); planning for the mean plus three standard deviations
    spends nearly all of it. The rare site sampled even more often is stopped by
    the ledger's epsilon-max check, which declines the round instead.
    """
    k = sites_per_round(cfg.sites, cfg.fraction_train, cfg.min_sites)
    p = min(1.0, k / cfg.sites)
    r = cfg.rounds
    return min(r, math.ceil(p * r + 3.0 * math.sqrt(r * p * (1.0 - p))))


def _digest(state: dict[str, torch.Tensor]) -> str:
    return model_digest({k: v.detach().cpu().numpy() for k, v in state.items()})


def simulated_policy(cfg: RunConfig) -> SitePrivacyPolicy:
    """A simulated site's own privacy policy, fixed when it is set up from the run config.

    It accepts exactly the run it was built for (so simulations keep working) and
    nothing weaker: a later round asking for less noise, a larger clipping norm,
    more steps, a larger batch or another accountant is declined like anywhere else.
    """
    accountants = (cfg.accountant,) if cfg.accountant in ("prv", "rdp") else ("prv", "rdp")
    sigma = cfg.noise_multiplier if cfg.target_epsilon <= 0 else 0.0
    return SitePrivacyPolicy(
        dp_required=cfg.dp,
        accountants=accountants,
        min_noise_multiplier=float(sigma),
        max_grad_norm=float(cfg.max_grad_norm),
        max_inner_steps=cfg.inner_steps,
        max_batch_size=cfg.batch_size,
        max_sample_rate=1.0,
        run_epsilon_max=float(cfg.target_epsilon) if cfg.target_epsilon > 0 else None,
    )


def _manifest_sha256(site_dir: Path, manifest: SiteManifest, from_file: bool) -> str:
    if from_file:
        return hashlib.sha256((Path(site_dir) / MANIFEST_FILE).read_bytes()).hexdigest()
    return hashlib.sha256(canonical_json(manifest.to_dict())).hexdigest()


def release_counts(excluded: dict[str, int], min_cohort: int) -> dict[str, int | str]:
    """Exclusion counts as they may leave the site: 1..k-1 become "<k" (k = min cohort)."""
    return {k: v for k, v in suppress_small_counts(excluded, min_cohort).items() if v}


class Site:
    """A training site bound to its state directory.

    A **deployed** site (a node started with ``site-dir`` in its node config, or
    a ``Site`` over a directory with its own ``manifest.toml``) takes everything
    from its own files, re-read every round: the manifest and its ``[privacy]``
    policy (defaults: ``SitePrivacyPolicy()``), the approved declarations and the
    record metadata; its DP noise and sampling come from its own CSPRNG
    (fedmeta.privacy.noise), whatever the run config says.

    A **simulated** site (a partition of a simulation) is set up from the run
    config: its manifest (its own ``manifest.toml`` if the run directory has one,
    else a default hospital), a policy built from the config when the manifest
    has no ``[privacy]`` table, and an approval of the run's own declaration. Its
    noise is seeded (reproducible, no protection against the coordinator) unless
    the run asks for ``noise-source = "site-csprng"``.
    """

    def __init__(
        self,
        site_id: str,
        site_index: int,
        site_dir: Path,
        cfg: RunConfig,
        records: Records | None = None,
        manifest: SiteManifest | None = None,
        simulated: bool | None = None,
        data_path: Path | str | None = None,
    ) -> None:
        self.site_id = site_id
        self.site_index = site_index
        self.site_dir = Path(site_dir)
        self.cfg = cfg
        self.task: Task = build_task(cfg)
        self.read_columns: tuple[str, ...] | None = None
        #: what one privacy unit is here: a declared unit column, the task's unit, or a record
        self.privacy_unit: str = RECORD
        if records is None:  # the site's own data, where the site keeps it
            loaded = load_site_records(
                self.task, self.site_dir, site_index, cfg, data_path, simulated
            )
            if loaded is not None:
                records, self.read_columns = loaded.records, loaded.read_columns
                self.privacy_unit = loaded.unit_name or RECORD
            else:
                self.privacy_unit = getattr(self.task, "privacy_unit", RECORD)
        self.records = records if records is not None else self.task.site_records(site_index)
        if self.records.units is None:
            self.privacy_unit = RECORD
        elif self.privacy_unit == RECORD:  # records given with units but no name
            self.privacy_unit = "unit"
        self.manifest_file = manifest is None and (self.site_dir / MANIFEST_FILE).exists()
        self.simulated = (not self.manifest_file) if simulated is None else simulated
        if not self.simulated and manifest is None and not self.manifest_file:
            raise SiteSetupError(
                f"{self.site_dir / MANIFEST_FILE}: a deployed site trains only "
                "under its own manifest; run `fedmeta node init` and fill it in"
            )
        self.manifest = manifest or load_manifest(self.site_dir, site_id, cfg)
        self.record_meta: list[RecordMeta] = load_record_meta(self.site_dir, self.records)
        # a simulated site approves its own run's declaration at set-up
        self._setup_approvals: set[str] = set()
        self._setup_policy: SitePrivacyPolicy = SitePrivacyPolicy()
        if self.simulated:
            self._setup_approvals.add(run_declaration(cfg).sha256())
            self._setup_policy = simulated_policy(cfg)
        self.noise_source = (
            SITE_CSPRNG if not self.simulated or cfg.noise_source == SITE_CSPRNG else SEEDED
        )
        self._ledger: PrivacyLedger | None = None  # the ledger as last read or written
        #: the clipping mode ``dp_mode`` chose for the model this site builds (``_dp_mode``)
        self._dp_modes: dict[tuple, str] = {}

    # ---- state -----------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read what the site's people may change during a run: the manifest (and
        its privacy policy) and the record metadata (withdrawals, erasure requests)."""
        if self.manifest_file:
            self.manifest = load_site_manifest(self.site_dir / MANIFEST_FILE)
        self.record_meta = load_record_meta(self.site_dir, self.records)

    @property
    def policy(self) -> SitePrivacyPolicy:
        """The manifest's ``[privacy]`` table, else the site's set-up default."""
        return self.manifest.privacy or self._setup_policy

    def approved_declarations(self) -> set[str]:
        return self._setup_approvals | set(approved(self.site_dir))

    def ledger(self, accountant: str | None = None) -> PrivacyLedger:
        """The site's ledger, checked as opened; re-read only when the file changed since
        this site last read or wrote it."""
        self._ledger = PrivacyLedger.open(
            self.site_dir,
            site=self.site_id,
            epsilon_max=float(self.manifest.epsilon_max),
            delta=float(self.manifest.delta),
            accountant=accountant or self.ledger_accountant(),
            privacy_unit=self.privacy_unit,
            reuse=self._ledger,
        )
        return self._ledger

    def ledger_accountant(self) -> str:
        """The ledger's accountant once it exists, else the round's (if the site allows it)."""
        last = self._ledger
        if last is not None and last.path.parent == self.site_dir and last.unchanged():
            return last.accountant
        kept = PrivacyLedger.kept_accountant(self.site_dir)
        return kept or self.cfg.accountant

    def audit_log(self) -> AuditLog:
        return site_audit_log(self.site_dir, self.site_id)

    def pool(self, records: Records, rng: np.random.Generator) -> Pool:
        if self.cfg.strategy in META_STRATEGIES:
            return self.task.episode_pool(records, rng)
        return self.task.supervised_pool(records)

    def run_cap(self, declaration: RunDeclaration) -> float | None:
        """Most epsilon this site spends in one run: its policy's and the run's declared."""
        caps = [c for c in (self.policy.run_epsilon_max, declaration.epsilon) if c is not None]
        return float(min(caps)) if caps else None

    def noise_multiplier(
        self, q: float, declaration: RunDeclaration | None = None, accountant: str | None = None
    ) -> float:
        """The round's sigma. A target epsilon is planned by the site: at most its own
        per-run cap, at its own delta and accountant, and never below its minimum sigma."""
        cfg = self.cfg
        if cfg.target_epsilon > 0:
            cap = self.run_cap(declaration) if declaration is not None else None
            target = min(cfg.target_epsilon, cap) if cap is not None else cfg.target_epsilon
            sigma = noise_for_target(
                target,
                float(self.manifest.delta),
                q,
                cfg.inner_steps * planned_rounds(cfg),
                accountant or self.ledger_accountant(),
            )
            return max(sigma, float(self.policy.min_noise_multiplier))
        return cfg.noise_multiplier

    # ---- one round -------------------------------------------------------------
    def train_round(
        self,
        theta: dict[str, torch.Tensor],
        run_id: str,
        server_round: int,
        declaration: RunDeclaration | None = None,
        server_head: str = "",
    ) -> SiteReply:
        with self.audit_log() as log:
            reply = self._round(log, theta, run_id, server_round, declaration, server_head)
            head = log.head()
        return reply if head is None else replace(reply, receipt=str(head))

    def _decline(
        self,
        log: AuditLog,
        run_id: str,
        server_round: int,
        action: str,
        reason: str,
        rule_ids: tuple[str, ...] = (),
        **kw,
    ) -> SiteReply:
        log.append(
            action,
            run_id=run_id,
            round=server_round,
            decision="deny",
            rule_ids=rule_ids,
            details={"reason": reason[:500]},
        )
        return SiteReply(self.site_id, declined=True, reason=reason, dp=self.cfg.dp, **kw)

    def _refuse(
        self, log: AuditLog, run_id: str, server_round: int, refusal: Refusal, **kw
    ) -> SiteReply:
        return self._decline(
            log,
            run_id,
            server_round,
            "privacy.decline",
            f"site privacy policy: {refusal.reason}",
            (refusal.rule_id,),
            **kw,
        )

    def _request(self, sigma: float | None, q: float | None) -> RoundRequest:
        cfg = self.cfg
        return RoundRequest(
            dp=cfg.dp,
            noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm,
            inner_steps=cfg.inner_steps,
            batch_size=cfg.batch_size,
            sample_rate=q,
            accountant=cfg.accountant,
            delta=cfg.delta,
        )

    def _round(
        self,
        log: AuditLog,
        theta,
        run_id: str,
        server_round: int,
        declaration: RunDeclaration | None,
        server_head: str,
    ) -> SiteReply:
        """One round: policies and records, DP planning and its checks, the charge,
        training and the reply. A step that declines raises ``_Declined`` (its decline
        already logged); nothing is charged before the last check has passed."""
        rnd = _Round(log, run_id, server_round)
        try:
            transport = self._note_transport(rnd)
            self.refresh()
            declaration_sha = self._check_policies(rnd, declaration)
            assert declaration is not None  # _check_policies declines a round without one
            records, excluded, released = self._allowed_records(rnd, declaration)
            seed = round_seed(self.cfg.seed, server_round, self.site_index)
            rng = np.random.default_rng(seed)
            pool = self._round_pool(rnd, records, rng, released)
            model = self.task.build_model(self.task.out_dim(self.cfg.strategy))
            model.load_state_dict(theta)
            plan = _Plan(self.cfg, pool)
            details: dict = {"dp": self.cfg.dp}
            if self.cfg.dp:
                self._plan_dp(rnd, plan, model, pool, declaration, released)
                self._charge(rnd, plan, released)
                details.update(self._dp_details(plan))
            details.update(
                {
                    "declaration_sha256": declaration_sha,
                    "manifest_sha256": _manifest_sha256(
                        self.site_dir, self.manifest, self.manifest_file
                    ),
                    "site_policy_sha256": self.policy.sha256(
                        float(self.manifest.epsilon_max), float(self.manifest.delta)
                    ),
                    "transport": transport,
                    "server_head": server_head or None,
                    "privacy_unit": self.privacy_unit,
                }
            )
            log.append(
                "round.train",
                run_id=run_id,
                round=server_round,
                decision="allow",
                model_in=_digest(theta),
                epsilon=plan.epsilon_logged,
                counts={"examples": len(pool.x), "steps": self.cfg.inner_steps},
                details=details,
            )
            state, result = self._train(rnd, plan, model, pool, rng, seed)
        except _Declined as declined:
            return declined.reply
        return self._reply(rnd, plan, pool, state, result, excluded, released)

    def _note_transport(self, rnd: _Round) -> str:
        """The transport the site's start script exported; an insecure one is logged."""
        transport = os.environ.get(TRANSPORT_ENV, "simulation")
        if transport == "insecure":
            rnd.log.append(
                "security.insecure",
                run_id=rnd.run_id,
                round=rnd.server_round,
                decision="allow",
                details={"transport": "insecure", "tls": False, "supernode_auth": False},
            )
        return transport

    def _declined(
        self, rnd: _Round, action: str, reason: str, rule_ids: tuple[str, ...] = (), **kw
    ) -> _Declined:
        return _Declined(
            self._decline(rnd.log, rnd.run_id, rnd.server_round, action, reason, rule_ids, **kw)
        )

    def _refused(self, rnd: _Round, refusal: Refusal, **kw) -> _Declined:
        return _Declined(self._refuse(rnd.log, rnd.run_id, rnd.server_round, refusal, **kw))

    def _check_policies(self, rnd: _Round, declaration: RunDeclaration | None) -> str:
        """The site's privacy policy on what the round asks, the approval of the run's
        declaration and the site-level rules (logged as ``policy.site``); returns the
        declaration's sha256."""
        cfg, policy, delta = self.cfg, self.policy, float(self.manifest.delta)
        # 0. the site's own privacy policy, on what the round asks (before anything else)
        fixed_sigma = None if cfg.target_epsilon > 0 else cfg.noise_multiplier
        refusal = check_round(policy, self._request(fixed_sigma, None), delta)
        if refusal is not None:
            raise self._refused(rnd, refusal)
        # 1. the site trains only for a run declaration it approved
        if declaration is None:
            raise self._declined(
                rnd,
                "policy.site",
                "the round carries no run "
                "declaration; this site trains only for a declaration it approved "
                "(fedmeta node approve)",
                ("SITE-APPROVAL",),
            )
        declaration_sha = declaration.sha256()
        if declaration_sha not in self.approved_declarations():
            raise self._declined(
                rnd,
                "policy.site",
                f"the round's run declaration "
                f"(sha256 {declaration_sha[:16]}...) is not one this site approved; approve "
                "it with `fedmeta node approve` if the site's DPO accepts it",
                ("SITE-APPROVAL",),
            )
        # 2. site-level rules
        decisions = evaluate_site(declaration, self.manifest, read_columns=self.read_columns)
        denied = [d for d in decisions if d.denied]
        if denied:
            d = denied[0]
            reason = f"policy {d.rule_id} ({'; '.join(d.references)}): {d.reason}"
            raise self._declined(rnd, "policy.site", reason, tuple(x.rule_id for x in denied))
        rnd.log.append(
            "policy.site",
            run_id=rnd.run_id,
            round=rnd.server_round,
            decision="allow",
            rule_ids=[d.rule_id for d in decisions],
            details={
                "conflicts": ",".join(d.rule_id for d in decisions if d.conflict) or None,
                "declaration_sha256": declaration_sha,
            },
        )
        return declaration_sha

    def _allowed_records(
        self, rnd: _Round, declaration: RunDeclaration
    ) -> tuple[Records, dict[str, int], dict[str, int | str]]:
        """3. record-level rules: excluded records never reach the trainer. Returns
        (the allowed records, excluded counts per rule, the counts released)."""
        records = self.records
        verdict = evaluate_records(
            declaration, self.manifest, self.record_meta, at=datetime.now(UTC)
        )
        excluded = {k: v for k, v in verdict.excluded_by_rule.items() if v}
        released = release_counts(excluded, self.manifest.min_cohort_size)
        rnd.log.append(
            "policy.records",
            run_id=rnd.run_id,
            round=rnd.server_round,
            decision="allow-with-exclusions" if excluded else "allow",
            rule_ids=sorted(excluded),
            counts=excluded,
            details={"records": verdict.n_total, "allowed": verdict.n_allowed},
        )
        if verdict.n_excluded:
            records = records.subset(np.asarray(verdict.allowed_mask, dtype=bool))
        return records, excluded, released

    def _round_pool(
        self,
        rnd: _Round,
        records: Records,
        rng: np.random.Generator,
        released: dict[str, int | str],
    ) -> Pool:
        try:
            return self.pool(records, rng)
        except ValueError:  # too few usable records left after exclusions
            raise self._declined(
                rnd,
                "round.decline",
                "not enough usable records for a round after the site's record rules",
                ("SITE-RECORDS",),
                excluded=released,
            ) from None

    def _plan_dp(
        self,
        rnd: _Round,
        plan: _Plan,
        model: torch.nn.Module,
        pool: Pool,
        declaration: RunDeclaration,
        released: dict[str, int | str],
    ) -> None:
        """The DP round's sampling rate, noise, accountant and caps, checked before
        anything is charged: the model, its loss and the clipping mode (a model DP-SGD
        cannot train soundly is declined, never half-run), then the site's policy."""
        try:
            mode = self._dp_mode(model, pool)
            expected_batch_size(plan.n_units, plan.batch)
        except ValueError as exc:  # DPModelError, UnitError and the E[B] >= 1 check
            raise self._declined(
                rnd, "round.decline", f"DP model check: {exc}", ("PRIV-MODEL",), excluded=released
            ) from None
        plan.mode = mode  # train_steps trains this model object with it, unchecked again
        plan.accountant = self.ledger_accountant()
        plan.q = poisson_rate(plan.n_units, plan.batch)
        plan.sigma = self.noise_multiplier(plan.q, declaration, plan.accountant)
        refusal = check_round(
            self.policy, self._request(plan.sigma, plan.q), float(self.manifest.delta)
        )
        if refusal is not None:
            raise self._refused(rnd, refusal, excluded=released)
        plan.ledger = self.ledger(plan.accountant)
        plan.run_cap = self.run_cap(declaration)

    def _dp_mode(self, model: torch.nn.Module, pool: Pool) -> str:
        """``dp_mode`` for the round's model, checked once per site process: the site builds
        its model itself every round, with its task's builder (theta, loaded strictly, only
        fills in values), so the verdict holds for every model that builder makes for
        inputs of this shape, with or without declared units. A refusal is not kept (the
        next round checks again)."""
        build = self.task.build_model
        key = (
            getattr(build, "__func__", build),
            type(model),
            pool.x.shape[1:],
            pool.x.dtype.str,
            pool.units is not None,
            self.cfg.grad_sample_mode,
        )
        mode = self._dp_modes.get(key)
        if mode is None:
            mode = dp_mode(model, self.task.loss_fn(), self.cfg.grad_sample_mode, pool)
            self._dp_modes[key] = mode
        return mode

    def _charge(self, rnd: _Round, plan: _Plan, released: dict[str, int | str]) -> None:
        """4. the privacy budget, checked and charged under the ledger's lock (durable
        before training and before the reply leaves); then the round's DP settings."""
        cfg, policy, run_id, server_round = self.cfg, self.policy, rnd.run_id, rnd.server_round
        ledger, run_cap = plan.ledger, plan.run_cap
        assert ledger is not None and plan.sigma is not None
        step = (plan.sigma, plan.q, cfg.inner_steps)
        with ledger.locked():
            # one accountant grid for the run: the most steps it can charge here
            ledger.plan_run(run_id, cfg.rounds * cfg.inner_steps)
            if ledger.charged(run_id, server_round):
                raise self._declined(
                    rnd,
                    "round.decline",
                    f"run {run_id} round "
                    f"{server_round} was already trained here; a round is trained once",
                    ("SITE-REPLAY",),
                    excluded=released,
                )
            eps_before = ledger.epsilon()
            exceed, after = ledger.would_exceed(step)
            if exceed:
                raise self._declined(
                    rnd,
                    "privacy.decline",
                    f"privacy budget: this round would bring epsilon to {after:.3f} > "
                    f"epsilon_max {ledger.epsilon_max:g}",
                    ("PRIV-BUDGET",),
                    epsilon_total=eps_before,
                    excluded=released,
                )
            if run_cap is not None:
                run_after = ledger.run_epsilon(run_id, [step])
                if run_after > run_cap:
                    raise self._refused(
                        rnd,
                        Refusal(
                            "run_epsilon_max",
                            f"this round would bring the run's epsilon to "
                            f"{run_after:.3f} > {run_cap:g} (the smaller of "
                            "privacy.run_epsilon_max and the run's declared epsilon)",
                        ),
                        epsilon_total=eps_before,
                        excluded=released,
                    )
            if (
                policy.round_epsilon_max is not None
                and after - eps_before > policy.round_epsilon_max
            ):
                raise self._refused(
                    rnd,
                    Refusal(
                        "round_epsilon_max",
                        f"this round would spend epsilon "
                        f"{after - eps_before:.3f} > {policy.round_epsilon_max:g} "
                        "(privacy.round_epsilon_max)",
                    ),
                    epsilon_total=eps_before,
                    excluded=released,
                )
            # durable before training and before the reply leaves
            charge = ledger.charge(run_id, server_round, step)
        plan.eps_total = charge.epsilon_after
        plan.eps_round = plan.eps_total - eps_before
        randomness = None
        if self.noise_source == SITE_CSPRNG:
            randomness = SiteRandomness(load_or_create_secret(self.site_dir), run_id, server_round)
        plan.dp = DPSettings(
            plan.sigma,
            cfg.max_grad_norm,
            float(self.manifest.delta),
            plan.accountant,
            randomness,
            cfg.grad_sample_mode,
            checked_mode=plan.mode,
        )

    def _dp_details(self, plan: _Plan) -> dict:
        assert plan.ledger is not None
        return {
            "noise_multiplier": plan.sigma,
            "sample_rate": plan.q,
            "steps": self.cfg.inner_steps,
            "delta": float(self.manifest.delta),
            "accountant": plan.accountant,
            "epsilon_max": _finite(plan.ledger.epsilon_max),
            "epsilon_round": plan.eps_round,
            "run_epsilon_max": plan.run_cap,
            "noise_source": self.noise_source,
        }

    def _train(
        self,
        rnd: _Round,
        plan: _Plan,
        model: torch.nn.Module,
        pool: Pool,
        rng: np.random.Generator,
        seed: int,
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """Train the round (FOMAML or DP-SGD/SGD steps); a failure is logged as
        ``round.failed`` (the charge stands) and re-raised. Returns (state, result)."""
        cfg, dp = self.cfg, plan.dp
        try:
            if cfg.strategy == "fomaml":  # non-private only (fedmeta.config refuses DP)
                fomaml_state, result = fomaml_site_update(
                    model,
                    pool,
                    rng,
                    loss_fn=self.task.loss_fn(),
                    steps=cfg.inner_steps,
                    lr=inner_lr(cfg, self.task),
                    batch_size=plan.batch,
                    device=resolve_device(cfg.device),
                    seed=seed,
                )
            else:
                result = train_steps(
                    model,
                    pool,
                    loss_fn=self.task.loss_fn(),
                    steps=cfg.inner_steps,
                    lr=inner_lr(cfg, self.task),
                    batch_size=plan.batch,
                    dp=dp,
                    device=resolve_device(cfg.device),
                    seed=seed,
                )
        except Exception as exc:
            # the charge stands (the ledger never un-spends); the log says it trained nothing
            first = str(exc).splitlines()[0] if str(exc) else ""
            reason = f"charged, not trained: {type(exc).__name__}: {first}"
            rnd.log.append(
                "round.failed",
                run_id=rnd.run_id,
                round=rnd.server_round,
                decision="deny",
                rule_ids=["SITE-TRAIN"],
                epsilon=plan.epsilon_logged,
                details={"reason": reason[:500]},
            )
            raise
        if dp is not None and result.dp_step != (dp.noise_multiplier, plan.q, cfg.inner_steps):
            raise RuntimeError(
                f"Opacus recorded {result.dp_step}, ledger charged "
                f"{(dp.noise_multiplier, plan.q, cfg.inner_steps)}"
            )
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if cfg.strategy == "fomaml":
            state = fomaml_state
        return state, result

    def _reply(
        self,
        rnd: _Round,
        plan: _Plan,
        pool: Pool,
        state: dict[str, torch.Tensor],
        result: Any,
        excluded: dict[str, int],
        released: dict[str, int | str],
    ) -> SiteReply:
        """Log the reply and build it: the training loss, an un-noised statistic of the
        private batch, stays here; a DP round reports its declared work (batch x
        steps), not the size of the private pool."""
        rnd.log.append(
            "round.reply",
            run_id=rnd.run_id,
            round=rnd.server_round,
            model_out=_digest(state),
            epsilon=plan.epsilon_logged,
            counts={"examples": len(pool.x), "excluded": sum(excluded.values())},
            details={"train_loss": round(result.mean_loss, 6)},
        )
        dp = plan.dp
        examples = plan.batch * self.cfg.inner_steps if dp is not None else len(pool.x)
        return SiteReply(
            self.site_id,
            declined=False,
            state=state,
            num_examples=examples,
            steps=result.steps,
            epsilon_round=plan.eps_round,
            epsilon_total=plan.eps_total,
            dp=dp is not None,
            excluded=released,
        )


@dataclass(frozen=True)
class _Round:
    """Where a round's audit entries go and which round they are about."""

    log: AuditLog
    run_id: str
    server_round: int


class _Plan:
    """One round's training plan: batch and units, and for DP the sampling rate, noise,
    accountant, ledger, caps and, once charged, the epsilon spent."""

    def __init__(self, cfg: RunConfig, pool: Pool) -> None:
        # with a privacy unit, n and the batch count units (all of a unit's records
        # enter a step together and are clipped as one)
        self.n_units = count_units(pool.units, len(pool.x)) if cfg.dp else len(pool.x)
        self.batch = min(cfg.batch_size, self.n_units)
        self.q = 1.0
        self.sigma: float | None = None
        self.accountant = ""
        self.ledger: PrivacyLedger | None = None
        self.run_cap: float | None = None
        self.dp: DPSettings | None = None
        self.mode: str | None = None  # the clipping mode dp_mode returned
        self.eps_round = self.eps_total = 0.0

    @property
    def epsilon_logged(self) -> float | None:
        return self.eps_total if self.dp else None


class _Declined(Exception):  # noqa: N818 - a round's outcome, not an error
    """A step declined the round; ``reply`` says why (the decline is already logged)."""

    def __init__(self, reply: SiteReply) -> None:
        super().__init__(reply.reason)
        self.reply = reply


def decline_unreadable_round(
    site_dir: Path, site_id: str, run_id: str, server_round: int, reason: str
) -> SiteReply:
    """A deployed site refuses a round whose config it cannot accept (an unknown key such
    as a request for the training loss, a value out of range): signed in its log."""
    with site_audit_log(Path(site_dir), site_id) as log:
        log.append(
            "round.decline",
            run_id=run_id,
            round=server_round,
            decision="deny",
            rule_ids=["SITE-CONFIG"],
            details={"reason": reason[:500]},
        )
        head = log.head()
    return SiteReply(site_id, declined=True, reason=reason, receipt=str(head) if head else "")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
