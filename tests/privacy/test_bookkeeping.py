"""Book-keeping clipping gives exactly the clipped per-sample gradient sum Opacus computes."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedmeta.data.tasks.base import Pool
from fedmeta.privacy.bookkeeping import BookKeepingClipper, BookKeepingError, unsupported_reason
from fedmeta.privacy.dp_training import DPSettings, train_steps
from fedmeta.privacy.model_check import DPModelError


class TokenModel(nn.Module):
    """A Linear layer applied to a sequence ([B, T, d]) and an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.unused = nn.Linear(3, 3)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)).mean(1))


def reference_clipped_sum(model, x, y, loss_fn, clip):
    """Per-sample gradients from Opacus's hooks, clipped and summed by hand."""
    gsm = GradSampleModule(model)
    loss_fn(gsm(x), y).backward()
    params = [p for p in model.parameters() if p.grad_sample is not None]
    per_sample = [p.grad_sample for p in params]  # Opacus rescales a mean loss per sample
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample]).norm(dim=0)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    out = {
        id(p): torch.einsum("b,b...->...", factor, g)
        for p, g in zip(params, per_sample, strict=True)
    }
    gsm._close()
    return out, norms


CASES = {
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, dilation=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(24, 5),
        ),
        lambda g: torch.rand(7, 2, 6, 6, generator=g),
        5,
    ),
    "dilated": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, dilation=2, bias=False), nn.Flatten(), nn.Linear(48, 4)
        ),
        lambda g: torch.rand(5, 1, 8, 8, generator=g),
        4,
    ),
    "sequence": (TokenModel, lambda g: torch.randn(6, 4, 6, generator=g), 3),
}


def batch_and_twins(case: str, data_seed: int, model_seed: int):
    """(x, y, a model of ``case``, its twin with the same weights)."""
    build, make_x, classes = CASES[case]
    g = torch.Generator().manual_seed(data_seed)
    x = make_x(g)
    y = torch.randint(0, classes, (len(x),), generator=g)
    torch.manual_seed(model_seed)
    model = build()
    twin = build()
    twin.load_state_dict(model.state_dict())
    return x, y, model, twin


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("clip", [1e-3, 0.5, 1e6])  # every sample clipped / some / none
def test_clipped_sum_equals_opacus_per_sample_clipping(case, clip):
    x, y, model, twin = batch_and_twins(case, 0, 1)
    loss_fn = nn.CrossEntropyLoss()
    expected, norms = reference_clipped_sum(twin, x, y, loss_fn, clip)
    clipper = BookKeepingClipper(model, clip)
    clipper.backward(loss_fn(model(x), y) * len(x))
    clipper.close()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        if id(q) in expected:
            torch.testing.assert_close(p.grad, expected[id(q)], rtol=1e-4, atol=1e-6)
        else:  # the unused layer: no gradient contribution, still a gradient for the optimizer
            assert torch.count_nonzero(p.grad) == 0
    if clip == 1e-3:
        assert float(norms.min()) > clip  # every sample really was clipped


def test_a_scaled_mean_loss_gives_the_multiplied_loss_numbers():
    """``scale`` starts autograd from the batch size instead of multiplying the loss by
    it: the same clipped sums and norms, bit for bit."""
    x, y, model, twin = batch_and_twins("cnn", 3, 4)
    loss_fn = nn.CrossEntropyLoss()
    multiplied, scaled = BookKeepingClipper(twin, 0.3), BookKeepingClipper(model, 0.3)
    norms_multiplied = multiplied.backward(loss_fn(twin(x), y) * len(x))
    norms_scaled = scaled.backward(loss_fn(model(x), y), scale=len(x))
    assert torch.equal(norms_scaled, norms_multiplied)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_close_gives_each_layer_its_own_forward_back():
    """The clipper keeps activations by replacing each layer's ``forward`` on the
    instance; closing it restores what was there, a forward set on the instance by
    someone else included, and the layers keep nothing afterwards."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    own = model[2].forward
    model[2].forward = lambda x: own(x) * 2.0  # an instance-level forward set before
    before = model[2].forward
    x = torch.randn(5, 3)
    expected = model(x).detach()
    clipper = BookKeepingClipper(model, 1.0)
    assert "forward" in model[0].__dict__
    torch.testing.assert_close(model(x), expected)  # the capture changes no output
    assert len(clipper._seen) == 2
    clipper.close()
    assert "forward" not in model[0].__dict__
    assert model[2].forward is before
    model(x)
    assert clipper._seen == {}
    torch.testing.assert_close(model(x), expected)
    # two clippers at once, the first closed first: the second's capture wraps the
    # first's, which stays in the chain but keeps nothing (no "ran twice" later)
    outer, inner = BookKeepingClipper(model, 1.0), BookKeepingClipper(model, 1.0)
    outer.close()
    for _ in range(2):
        torch.testing.assert_close(model(x), expected)
        assert outer._seen == {} and len(inner._seen) == 2
        inner._seen.clear()
    inner.close()
    assert "forward" in model[0].__dict__  # the first's capture, now inert
    model(x)
    model(x)
    assert outer._seen == {} and inner._seen == {}


def test_unsupported_models_are_named():
    assert "LayerNorm" in unsupported_reason(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    assert "grouped" in unsupported_reason(nn.Conv2d(2, 2, 3, groups=2))
    assert "BatchNorm1d" in unsupported_reason(
        nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False))
    )
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert "shares a parameter" in unsupported_reason(tied)
    with pytest.raises(BookKeepingError, match="LayerNorm"):
        BookKeepingClipper(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), 1.0)
    frozen = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    frozen[1].requires_grad_(False)
    assert unsupported_reason(frozen) is None


def test_a_layer_run_twice_is_refused():
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    clipper = BookKeepingClipper(model, 1.0)
    with pytest.raises(BookKeepingError, match="twice"):
        model(torch.randn(2, 3))
    clipper.close()


def test_train_steps_requires_a_mean_loss():
    pool = Pool(np.zeros((8, 2), np.float32), np.zeros(8, np.int64))
    with pytest.raises(DPModelError, match="reduction"):
        train_steps(
            nn.Linear(2, 2),
            pool,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            steps=1,
            lr=0.1,
            batch_size=4,
            dp=DPSettings(1.0, 1.0, grad_sample_mode="bk"),
        )


class CountingLoss(nn.CrossEntropyLoss):
    calls = 0

    def forward(self, out, target):
        self.calls += 1
        return super().forward(out, target)


def test_empty_poisson_batches_still_get_noise_and_are_charged():
    """Expected batch 1 (q = 1/640): about a third of 40 steps draw no record."""
    pool = Pool(
        np.random.default_rng(0).normal(size=(640, 4)).astype(np.float32), np.zeros(640, np.int64)
    )
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    loss = CountingLoss()
    res = train_steps(
        model,
        pool,
        loss_fn=loss,
        steps=40,
        lr=0.1,
        batch_size=1,
        dp=DPSettings(1.0, 1.0, grad_sample_mode="bk"),
        seed=0,
    )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert loss.calls < 40  # some batches were empty: no forward pass, yet a step
    assert res.dp_step == (1.0, 1 / 640, 40)  # every step charged
    assert not torch.equal(before, after)
