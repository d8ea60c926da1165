"""check_dp_model: what auto accepts is exact, what it cannot handle is refused before a charge."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from torch import nn

from fedmeta.data.tasks.base import Pool, SampleMSELoss
from fedmeta.privacy.bookkeeping import BookKeepingClipper
from fedmeta.privacy.dp_training import DPSettings, train_steps
from fedmeta.privacy.model_check import DPModelError, check_dp_model

CE = nn.CrossEntropyLoss()
CLASSES = 3


# ---- a per-example reference -----------------------------------------------------
def loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=CE):
    """Per-sample gradients by a plain loop over records: name -> [B, *shape]."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = [
        torch.autograd.grad(
            loss_fn(model(x[i : i + 1]), y[i : i + 1]), [p for _, p in named], allow_unused=True
        )
        for i in range(len(x))
    ]
    return {
        n: torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
        for j, (n, p) in enumerate(named)
    }


def norms_of(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)


def clipped_sum(grads: dict[str, torch.Tensor], clip: float, keep=None):
    factor = (clip / (norms_of(grads) + 1e-6)).clamp(max=1.0)
    if keep is not None:
        factor = factor * keep
    return {n: torch.einsum("b,b...->...", factor, g) for n, g in grads.items()}


def bk_clipped(model: nn.Module, x, y, clip: float):
    """(per-sample norms, {name: clipped sum}) from book-keeping clipping on a copy."""
    twin = copy.deepcopy(model)
    clipper = BookKeepingClipper(twin, clip)
    try:
        norms = clipper.backward(CE(twin(x), y) * len(x))
    finally:
        clipper.close()
    return norms, {n: p.grad for n, p in twin.named_parameters()}


def opacus_norms(model: nn.Module, x, y, mode: str) -> torch.Tensor:
    twin = copy.deepcopy(model)
    named = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    if mode == "hooks":
        gsm = GradSampleModule(twin, loss_reduction="sum")
        nn.CrossEntropyLoss(reduction="sum")(gsm(x), y).backward()
        out = {n: p.grad_sample for n, p in named}
        gsm._close()
        return norms_of(out)
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    out_fn = call_for_per_sample_grads(twin, batch_size=len(x), loss_reduction="sum")
    nn.CrossEntropyLoss(reduction="sum")(out_fn(x), y).backward()
    return norms_of({n: p.grad_sample for n, p in named})


