"""Privacy per unit: a unit's records are sampled together and clipped as one (real Opacus).

The reference is a per-unit loop: for each unit, the gradient of the *sum* of
its records' losses (one autograd call per unit), clipped to C, summed.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fedmeta.data.tasks.base import Pool
from fedmeta.privacy.bookkeeping import BookKeepingClipper
from fedmeta.privacy.budget import poisson_rate
from fedmeta.privacy.dp_training import DPSettings, train_steps
from fedmeta.privacy.noise import SiteRandomness
from fedmeta.privacy.units import UnitError, UnitPoissonSampler, check_mode, torch_draw, unit_index

CLIP = 0.5
MODES = ["bk", "hooks", "ew"]


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, 1, 5, 5)).astype(np.float32) * 3,
        rng.integers(0, 3, size=n).astype(np.int64),
    )


def unit_loop(
    model: nn.Module, x: np.ndarray, y: np.ndarray, units: np.ndarray, clip: float
) -> dict[str, torch.Tensor]:
    """sum over units of clip(grad of the unit's summed loss), one autograd call per unit."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for u in np.unique(units):
        idx = np.flatnonzero(units == u)
        model.zero_grad()
        loss_fn(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for n, g in grads.items():
            total[n] += factor * g
    return total


def noiseless_sum(
    mode: str, x: np.ndarray, y: np.ndarray, units: np.ndarray, clip: float = CLIP
) -> dict[str, torch.Tensor]:
    """The clipped sum one full-batch (q = 1) noiseless DP-SGD step of ``train_steps`` applied,
    recovered from the update: delta = -lr * sum / E[B], E[B] = number of units."""
    model = cnn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_units = len(np.unique(units))
    lr = 1.0
    result = train_steps(
        model,
        Pool(x, y, units),
        loss_fn=nn.CrossEntropyLoss(),
        steps=1,
        lr=lr,
        batch_size=n_units,
        dp=DPSettings(0.0, clip, grad_sample_mode=mode),
        seed=0,
    )
    assert result.examples_used == len(x)  # q = 1: every unit, every record
    return {n: (before[n] - p.detach()) * n_units / lr for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
def test_per_unit_clipped_sum_equals_a_per_unit_loop(mode):
    x, y = data(14)
    units = np.array([7, 7, 7, 3, 3, 9, 1, 1, 1, 1, 5, 2, 2, 8])  # sizes 1..4, unsorted ids
    got = noiseless_sum(mode, x, y, units)
    ref = unit_loop(cnn(), x, y, units, CLIP)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5)
    # per-record clipping differs: the test can tell units from records
    per_record = unit_loop(cnn(), x, y, np.arange(14), CLIP)
    assert not all(torch.allclose(per_record[n], ref[n], atol=1e-4) for n in ref)


def test_bookkeeping_per_unit_norms_equal_the_loop_on_a_linear_stack():
    """The Gram-matrix path (rank-one Linear layers) against materialised unit gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    model[0].bias.requires_grad_(False)  # a frozen tensor counts in no norm
    x = torch.randn(9, 6)
    y = torch.randint(0, 4, (9,))
    units = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, 4])
    clipper = BookKeepingClipper(model, max_grad_norm=1e9)
    loss = nn.CrossEntropyLoss(reduction="sum")(model(x), y)
    norms = clipper.backward(loss, units, 5)
    clipper.close()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for u in range(5):
        model.zero_grad()
        nn.CrossEntropyLoss(reduction="sum")(model(x[units == u]), y[units == u]).backward()
        ref = torch.sqrt(sum((p.grad * p.grad).sum() for p in trainable))
        assert float(norms[u]) == pytest.approx(float(ref), rel=1e-5)
    assert model[0].bias.grad is None


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 10),
    n_units=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["bk", "hooks"]),
    data_=st.data(),
)
def test_adding_or_removing_one_unit_moves_the_noiseless_sum_by_at_most_c(
    n, n_units, seed, mode, data_
):
    units = np.array(data_.draw(st.lists(st.integers(0, n_units - 1), min_size=n, max_size=n)))
    x, y = data(n, seed)
    drop = data_.draw(st.sampled_from(sorted(set(units.tolist()))))
    keep = units != drop
    full = noiseless_sum(mode, x, y, units)
    if keep.any():
        without = noiseless_sum(mode, x[keep], y[keep], units[keep])
    else:
        without = {k: torch.zeros_like(v) for k, v in full.items()}
    diff = torch.sqrt(sum(((full[k] - without[k]) ** 2).sum() for k in full))
    assert float(diff) <= CLIP * (1 + 1e-4)


def _check_whole_units(batches: list[list[int]], unit_of: np.ndarray) -> np.ndarray:
    counts = np.zeros(unit_of.max() + 1)
    for batch in batches:
        chosen = np.unique(unit_of[batch])
        assert sorted(batch) == np.flatnonzero(np.isin(unit_of, chosen)).tolist()
        counts[chosen] += 1
    return counts


@pytest.mark.parametrize("source", ["seeded", "site-csprng"])
def test_units_are_sampled_together_at_the_charged_rate(source):
    rng = np.random.default_rng(0)
    raw_units = rng.integers(0, 60, size=200) * 7 + 1000  # 200 records of <= 60 units
    unit_of, n_units = unit_index(raw_units, len(raw_units))
    q = poisson_rate(n_units, 6)
    draw = (
        torch_draw(torch.Generator().manual_seed(0))
        if source == "seeded"
        else SiteRandomness(b"k" * 32, "run", 1).sampling.uniforms
    )
    sampler = UnitPoissonSampler(unit_of, n_units, q, draw)
    batches = [b for _ in range(40) for b in sampler]
    counts = _check_whole_units(batches, unit_of)
    mean, sd = len(batches) * q, np.sqrt(len(batches) * q * (1 - q))
    assert abs(counts.mean() - mean) < 4 * sd / np.sqrt(n_units)
    assert any(len(np.unique(unit_of[b])) < len(b) for b in batches)  # multi-record units


def test_train_steps_samples_whole_units_and_records_the_unit_rate():
    """Through the real trainer: every batch is a union of whole units; Opacus's accountant
    records q = 1/ceil(U/B) over units, not records."""
    x, y = data(40)
    units = np.repeat(np.arange(10), 4)
    seen: list[np.ndarray] = []
    model = cnn()

    def spy(module, args):
        if module is model:  # not the model check's copy
            inp = args[0]
            seen.append(inp.detach().reshape(len(inp), -1)[:, 0].numpy().copy())

    model.register_forward_pre_hook(spy)
    result = train_steps(
        model,
        Pool(x, y, units),
        loss_fn=nn.CrossEntropyLoss(),
        steps=12,
        lr=0.1,
        batch_size=3,
        dp=DPSettings(1.0, 1.0, grad_sample_mode="hooks"),
        seed=4,
    )
    assert result.dp_step == (1.0, poisson_rate(10, 3), 12) == (1.0, 0.25, 12)
    first = x.reshape(40, -1)[:, 0]
    assert len(seen) >= 8  # batches can be empty (Poisson), most are not
    for batch in seen:
        rows = [int(np.flatnonzero(first == v)[0]) for v in batch]
        chosen = np.unique(units[rows])
        assert sorted(rows) == np.flatnonzero(np.isin(units, chosen)).tolist()


def test_ghost_clipping_is_refused_with_units_before_anything_runs():
    with pytest.raises(UnitError, match="ghost.*'auto', 'bk', 'hooks' or 'ew'"):
        check_mode("ghost")
    x, y = data(8)
    with pytest.raises(UnitError, match="ghost"):
        train_steps(
            cnn(),
            Pool(x, y, np.arange(8) // 2),
            loss_fn=nn.CrossEntropyLoss(),
            steps=1,
            lr=0.1,
            batch_size=2,
            dp=DPSettings(1.0, 1.0, grad_sample_mode="ghost"),
        )


def test_without_units_each_record_is_its_own_unit():
    inverse, n = unit_index(None, 5)
    assert n == 5 and inverse.tolist() == [0, 1, 2, 3, 4]
    inverse, n = unit_index(np.array(["b", "a", "b"]), 3)
    assert n == 2 and inverse.tolist() == [1, 0, 1]


def test_the_report_states_the_unit_and_group_privacy_for_records():
    from fedmeta.report.privacy import group_privacy_note, unit_label

    assert unit_label("record").startswith("one record")
    assert unit_label("patient_id").startswith("one patient_id (unit-level")
    note = group_privacy_note("record", 2.0, 1e-5)
    assert "k records" in note and "k-fold" in note and "(k = 4 gives 8)" in note
    assert group_privacy_note("image", 2.0, 1e-5) == ""
