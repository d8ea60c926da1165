"""DP is really applied: clipping bound, noise, Opacus's own accounting."""

import numpy as np
import pytest
import torch
from torch import nn

from fedmeta.data.tasks import get_task
from fedmeta.data.tasks.base import Pool, SampleMSELoss
from fedmeta.privacy.budget import poisson_rate
from fedmeta.privacy.dp_training import DPSettings, train_steps
from fedmeta.privacy.model_check import check_dp_model


def big_gradient_pool(n=64, d=8):
    rng = np.random.default_rng(0)
    return Pool(
        rng.normal(size=(n, d)).astype(np.float32) * 100,
        rng.normal(size=(n, 1)).astype(np.float32) * 100,
    )


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_per_sample_clipping_bounds_the_update(mode):
    """sigma = 0: one step moves the weights by at most lr * C * |batch| / E[batch]."""
    pool = big_gradient_pool()
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    before = flat(model).clone()
    res = train_steps(
        model,
        pool,
        loss_fn=SampleMSELoss(),
        steps=1,
        lr=1.0,
        batch_size=16,
        dp=DPSettings(0.0, max_grad_norm=0.5, grad_sample_mode=mode),
        seed=1,
    )
    moved = float((flat(model) - before).norm())
    bound = 1.0 * 0.5 * res.examples_used / 16
    assert 0 < moved <= bound + 1e-5
    # without DP the same step is orders of magnitude larger
    torch.manual_seed(0)
    plain = nn.Linear(8, 1)
    train_steps(
        plain, pool, loss_fn=SampleMSELoss(), steps=1, lr=1.0, batch_size=16, dp=None, seed=1
    )
    assert float((flat(plain) - before).norm()) > 100 * bound


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_noise_is_present_and_scaled_by_sigma(mode):
    pool = big_gradient_pool()

    def update(sigma, seed):
        torch.manual_seed(0)
        m = nn.Linear(8, 1)
        b = flat(m).clone()
        train_steps(
            m,
            pool,
            loss_fn=SampleMSELoss(),
            steps=1,
            lr=1.0,
            batch_size=16,
            dp=DPSettings(sigma, 1.0, grad_sample_mode=mode),
            seed=seed,
        )
        return flat(m) - b

    a, b = update(2.0, 1), update(2.0, 2)
    assert not torch.allclose(a, b)
    # Gaussian noise sigma*C / E[batch] per coordinate dominates a clipped mean gradient
    diffs = torch.stack([update(2.0, s) - update(0.0, s) for s in range(3, 13)])
    assert diffs.std().item() == pytest.approx(2.0 * 1.0 / 16, rel=0.35)


def test_opacus_records_what_the_ledger_charges():
    task = get_task("digits-fewshot")
    pool = task.episode_pool(task.site_records(0), np.random.default_rng(0))
    model = task.build_model(5)
    res = train_steps(
        model,
        pool,
        loss_fn=task.loss_fn(),
        steps=4,
        lr=0.1,
        batch_size=10,
        dp=DPSettings(1.3, 1.0),
        seed=0,
    )
    assert res.dp_step == (1.3, poisson_rate(len(pool.x), 10), 4)
    assert res.dp_step[1] == pytest.approx(10 / len(pool.x), rel=0.05)  # E[B] ~ 10


def test_same_seed_same_result():
    task = get_task("sine")
    pool = task.episode_pool(task.site_records(0), np.random.default_rng(0))

    def run():
        torch.manual_seed(0)
        m = task.build_model(1)
        train_steps(
            m,
            pool,
            loss_fn=task.loss_fn(),
            steps=5,
            lr=0.01,
            batch_size=10,
            dp=DPSettings(1.0, 1.0),
            seed=7,
        )
        return flat(m)

    assert torch.equal(run(), run())


def test_modes_compute_the_same_clipped_update():
    """The mode auto picks is a faster route to the same DP-SGD step (sigma = 0)."""
    task = get_task("digits-fewshot")
    pool = task.episode_pool(task.site_records(0), np.random.default_rng(0))

    def update(mode, p=pool):
        torch.manual_seed(0)
        m = task.build_model(5)
        train_steps(
            m,
            p,
            loss_fn=task.loss_fn(),
            steps=2,
            lr=0.1,
            batch_size=10,
            dp=DPSettings(0.0, 0.5, grad_sample_mode=mode),
            seed=3,
        )
        return flat(m)

    ref = update("hooks")
    for mode in ("ew", "bk"):
        torch.testing.assert_close(update(mode), ref, rtol=1e-4, atol=1e-5)
    # ghost clips per record: refused when the pool names units (digits: images), and
    # the same step on a pool without units (this pool's images hold one record each)
    with pytest.raises(ValueError, match="ghost"):
        update("ghost")
    records = Pool(pool.x, pool.y)
    assert len(np.unique(pool.units)) == len(pool.x)
    torch.testing.assert_close(update("ghost", records), ref, rtol=1e-4, atol=1e-5)


def test_grad_sample_mode_choice():
    def pick(model, mode="auto", x=None):
        x = torch.zeros(1, 2) if x is None else x
        return check_dp_model(model, nn.CrossEntropyLoss(), mode, x)

    assert pick(get_task("sine").build_model(1), x=torch.zeros(1, 1)) == "bk"
    assert pick(get_task("digits-fewshot").build_model(5), x=torch.zeros(1, 1, 8, 8)) == "bk"
    assert pick(nn.Linear(2, 2), "ew") == "ew"
    # layers book-keeping cannot handle fall back to Opacus's modes
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(144, 2))
    assert pick(grouped, x=torch.zeros(1, 2, 8, 8)) == "ew"
    assert pick(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), x=torch.zeros(1, 3)) == "ew"
