"""One institution's node: what happens at a site in a training round.

Flow (DESIGN.md, step 2-3): load the site's records and its durable privacy
ledger, check that this round keeps the site within its budget (else decline
with a reason), charge the ledger durably, run the inner loop (DP-SGD with
Opacus) from theta, and return phi with metrics. Nothing but weights, counts
and epsilon leaves the site.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedmeta.config import RunConfig, build_task, inner_lr, resolve_device
from fedmeta.data.records import Records
from fedmeta.data.tasks.base import Pool, Task
from fedmeta.privacy.budget import noise_for_target, poisson_rate
from fedmeta.privacy.dp_training import DPSettings, train_steps
from fedmeta.privacy.ledger import PrivacyLedger


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


def round_seed(seed: int, server_round: int, site_index: int) -> int:
    """Deterministic per-(run seed, round, site) seed."""
    return int(np.random.SeedSequence([seed, server_round, site_index]).generate_state(1)[0])


class Site:
    """A training site bound to its state directory."""

    def __init__(self, site_id: str, site_index: int, site_dir: Path, cfg: RunConfig,
                 records: Records | None = None) -> None:
        self.site_id = site_id
        self.site_index = site_index
        self.site_dir = Path(site_dir)
        self.cfg = cfg
        self.task: Task = build_task(cfg)
        self.records = records if records is not None else self.task.site_records(site_index)

    # ---- privacy ---------------------------------------------------------------
    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.open(self.site_dir, site=self.site_id,
                                  epsilon_max=self.cfg.epsilon_max, delta=self.cfg.delta,
                                  accountant=self.cfg.accountant)

    def pool(self, rng: np.random.Generator) -> Pool:
        if self.cfg.strategy == "reptile":
            return self.task.episode_pool(self.records, rng)
        return self.task.supervised_pool(self.records)

    def noise_multiplier(self, q: float) -> float:
        cfg = self.cfg
        if cfg.target_epsilon > 0:
            # spend the target over every round of the run (a site may join fewer)
            return noise_for_target(cfg.target_epsilon, cfg.delta, q,
                                    cfg.inner_steps * cfg.rounds, cfg.accountant)
        return cfg.noise_multiplier

    # ---- one round -------------------------------------------------------------
    def train_round(self, theta: dict[str, torch.Tensor], run_id: str,
                    server_round: int) -> SiteReply:
        cfg = self.cfg
        seed = round_seed(cfg.seed, server_round, self.site_index)
        rng = np.random.default_rng(seed)
        pool = self.pool(rng)
        batch = min(cfg.batch_size, len(pool.x))
        ledger = self.ledger() if cfg.dp else None
        dp: DPSettings | None = None
        eps_round = eps_total = 0.0
        if ledger is not None:
            q = poisson_rate(len(pool.x), batch)
            sigma = self.noise_multiplier(q)
            step = (sigma, q, cfg.inner_steps)
            exceed, after = ledger.would_exceed(step)
            if exceed:
                return SiteReply(
                    self.site_id, declined=True,
                    reason=(f"privacy budget: this round would bring epsilon to {after:.3f} "
                            f"> epsilon_max {ledger.epsilon_max:g}"),
                    epsilon_total=ledger.epsilon(), epsilon_max=ledger.epsilon_max,
                )
            eps_before = ledger.epsilon()
            # durable before training and before the reply leaves (conservative order)
            charge = ledger.charge(run_id, server_round, step)
            eps_total = charge.epsilon_after
            eps_round = eps_total - eps_before
            dp = DPSettings(sigma, cfg.max_grad_norm, cfg.delta, cfg.accountant,
                            cfg.secure_rng, cfg.grad_sample_mode)
        model = self.task.build_model(self.task.out_dim(cfg.strategy))
        model.load_state_dict(theta)
        result = train_steps(model, pool, loss_fn=self.task.loss_fn(), steps=cfg.inner_steps,
                             lr=inner_lr(cfg, self.task), batch_size=batch, dp=dp,
                             device=resolve_device(cfg.device), seed=seed)
        if dp is not None and result.dp_step != (dp.noise_multiplier, q, cfg.inner_steps):
            raise RuntimeError(f"Opacus recorded {result.dp_step}, ledger charged "
                               f"{(dp.noise_multiplier, q, cfg.inner_steps)}")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return SiteReply(
            self.site_id, declined=False, state=state, num_examples=len(pool.x),
            steps=result.steps, train_loss=result.mean_loss, epsilon_round=eps_round,
            epsilon_total=eps_total, epsilon_max=ledger.epsilon_max if ledger else math.inf,
            dp=dp is not None,
        )


def simulation_site_dir(out_dir: str | Path, site_index: int) -> Path:
    return Path(out_dir) / "sites" / f"site-{site_index}"


def read_site_marker(site_dir: Path) -> dict:
    return json.loads((Path(site_dir) / "site.json").read_text())