# ---- random stacks -------------------------------------------------------------------
@st.composite
def stacks(draw):
    """(model, input batch, whether bk must not be chosen) over small random stacks."""
    image = draw(st.booleans())
    layers: list[nn.Module] = []
    risky: list[nn.Module] = []  # layers book-keeping cannot handle if they are trainable
    c, h = draw(st.integers(1, 2)), draw(st.integers(3, 5))
    shape: tuple[int, ...] = (c, h, h) if image else (draw(st.integers(2, 5)),)

    def act():
        kind = draw(st.sampled_from(["relu", "tanh", "inplace", "none"]))
        if kind == "inplace":  # overwrites the output of the layer before it
            risky.append(layers[-1])
            return [nn.ReLU(inplace=True)]
        return {"relu": [nn.ReLU()], "tanh": [nn.Tanh()], "none": []}[kind]

    if image:
        size = h
        for _ in range(draw(st.integers(1, 2))):
            out = draw(st.integers(1, 3)) * (2 if c == 2 else 1)
            padding = draw(st.sampled_from([0, 1, "same", "valid"]))
            k = draw(st.integers(1, 3 if padding in (1, "same") else min(3, size)))
            groups = 2 if c == 2 and out % 2 == 0 and draw(st.booleans()) else 1
            reflect = padding == 1 and size >= 2
            mode = draw(st.sampled_from(["zeros", "reflect"])) if reflect else "zeros"
            layers.append(
                nn.Conv2d(
                    c,
                    out,
                    k,
                    padding=padding,
                    groups=groups,
                    padding_mode=mode,
                    bias=draw(st.booleans()),
                )
            )
            if groups != 1:
                risky.append(layers[-1])
            layers += act()
            c = out
            size = (
                size + 2 - k + 1 if padding == 1 else (size if padding == "same" else size - k + 1)
            )
        layers.append(nn.Flatten())
    width = _flat_width(layers, shape) if image else shape[0]
    if draw(st.booleans()):
        hidden = nn.Linear(width, width, bias=draw(st.booleans()))
        layers.append(hidden)
        layers += act()
        if draw(st.booleans()):  # the same layer again: book-keeping cannot do that
            layers += [hidden, nn.Tanh()]
            risky.append(hidden)
    layers.append(nn.Linear(width, CLASSES, bias=draw(st.booleans())))
    torch.manual_seed(draw(st.integers(0, 1000)))
    model = nn.Sequential(*layers)
    for p in model.parameters():  # random frozen masks, at least one tensor trainable
        p.requires_grad_(draw(st.booleans()))
    if not any(p.requires_grad for p in model.parameters()):
        model[-1].weight.requires_grad_(True)
    batch = draw(st.integers(2, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    x = torch.randn(batch, *shape, generator=gen) * 2
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    return model, x, y, any(p.requires_grad for m in risky for p in m.parameters())


def _flat_width(layers: list[nn.Module], shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        probe = nn.Sequential(*copy.deepcopy(layers))
        return int(probe(torch.zeros(1, *shape)).shape[1])


@pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=stacks(), clip=st.sampled_from([0.05, 0.5, 50.0]))
def test_auto_accepts_only_what_it_computes_exactly(case, clip):
    model, x, y, risky = case
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    try:
        mode = check_dp_model(model, CE, "auto", x[:1])
    except DPModelError as exc:  # refused: one line, before anything ran
        assert "\n" not in str(exc)
        return
    ref = loop_grads(model, x, y)
    if mode != "bk":
        assert mode in ("hooks", "ew")
        torch.testing.assert_close(
            opacus_norms(model, x, y, mode), norms_of(ref), rtol=1e-3, atol=1e-5
        )
        return
    assert not risky, "auto chose book-keeping for a stack it cannot handle"
    norms, got = bk_clipped(model, x, y, clip)
    torch.testing.assert_close(norms, norms_of(ref), rtol=1e-4, atol=1e-5)
    want = clipped_sum(ref, clip)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
        else:  # frozen: no gradient, not moved
            assert got[n] is None and torch.equal(p.detach(), frozen[n])
    # add/remove one record: the noiseless clipped sum moves by at most C
    for j in range(len(x)):
        keep = torch.ones(len(x))
        keep[j] = 0.0
        _, without = bk_clipped(model, x[keep.bool()], y[keep.bool()], clip)
        diff = torch.cat([(got[n] - without[n]).flatten() for n in want])
        assert float(diff.norm()) <= clip * (1 + 1e-4) + 1e-6


# ---- named cases ---------------------------------------------------------------------
class LinearPlus(nn.Linear):
    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return super().forward(x) * self.scale


class ParentParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.layer(x) * self.gain


class Counter(nn.Module):
    def __init__(self, changes: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.changes = changes
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        if self.changes:
            self.seen += len(x)
        return self.layer(x)


def pick(model, loss=CE, mode="auto", x=None):
    return check_dp_model(model, loss, mode, torch.zeros(1, 4) if x is None else x)


def test_routes_what_book_keeping_cannot_do_to_a_correct_opacus_mode():
    shared = nn.Linear(4, 4)
    assert pick(nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))) != "bk"
    assert pick(nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3))) != "bk"
    assert pick(nn.Sequential(LinearPlus(4, 3))) == "hooks"
    assert pick(ParentParam()) == "hooks"
    grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten(), nn.Linear(8, 3))
    assert pick(grouped, x=torch.zeros(1, 2, 2, 2)) == "ew"
    for padding in ("same", "valid"):  # supported by book-keeping
        conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=padding), nn.Flatten(), nn.LazyLinear(3))
        conv(torch.zeros(1, 1, 4, 4))
        assert pick(conv, x=torch.zeros(1, 1, 4, 4)) == "bk"


