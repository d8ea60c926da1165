"""One institution's node: what happens at a site in a training round.

Flow (DESIGN.md, steps 2-3), each decision written to the site's audit log
*before* the action it allows:

1. site-level rules (purpose, lawful basis, transfers, DP ...) for this run's
   declaration; a denial declines the round with the rule and its reference;
2. record-level rules (consent, withdrawal, erasure, children, retention):
   excluded records never reach the trainer, only counts by rule leave;
3. the privacy budget: if this round would pass epsilon_max, decline;
4. charge the durable ledger, then run the inner loop (DP-SGD with Opacus)
   from theta, and reply phi with metrics and the audit log's head (receipt).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from fedmeta.audit import AuditLog
from fedmeta.config import RunConfig, build_task, inner_lr, resolve_device, sites_per_round
from fedmeta.data.csv_loader import load_csv, load_schema
from fedmeta.data.record_meta import load_record_meta
from fedmeta.data.records import Records
from fedmeta.data.tasks.base import Pool, Task
from fedmeta.data.tasks.tabular import DATA_FILE, SCHEMA_FILE, TabularCsv
from fedmeta.meta.updates import model_digest
from fedmeta.privacy.budget import noise_for_target, poisson_rate
from fedmeta.privacy.dp_training import DPSettings, train_steps
from fedmeta.privacy.ledger import PrivacyLedger
from policies import (
    RecordMeta,
    RunDeclaration,
    SiteManifest,
    default_site_manifest,
    evaluate_records,
    evaluate_site,
    load_site_manifest,
)

MANIFEST_FILE = "manifest.toml"
TRANSPORT_ENV = "FEDMETA_TRANSPORT"  # exported by fedmeta's start-node.sh
AUDIT_LOG = Path("audit") / "audit-log.jsonl"
AUDIT_KEY = Path("keys") / "audit-signing.pem"


@dataclass(frozen=True)
class SiteReply:
    """What a site sends back for one round (weights stay torch tensors here)."""

    site_id: str
    declined: bool
    reason: str = ""
    state: dict[str, torch.Tensor] | None = None
    num_examples: int = 0
    steps: int = 0
    train_loss: float = 0.0
    epsilon_round: float = 0.0
    epsilon_total: float = 0.0
    epsilon_max: float = 0.0
    dp: bool = True
    excluded: dict[str, int] = field(default_factory=dict)
    receipt: str = ""


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


def load_manifest(site_dir: Path, site_id: str, cfg: RunConfig) -> SiteManifest:
    """``<site-dir>/manifest.toml`` if present, else a simulated hospital's defaults."""
    path = Path(site_dir) / MANIFEST_FILE
    if path.exists():
        return load_site_manifest(path)
    # a simulated site on bundled public data accepts what the run config asks for,
    # a non-private run (--no-dp) included: it is then declared and reported as such
    budget = float(cfg.epsilon_max) if cfg.dp else math.inf
    return default_site_manifest(site_id, country=cfg.site_country).model_copy(
        update={"epsilon_max": budget, "delta": float(cfg.delta)})


