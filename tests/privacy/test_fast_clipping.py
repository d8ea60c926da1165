"""The fast DP step (one gradient buffer, strided unfold, batched fetch) is the same DP-SGD step.

Two references on real Opacus objects:

* a hand-made step from Opacus's own per-sample gradients (``GradSampleModule``,
  hooks): each record's (or unit's) gradient clipped to C, summed, plus the noise
  Opacus's optimizer draws from the same seeded generator, divided by E[B]; on a
  pool where q = 1, so the batch is known;
* ``train_steps`` through Opacus's hooks mode (``make_private``, ``DPOptimizer``,
  ``DPDataLoader``) on the same seed: the same Poisson batches and noise draws, so
  several noisy steps must agree with book-keeping's to float rounding.

Per record and per unit; a model of Conv2d and Linear layers (book-keeping) and one
with a GroupNorm (which ``auto`` leaves to Opacus's modes).
"""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedmeta.data.tasks.base import Pool
from fedmeta.privacy.bookkeeping import BookKeepingClipper, FlatGrads
from fedmeta.privacy.dp_training import DPSettings, train_steps
from fedmeta.privacy.model_check import check_dp_model

CLIP, LR = 0.05, 0.5


def conv_linear():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(54, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def conv_groupnorm_linear():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


MODELS = {"conv+linear": conv_linear, "conv+groupnorm+linear": conv_groupnorm_linear}


def pool(n, units_of=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=n).astype(np.int64)
    return Pool(x, y, units_of)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def reference_step(model, data: Pool, sigma, seed):
    """One DP-SGD step over the whole pool from Opacus's per-sample gradients (q = 1)."""
    gsm = GradSampleModule(model)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    nn.CrossEntropyLoss(reduction="sum")(gsm(x), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = [p.grad_sample for p in params]
    if data.units is not None:  # a unit's gradient is the sum of its records'
        _, unit = np.unique(data.units, return_inverse=True)
        index = torch.from_numpy(unit.reshape(-1))
        n_units = int(index.max()) + 1
        per_sample = [
            g.new_zeros((n_units, *g.shape[1:])).index_add_(0, index, g) for g in per_sample
        ]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample]).norm(dim=0)
    factor = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    noise = torch.Generator().manual_seed(seed + 1)  # Opacus's optimizer, in its order
    expected = len(norms)  # q = 1: every unit in the batch
    new = []
    for p, g in zip(params, per_sample, strict=True):
        clipped = torch.einsum("b,b...->...", factor, g)
        noisy = clipped + torch.normal(0.0, sigma * CLIP, p.shape, generator=noise)
        new.append(p.detach() - LR * noisy / expected)
    gsm._close()
    return torch.cat([t.flatten() for t in new]), float(norms.max())


@pytest.mark.parametrize("per_unit", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_one_step_equals_opacus_per_sample_clipping_and_noise(name, per_unit, sigma):
    data = pool(12, np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6, 7]) if per_unit else None)
    torch.manual_seed(0)
    model, twin = MODELS[name](), MODELS[name]()
    twin.load_state_dict(model.state_dict())
    expected, largest = reference_step(twin, data, sigma, seed=5)
    assert largest > CLIP  # clipping is active
    n = 8 if per_unit else 12  # E[B] = every unit: q = 1, the batch is the whole pool
    res = train_steps(
        model,
        data,
        loss_fn=nn.CrossEntropyLoss(),
        steps=1,
        lr=LR,
        batch_size=n,
        dp=DPSettings(sigma, CLIP),
        seed=5,
    )
    assert res.dp_step == (sigma, 1.0, 1) and res.examples_used == 12
    torch.testing.assert_close(flat(model), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_unit", [False, True])
def test_bookkeeping_matches_opacus_hooks_over_noisy_poisson_steps(per_unit):
    """The same seed draws the same Poisson batches and noise in both; only the clipping
    route differs (book-keeping into one buffer vs Opacus's per-sample hooks)."""
    units = np.arange(60) // 3 if per_unit else None
    data = pool(60, units, seed=1)
    example = torch.from_numpy(data.x[:1])
    assert check_dp_model(conv_linear(), nn.CrossEntropyLoss(), "auto", example) == "bk"

    def run(mode):
        torch.manual_seed(0)
        model = conv_linear()
        res = train_steps(
            model,
            data,
            loss_fn=nn.CrossEntropyLoss(),
            steps=5,
            lr=LR,
            batch_size=4,
            dp=DPSettings(1.0, CLIP, grad_sample_mode=mode),
            seed=3,
        )
        return flat(model), res

    (fast, r_fast), (ref, r_ref) = run("bk"), run("hooks")
    assert r_fast.examples_used == r_ref.examples_used > 0
    assert r_fast.dp_step == r_ref.dp_step
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_groupnorm_model_is_left_to_opacus_and_still_matches():
    example = torch.zeros(1, 1, 8, 8)
    mode = check_dp_model(conv_groupnorm_linear(), nn.CrossEntropyLoss(), "auto", example)
    assert mode in ("ew", "hooks")  # book-keeping does not derive GroupNorm's gradients


def test_flat_buffer_holds_the_clipped_sums_and_refills_each_step():
    torch.manual_seed(0)
    model = conv_linear()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = FlatGrads(params)
    clipper = BookKeepingClipper(model, CLIP, grads)
    twin = conv_linear()
    twin.load_state_dict(model.state_dict())
    plain = BookKeepingClipper(twin, CLIP)  # a fresh tensor per gradient
    x, y = torch.from_numpy(pool(6).x), torch.from_numpy(pool(6).y)
    for _ in range(2):  # the second step overwrites the buffer, never accumulates
        for m, c in ((model, clipper), (twin, plain)):
            c.backward(nn.CrossEntropyLoss(reduction="sum")(m(x), y))
        assert grads.holds([p.grad for p in params])
        for p, q in zip(params, twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    clipper.close()
    plain.close()
