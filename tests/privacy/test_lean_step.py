"""The cheaper pieces of a DP round compute exactly what they replace.

* the unit sampler's batch labels are ``batch_units`` of the drawn records' units;
* the wide unfold of a stride-1 conv gives the same per-sample gradients as the
  plain unfold, for every padding, dilation and kernel shape;
* the flat DP step is Opacus's step (the same noise draws and parameter update, one
  accountant step each), refuses to noise a clipped sum twice, and is not used where
  it would differ (a site's CSPRNG, momentum); its noise, drawn for several tensors at
  once where torch's draw allows it, is the per-tensor draw bit for bit;
* the epsilon search over half the grid returns what Opacus's full search returns.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fedmeta.privacy import budget
from fedmeta.privacy.bookkeeping import (
    BookKeepingClipper,
    BookKeepingDPOptimizer,
    FlatGrads,
    _unfold,
    _unfold_wide,
    noise_groups,
)
from fedmeta.privacy.noise import SiteRandomness, use_site_noise
from fedmeta.privacy.units import UnitPoissonSampler, batch_units, torch_draw, unit_index


@settings(max_examples=40, deadline=None)
@given(
    units=st.lists(st.integers(0, 12), min_size=1, max_size=40),
    batch=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_sampler_labels_are_batch_units_of_the_drawn_records(units, batch, seed):
    unit_of, n_units = unit_index(np.array(units), len(units))
    q = budget.poisson_rate(n_units, min(batch, n_units))

    def sampler():
        return UnitPoissonSampler(
            unit_of, n_units, q, torch_draw(torch.Generator().manual_seed(seed))
        )

    plain = list(sampler())
    labelled = list(sampler().batches())
    assert len(plain) == len(labelled)
    for records, (got, labels, n_batch) in zip(plain, labelled, strict=True):
        assert got.tolist() == records  # the same draws, the same batch
        want, want_n = batch_units(torch.from_numpy(unit_of[got]))
        assert n_batch == want_n
        if labels is None:  # every unit drew one record: clipped per record
            assert n_batch == len(records)
        else:
            assert labels.tolist() == want.tolist()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.sampled_from([0, 1, 2, "same"]),
    dilation=st.integers(1, 2),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    size=st.tuples(st.integers(5, 9), st.integers(5, 9)),
    channels=st.tuples(st.integers(1, 3), st.integers(1, 4)),
)
def test_wide_unfold_gives_the_per_sample_gradients_of_the_plain_unfold(
    kernel, padding, dilation, mode, size, channels
):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels[0], channels[1], kernel, padding=padding, dilation=dilation)
    conv.padding_mode = mode
    a = torch.randn(4, channels[0], *size)
    try:
        z = conv(a)
    except RuntimeError:  # e.g. reflect padding wider than the input
        return
    dz = torch.randn_like(z)
    plain = torch.bmm(dz.reshape(4, channels[1], -1), _unfold(conv, a).transpose(1, 2))
    unfolded, dz_wide = _unfold_wide(conv, a, dz)
    wide = torch.bmm(dz_wide, unfolded.transpose(1, 2))
    torch.testing.assert_close(wide, plain, rtol=1e-5, atol=1e-5)


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
    x = torch.randn(5, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    return model, x, y


def dp_optimizer(model, lr=0.3, momentum=0.0, seed=7):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = FlatGrads(params)
    opt = BookKeepingDPOptimizer(
        torch.optim.SGD(params, lr=lr, momentum=momentum),
        noise_multiplier=1.3,
        max_grad_norm=0.5,
        expected_batch_size=4,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(seed),
        grads=grads,
    )
    steps = []
    opt.attach_step_hook(lambda o: steps.append(o.noise_multiplier))
    return opt, grads, steps


def test_flat_step_is_opacus_step():
    """Two optimizers on twin models, one through Opacus's ``step`` and one through
    ``flat_step``: the same noise, scaling, accountant step and update."""
    results = []
    for lean in (False, True):
        model, x, y = model_and_batch()
        opt, grads, steps = dp_optimizer(model)
        clipper = BookKeepingClipper(model, 0.5, grads)
        for _ in range(3):
            if lean:  # noise first, the clipped sum added to it
                opt.begin_flat_step()
            else:
                opt.zero_grad(set_to_none=True)
            clipper.backward(nn.CrossEntropyLoss(reduction="sum")(model(x), y))
            opt.flat_step() if lean else opt.step()
        clipper.close()
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), steps))
    (ref, ref_steps), (got, got_steps) = results
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    assert got_steps == ref_steps == [1.3] * 3


def test_flat_step_refuses_to_noise_a_sum_twice_and_is_kept_for_plain_sgd():
    model, x, y = model_and_batch()
    opt, grads, _ = dp_optimizer(model)
    assert opt.can_flat_step()
    clipper = BookKeepingClipper(model, 0.5, grads)
    opt.begin_flat_step()
    clipper.backward(nn.CrossEntropyLoss(reduction="sum")(model(x), y))
    assert all(p.grad is None for p in model.parameters())  # the sum is only in the buffer
    opt.flat_step()
    with pytest.raises(RuntimeError, match="no new noisy clipped gradient sum"):
        opt.flat_step()
    opt.begin_flat_step()
    with pytest.raises(RuntimeError, match="no new noisy clipped gradient sum"):
        opt.flat_step()  # noise drawn, but no clipped sum added to it
    before = grads.buffer.clone()
    grads.empty_batch()  # an empty Poisson batch: the step is its noise only
    torch.testing.assert_close(grads.buffer, before, rtol=0, atol=0)
    opt.flat_step()
    clipper.close()
    momentum, _, _ = dp_optimizer(model_and_batch()[0], momentum=0.9)
    assert not momentum.can_flat_step()
    site, _, _ = dp_optimizer(model_and_batch()[0])
    use_site_noise(site, SiteRandomness(b"s" * 32, "run", 1))
    assert not site.can_flat_step()  # the CSPRNG path keeps Opacus's step


@pytest.mark.parametrize("steps", [1, 40, 400])
def test_epsilon_search_from_the_middle_is_opacus_search(steps):
    history = ((1.1, 0.02, steps),)
    acc = budget.BoundedPRVAccountant(steps)
    acc.history = list(history)
    delta, eps_error = 1e-5, 0.01
    dprv = acc._get_dprv(eps_error=eps_error, delta_error=delta / 1000)
    _, _, opacus_upper = dprv.compute_epsilon(delta, delta / 1000, eps_error)
    ours = budget._upper_epsilon(dprv, acc._grid, acc._shift, delta, delta / 1000, eps_error)
    assert math.isclose(ours, opacus_upper, rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(1, 40), st.sampled_from([16, 32, 48, 144, 320, 4608])),
        min_size=1,
        max_size=8,
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_grouped_noise_draws_are_the_per_tensor_draws(sizes, dtype, seed):
    """One normal_ call per group fills the buffer exactly as one call per tensor (Opacus's
    draw) does, and leaves the generator where the per-tensor calls leave it."""
    per_tensor = torch.Generator().manual_seed(seed)
    want = [torch.empty(n, dtype=dtype).normal_(0.0, 1.7, generator=per_tensor) for n in sizes]
    buffer = torch.empty(sum(sizes), dtype=dtype)
    grouped = torch.Generator().manual_seed(seed)
    draws = noise_groups(buffer, sizes)
    assert sum(d.numel() for d in draws) == buffer.numel()
    for d in draws:
        d.normal_(0.0, 1.7, generator=grouped)
    assert torch.equal(buffer, torch.cat(want))
    assert torch.equal(torch.rand(4, generator=grouped), torch.rand(4, generator=per_tensor))
    if all(n >= 16 and n % 16 == 0 for n in sizes[:-1]) and sizes[-1] >= 16:
        assert len(draws) == 1  # the site models' case: one call for every tensor


def test_a_released_buffer_serves_the_next_training_and_changes_nothing():
    """A site trains a model of the same shape every round: the flat gradient buffer of
    one training is handed to the next (``FlatGrads.release``), never to two at once,
    and a training on a handed-on buffer ends where one on a new buffer ends."""
    from fedmeta.data.tasks.base import Pool
    from fedmeta.privacy import bookkeeping
    from fedmeta.privacy.dp_training import DPSettings, train_steps

    rng = np.random.default_rng(5)
    pool = Pool(rng.normal(size=(60, 6)).astype(np.float32), rng.integers(0, 3, 60))

    def train() -> list[torch.Tensor]:
        torch.manual_seed(7)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        train_steps(
            model,
            pool,
            loss_fn=nn.CrossEntropyLoss(),
            steps=6,
            lr=0.2,
            batch_size=10,
            dp=DPSettings(1.0, 0.5, grad_sample_mode="bk"),
            seed=3,
        )
        return [p.detach().clone() for p in model.parameters()]

    bookkeeping._RELEASED.clear()
    fresh = train()  # on a new buffer, released at the end
    assert len(bookkeeping._RELEASED) == 1
    (held,) = bookkeeping._RELEASED.values()
    held[0].fill_(float("nan"))  # whatever the last training left there
    again = train()  # on the released one
    for a, b in zip(fresh, again, strict=True):
        assert torch.equal(a, b)
    params = [torch.zeros(4, requires_grad=True), torch.zeros(2, requires_grad=True)]
    first, second = FlatGrads(params), FlatGrads(params)
    assert first.buffer.data_ptr() != second.buffer.data_ptr()  # one owner at a time
    first.release()
    assert FlatGrads(params).buffer.data_ptr() == first.buffer.data_ptr()
