"""FOMAML's site update: theta - s * (gradient at the adapted weights on held-out records)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeta.config import ConfigError, RunConfig, build_task, run_declaration
from fedmeta.data.tasks.base import Pool
from fedmeta.meta.fomaml import fomaml_site_update, split_episode
from fedmeta.meta.reptile import reptile_update
from fedmeta.privacy.dp_training import train_steps
from fedmeta.site import Site, round_seed

CFG = RunConfig(
    strategy="fomaml", dp=False, sites=3, inner_steps=3, n_way=5, inner_lr=0.2, batch_size=20
)


def _pool(n_per_class: int = 6, classes: int = 5) -> Pool:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), n_per_class).astype(np.int64)
    return Pool(rng.random((len(y), 1, 8, 8), dtype=np.float32), y, np.arange(len(y)) // 2)


def test_split_keeps_every_class_on_both_sides_and_loses_nothing() -> None:
    pool = _pool()
    support, held = split_episode(pool, np.random.default_rng(1))
    assert set(support.y) == set(held.y) == set(range(5))
    both = np.concatenate([support.units, held.units])
    assert sorted(both) == sorted(pool.units)  # disjoint, nothing dropped
    assert len(held.y) == len(support.y) == 15
    with pytest.raises(ValueError, match="2 records per class"):
        split_episode(Pool(pool.x[:6], np.arange(6)), np.random.default_rng(1))


def test_reply_is_theta_minus_scaled_held_out_gradient_at_adapted_weights() -> None:
    task = build_task(CFG)
    torch.manual_seed(0)
    model = task.build_model(5)
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    pool = _pool()
    reply, result = fomaml_site_update(
        model,
        pool,
        np.random.default_rng(7),
        loss_fn=task.loss_fn(),
        steps=3,
        lr=0.2,
        batch_size=20,
        seed=11,
    )
    assert result.steps == 3
    # the same thing by hand: adapt on the support part, differentiate on the held-out part
    support, held = split_episode(pool, np.random.default_rng(7))
    ref = task.build_model(5)
    ref.load_state_dict(theta)
    train_steps(
        ref, support, loss_fn=task.loss_fn(), steps=3, lr=0.2, batch_size=20, dp=None, seed=11
    )
    loss = task.loss_fn()(ref(torch.from_numpy(held.x)), torch.from_numpy(held.y))
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (name, _), g in zip(ref.named_parameters(), grads, strict=True):
        torch.testing.assert_close(reply[name], theta[name] - 0.6 * g)
    assert any(not torch.equal(reply[k], theta[k]) for k in theta)


def test_server_step_over_fomaml_replies_is_outer_sgd() -> None:
    # Reptile's step theta + beta * mean(phi - theta) on phi = theta - s g is theta - beta s mean g
    theta = [np.ones(3), np.zeros(2)]
    grads = [[np.array([1.0, 2, 3]), np.array([1.0, -1])], [np.array([3.0, 2, 1]), np.zeros(2)]]
    phis = [[t - 0.5 * g for t, g in zip(theta, gs, strict=True)] for gs in grads]
    out = reptile_update(theta, phis, [1.0, 1.0], beta=0.4)
    np.testing.assert_allclose(out[0], 1 - 0.4 * 0.5 * np.array([2.0, 2, 2]))
    np.testing.assert_allclose(out[1], -0.4 * 0.5 * np.array([0.5, -0.5]))


def test_a_site_round_under_fomaml_replies_theta_minus_gradient(tmp_path) -> None:
    task = build_task(CFG)
    torch.manual_seed(0)
    theta = task.build_model(5).state_dict()
    site = Site("site-1", 1, tmp_path, CFG)
    reply = site.train_round(theta, "run-1", 1, run_declaration(CFG))
    assert not reply.declined and not reply.dp and reply.steps == CFG.inner_steps
    assert set(reply.state) == set(theta)
    # the same episode and split the site drew, rebuilt from the round's seed
    rng = np.random.default_rng(round_seed(CFG.seed, 1, 1))
    pool = site.pool(site.records, rng)
    model = task.build_model(5)
    model.load_state_dict(theta)
    expected, _ = fomaml_site_update(
        model,
        pool,
        rng,
        loss_fn=task.loss_fn(),
        steps=3,
        lr=0.2,
        batch_size=20,
        seed=round_seed(CFG.seed, 1, 1),
    )
    for k in theta:
        torch.testing.assert_close(reply.state[k], expected[k])


def test_fomaml_under_dp_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="fomaml is non-private only") as err:
        RunConfig.from_flat({"strategy": "fomaml", "dp": True})
    assert "\n" not in str(err.value)