class Site:
    """A training site bound to its state directory."""

    def __init__(self, site_id: str, site_index: int, site_dir: Path, cfg: RunConfig,
                 records: Records | None = None, manifest: SiteManifest | None = None) -> None:
        self.site_id = site_id
        self.site_index = site_index
        self.site_dir = Path(site_dir)
        self.cfg = cfg
        self.task: Task = build_task(cfg)
        self.read_columns: tuple[str, ...] | None = None
        if records is None and (self.site_dir / DATA_FILE).exists():
            records = self._load_csv()
        self.records = records if records is not None else self.task.site_records(site_index)
        self.manifest = manifest or load_manifest(self.site_dir, site_id, cfg)
        self.record_meta: list[RecordMeta] = load_record_meta(self.site_dir, self.records)

    def _load_csv(self) -> Records:
        """The institution's own data: ``data.csv`` described by ``schema.toml``."""
        schema = load_schema(self.site_dir / SCHEMA_FILE)
        records, _report = load_csv(self.site_dir / DATA_FILE, schema)
        if isinstance(self.task, TabularCsv):
            self.task.check(records)
        self.read_columns = tuple(schema.dataset.features)
        return records

    # ---- state -----------------------------------------------------------------
    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.open(self.site_dir, site=self.site_id,
                                  epsilon_max=float(self.manifest.epsilon_max),
                                  delta=float(self.manifest.delta),
                                  accountant=self.cfg.accountant)

    def audit_log(self) -> AuditLog:
        return AuditLog.open(self.site_dir / AUDIT_LOG, self.site_dir / AUDIT_KEY,
                             actor=self.site_id)

    def pool(self, records: Records, rng: np.random.Generator) -> Pool:
        if self.cfg.strategy == "reptile":
            return self.task.episode_pool(records, rng)
        return self.task.supervised_pool(records)

    def noise_multiplier(self, q: float) -> float:
        cfg = self.cfg
        if cfg.target_epsilon > 0:
            return noise_for_target(cfg.target_epsilon, float(self.manifest.delta), q,
                                    cfg.inner_steps * planned_rounds(cfg), cfg.accountant)
        return cfg.noise_multiplier

    # ---- one round -------------------------------------------------------------
    def train_round(self, theta: dict[str, torch.Tensor], run_id: str, server_round: int,
                    declaration: RunDeclaration | None = None,
                    server_head: str = "") -> SiteReply:
        with self.audit_log() as log:
            reply = self._round(log, theta, run_id, server_round, declaration, server_head)
            head = log.head()
        return reply if head is None else _with(reply, receipt=str(head))

    def _decline(self, log: AuditLog, run_id: str, server_round: int, action: str,
                 reason: str, rule_ids: tuple[str, ...] = (), **kw) -> SiteReply:
        log.append(action, run_id=run_id, round=server_round, decision="deny",
                   rule_ids=rule_ids, details={"reason": reason[:500]})
        return SiteReply(self.site_id, declined=True, reason=reason, dp=self.cfg.dp, **kw)

    def _round(self, log: AuditLog, theta, run_id: str, server_round: int,
               declaration: RunDeclaration | None, server_head: str) -> SiteReply:
        cfg = self.cfg
        transport = os.environ.get(TRANSPORT_ENV, "simulation")
        if transport == "insecure":
            log.append("security.insecure", run_id=run_id, round=server_round, decision="allow",
                       details={"transport": "insecure", "tls": False, "supernode_auth": False})
        records = self.records
        excluded: dict[str, int] = {}
        if declaration is not None:
            # 1. site-level rules
            decisions = evaluate_site(declaration, self.manifest, read_columns=self.read_columns)
            denied = [d for d in decisions if d.denied]
            if denied:
                d = denied[0]
                reason = f"policy {d.rule_id} ({'; '.join(d.references)}): {d.reason}"
                return self._decline(log, run_id, server_round, "policy.site", reason,
                                     tuple(x.rule_id for x in denied))
            log.append("policy.site", run_id=run_id, round=server_round, decision="allow",
                       rule_ids=[d.rule_id for d in decisions],
                       details={"conflicts": ",".join(d.rule_id for d in decisions
                                                      if d.conflict) or None})
            # 2. record-level rules: excluded records never reach the trainer
            verdict = evaluate_records(declaration, self.manifest, self.record_meta,
                                       at=datetime.now(UTC))
            excluded = {k: v for k, v in verdict.excluded_by_rule.items() if v}
            log.append("policy.records", run_id=run_id, round=server_round,
                       decision="allow-with-exclusions" if excluded else "allow",
                       rule_ids=sorted(excluded), counts=excluded,
                       details={"records": verdict.n_total, "allowed": verdict.n_allowed})
            if verdict.n_excluded:
                records = records.subset(np.asarray(verdict.allowed_mask, dtype=bool))
        seed = round_seed(cfg.seed, server_round, self.site_index)
        rng = np.random.default_rng(seed)
        try:
            pool = self.pool(records, rng)
        except ValueError as exc:  # too few usable records left after exclusions
            return self._decline(log, run_id, server_round, "round.decline",
                                 f"not enough usable records: {exc}", excluded=excluded)
        batch = min(cfg.batch_size, len(pool.x))
        ledger = self.ledger() if cfg.dp else None
        dp: DPSettings | None = None
        eps_round = eps_total = 0.0
        q = 1.0
        if ledger is not None:
            # 3. the privacy budget
            q = poisson_rate(len(pool.x), batch)
            sigma = self.noise_multiplier(q)
            step = (sigma, q, cfg.inner_steps)
            exceed, after = ledger.would_exceed(step)
            if exceed:
                return self._decline(
                    log, run_id, server_round, "privacy.decline",
                    f"privacy budget: this round would bring epsilon to {after:.3f} > "
                    f"epsilon_max {ledger.epsilon_max:g}", ("PRIV-BUDGET",),
                    epsilon_total=ledger.epsilon(), epsilon_max=ledger.epsilon_max,
                    excluded=excluded)
            eps_before = ledger.epsilon()
            # 4. durable before training and before the reply leaves
            charge = ledger.charge(run_id, server_round, step)
            eps_total = charge.epsilon_after
            eps_round = eps_total - eps_before
            dp = DPSettings(sigma, cfg.max_grad_norm, float(self.manifest.delta),
                            cfg.accountant, cfg.secure_rng, cfg.grad_sample_mode)
        log.append("round.train", run_id=run_id, round=server_round, decision="allow",
                   model_in=_digest(theta), epsilon=eps_total if dp else None,
                   counts={"examples": len(pool.x), "steps": cfg.inner_steps},
                   details={"server_head": server_head or None, "dp": dp is not None,
                            "transport": transport,
                            "noise_multiplier": dp.noise_multiplier if dp else None,
                            "sample_rate": q if dp else None})
        model = self.task.build_model(self.task.out_dim(cfg.strategy))
        model.load_state_dict(theta)
        result = train_steps(model, pool, loss_fn=self.task.loss_fn(), steps=cfg.inner_steps,
                             lr=inner_lr(cfg, self.task), batch_size=batch, dp=dp,
                             device=resolve_device(cfg.device), seed=seed)
        if dp is not None and result.dp_step != (dp.noise_multiplier, q, cfg.inner_steps):
            raise RuntimeError(f"Opacus recorded {result.dp_step}, ledger charged "
                               f"{(dp.noise_multiplier, q, cfg.inner_steps)}")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        log.append("round.reply", run_id=run_id, round=server_round, model_out=_digest(state),
                   epsilon=eps_total if dp else None,
                   counts={"examples": len(pool.x), "excluded": sum(excluded.values())})
        return SiteReply(
            self.site_id, declined=False, state=state, num_examples=len(pool.x),
            steps=result.steps, train_loss=result.mean_loss, epsilon_round=eps_round,
            epsilon_total=eps_total, epsilon_max=ledger.epsilon_max if ledger else math.inf,
            dp=dp is not None, excluded=excluded,
        )


def _with(reply: SiteReply, **changes) -> SiteReply:
    from dataclasses import replace

    return replace(reply, **changes)


def simulation_site_dir(out_dir: str | Path, site_index: int) -> Path:
    return Path(out_dir) / "sites" / f"site-{site_index}"
