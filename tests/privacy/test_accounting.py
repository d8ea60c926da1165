"""The epsilon a site charges bounds the mechanism it runs (docs/privacy-accounting.md).

For each bundled task's default configuration, a real ``Site`` runs rounds and
charges its ledger; the mechanism is then rebuilt independently of the charging
code: the round's pool from the task with the round's seed, the per-step
inclusion rate from Opacus's own Poisson loader over that pool's privacy units
(images for digits-fewshot, records otherwise), and the
composition from Opacus's unmodified PRV accountant (its estimate, not its
upper end). The ledger must never show less.
"""

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from fedmeta.config import RunConfig, build_task, run_declaration
from fedmeta.paths import LEDGER_FILE
from fedmeta.paths import SITE_AUDIT_LOG as AUDIT_LOG
from fedmeta.privacy.ledger import PrivacyLedger
from fedmeta.site import Site, round_seed

ROUNDS = 3


def _entries(site_dir):
    import json

    return [json.loads(x) for x in (site_dir / AUDIT_LOG).read_text().splitlines()]


def opacus_rate(n: int, batch: int) -> float:
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=min(batch, n))
    return DPDataLoader.from_data_loader(loader).sample_rate


@pytest.mark.parametrize("task", ["digits-fewshot", "sine", "breast-cancer-sites"])
def test_charged_epsilon_bounds_the_mechanism_that_ran(tmp_path, task):
    # noise 2: three rounds stay inside the run's declared epsilon (8), which the site enforces
    cfg = RunConfig(task=task, rounds=ROUNDS, out_dir=str(tmp_path), noise_multiplier=2.0)
    site = Site("site-1", 1, tmp_path / "site-1", cfg)
    t = build_task(cfg)
    torch.manual_seed(0)
    theta = t.build_model(t.out_dim(cfg.strategy)).state_dict()
    reference = PRVAccountant()
    for rnd in range(1, ROUNDS + 1):
        reply = site.train_round(theta, "acc", rnd, run_declaration(cfg))
        assert not reply.declined, reply.reason
        rng = np.random.default_rng(round_seed(cfg.seed, rnd, 1))
        pool = site.pool(site.records, rng)  # the same pool the round trained on
        # the site's own log records the pool it trained on (the reply carries only the
        # declared work, batch x steps, not the private pool's size)
        train = [e for e in _entries(tmp_path / "site-1") if e["action"] == "round.train"][-1]
        assert train["counts"]["examples"] == len(pool.x)
        # sampling is over the pool's privacy units (all of a unit's records together)
        n_units = len(pool.x) if pool.units is None else len(np.unique(pool.units))
        assert (pool.units is not None) == (task == "digits-fewshot")
        assert train["details"]["privacy_unit"] == ("image" if pool.units is not None else "record")
        reference.history.append(
            (cfg.noise_multiplier, opacus_rate(n_units, cfg.batch_size), cfg.inner_steps)
        )
    ledger = PrivacyLedger.read(tmp_path / "site-1" / LEDGER_FILE)
    assert len(ledger.charges) == ROUNDS
    for charge, (sigma, rate, steps) in zip(ledger.charges, reference.history, strict=True):
        assert charge.noise_multiplier <= sigma and charge.sample_rate >= rate
        assert charge.steps >= steps
    estimate = reference._get_dprv(eps_error=0.01, delta_error=cfg.delta / 1000).compute_epsilon(
        cfg.delta, cfg.delta / 1000, 0.01
    )[1]
    assert ledger.epsilon() >= estimate > 0


def test_the_loader_includes_each_record_independently_at_the_charged_rate():
    """Poisson sampling as the accountant assumes: each record in each step with prob. q."""
    n, batch, draws = 300, 10, 600
    loader = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(torch.arange(n)), batch_size=batch),
        generator=torch.Generator().manual_seed(0),
    )
    q = loader.sample_rate
    counts = np.zeros(n)
    sizes = []
    done = 0
    while done < draws:
        for (xb,) in loader:
            counts[xb.numpy()] += 1
            sizes.append(len(xb))
            done += 1
            if done == draws:
                break
    mean, sd = n * draws * q, np.sqrt(n * draws * q * (1 - q))
    assert abs(counts.sum() - mean) < 4 * sd
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.3)  # binomial, not fixed