def test_an_explicit_bk_request_it_cannot_honour_is_an_error():
    with pytest.raises(DPModelError, match="book-keeping clipping: .*in-place"):
        pick(nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)), mode="bk")
    with pytest.raises(DPModelError, match="LinearPlus"):
        pick(nn.Sequential(LinearPlus(4, 3)), mode="bk")
    with pytest.raises(DPModelError, match="grad-sample-mode"):
        pick(nn.Linear(4, 3), mode="fast")


@pytest.mark.parametrize(
    "norm",
    [
        nn.BatchNorm1d(3),
        nn.BatchNorm1d(3, affine=False),
        nn.BatchNorm1d(3, track_running_stats=False),
    ],
)
def test_batchnorm_in_any_form_is_refused_with_the_fix(norm):
    model = nn.Sequential(nn.Linear(4, 3), norm)
    norm.requires_grad_(False)
    with pytest.raises(DPModelError, match="BatchNorm1d.*GroupNorm or LayerNorm"):
        pick(model)


def test_training_time_buffers_are_refused_constant_ones_are_not():
    tracked = nn.Sequential(
        nn.Unflatten(1, (1, 2, 2)),
        nn.Conv2d(1, 2, 1),
        nn.InstanceNorm2d(2, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    with pytest.raises(DPModelError, match="track_running_stats"):
        pick(tracked)
    tracked[2].track_running_stats = False
    tracked[2].running_mean = tracked[2].running_var = None
    tracked[2].num_batches_tracked = None
    assert pick(tracked) == "bk"  # per-sample normalisation without parameters
    with pytest.raises(DPModelError, match="buffer 'seen' changes"):
        pick(Counter(changes=True))
    assert pick(Counter(changes=False)) == "bk"


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        (nn.CrossEntropyLoss(weight=torch.ones(3)), "weight"),
        (nn.CrossEntropyLoss(reduction="sum"), "reduction"),
        (nn.NLLLoss(ignore_index=0), "ignore_index"),
        (nn.KLDivLoss(reduction="batchmean"), "not known"),
    ],
)
def test_losses_that_are_not_a_mean_of_per_sample_terms_are_refused(loss, match):
    with pytest.raises(DPModelError, match=match):
        pick(nn.Linear(4, 3), loss=loss)


def test_per_sample_losses_pass():
    for loss in (
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.MSELoss(),
        SampleMSELoss(),
        nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)),
    ):
        assert pick(nn.Linear(4, 3), loss=loss) == "bk"


def test_train_steps_refuses_before_building_anything():
    pool = Pool(np.zeros((8, 4), np.float32), np.zeros(8, np.int64))
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DPModelError, match="BatchNorm"):
        train_steps(model, pool, loss_fn=CE, steps=2, lr=0.1, batch_size=4, dp=DPSettings(1.0, 1.0))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_frozen_tensors_get_no_gradient_and_stay_put():
    pool = Pool(
        np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32), np.zeros(32, np.int64)
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    w0, b2 = model[0].weight.detach().clone(), model[2].bias.detach().clone()
    train_steps(
        model,
        pool,
        loss_fn=CE,
        steps=3,
        lr=0.5,
        batch_size=8,
        dp=DPSettings(1.0, 1.0, grad_sample_mode="bk"),
        seed=1,
    )
    assert torch.equal(model[0].weight, w0) and torch.equal(model[2].bias, b2)


def test_expected_batch_of_one_record_gives_finite_weights():
    """n = 49, B = 1: int(49 * (1/49)) is 0 in floating point, which made NaN weights."""
    pool = Pool(
        np.random.default_rng(0).normal(size=(49, 4)).astype(np.float32), np.zeros(49, np.int64)
    )
    for mode in ("bk", "hooks"):
        model = nn.Linear(4, 3)
        train_steps(
            model,
            pool,
            loss_fn=CE,
            steps=3,
            lr=0.1,
            batch_size=1,
            dp=DPSettings(1.0, 1.0, grad_sample_mode=mode),
            seed=0,
        )
        assert all(torch.isfinite(p).all() for p in model.parameters())
