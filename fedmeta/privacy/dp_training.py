"""Local training steps, with Opacus DP-SGD by default.

``train_steps`` takes a model, a round's pool of records and a step budget and
runs exactly ``steps`` optimizer steps: DP-SGD through Opacus's
``PrivacyEngine`` (per-sample clipping to C, Gaussian noise sigma*C, Poisson
sampling at q = 1/ceil(n/B)), or plain mini-batch SGD when DP was explicitly
turned off. When the pool names privacy units (``Pool.units``), sampling is over
units and each unit's summed gradient is clipped (fedmeta.privacy.units): n and
B then count units. Noise and sampling come from the site's CSPRNG
(``DPSettings.randomness``, fedmeta.privacy.noise) or, in simulations, from
torch generators seeded with ``seed``. It returns what the ledger must record, read back from the
engine's own accountant so the ledger and Opacus can never disagree.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers.utils import params as optimizer_params
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmeta.data.tasks.base import Pool
from fedmeta.privacy.bookkeeping import (
    BookKeepingClipper,
    BookKeepingDPOptimizer,
    BookKeepingError,
    FlatGrads,
)
from fedmeta.privacy.budget import Step, expected_batch_size, poisson_rate
from fedmeta.privacy.model_check import check_dp_model
from fedmeta.privacy.noise import SiteRandomness, poisson_loader, use_site_noise
from fedmeta.privacy.units import (
    UnitPoissonSampler,
    check_mode,
    sum_grad_samples,
    torch_draw,
    unit_index,
)


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    accountant: str = "prv"
    randomness: SiteRandomness | None = None
    """The site's CSPRNG streams for noise and sampling; None: seeded from ``seed``
    (simulations only: whoever knows the seed can regenerate the noise)."""
    grad_sample_mode: str = "auto"
    checked_mode: str | None = None
    """The mode ``check_dp_model`` (and, with units, ``check_mode``) returned for the very
    model object being trained, by a caller that checked it before charging the round
    (``Site``): ``train_steps`` then does not run the check again. None: it checks."""


@dataclass(frozen=True)
class StepsResult:
    steps: int
    examples_used: int
    mean_loss: float
    dp_step: Step | None  # (sigma, q, steps) as Opacus's accountant recorded it


def dp_mode(
    model: nn.Module, loss_fn: nn.Module, grad_sample_mode: str, pool: Pool, device: str = "cpu"
) -> str:
    """The clipping mode DP-SGD trains ``model`` with on ``pool`` (``check_dp_model`` on
    one of its records; with declared units, only a mode that clips per unit): a model,
    loss or mode DP-SGD cannot train soundly raises a one-line ValueError."""
    example = torch.from_numpy(np.ascontiguousarray(pool.x[:1])).to(device)
    mode = check_dp_model(model, loss_fn, grad_sample_mode, example)
    if pool.units is not None:  # refused whenever units are declared, not by the draw
        mode = check_mode(mode)
    return mode


def _make_private_bookkeeping(
    engine: PrivacyEngine,
    model: nn.Module,
    optimizer,
    loss_fn,
    loader,
    dp: DPSettings,
    noise_gen,
    per_record: bool = True,
):
    """Opacus's Poisson loader, noise, optimizer and accountant around book-keeping clipping.

    The same pieces ``PrivacyEngine.make_private`` assembles for its ghost
    mode, minus the model wrapper: the clipped gradient sum comes from
    ``BookKeepingClipper`` instead of ghost clipping's second backward pass.
    ``per_record=False``: the caller samples over units (``_unit_loader`` sets the
    loader, the rate of the accountant's hook and E[B]); no record loader is built.
    """
    # a checked model passed check_dp_model's book-keeping rules, stricter than Opacus's
    # validator (only plain Linear/Conv2d train, no buffer changes)
    if dp.checked_mode is None:
        engine.validate(module=model, optimizer=optimizer, data_loader=loader)
    if getattr(loss_fn, "reduction", None) != "mean":
        raise BookKeepingError(
            "book-keeping clipping needs a loss averaged over the batch (reduction='mean')"
        )
    trainable = optimizer_params(optimizer)
    try:  # one gradient buffer: the noise is added and scaled in one operation each
        grads: FlatGrads | None = FlatGrads(trainable)
    except ValueError:  # parameters of several dtypes or devices: a tensor per parameter
        grads = None
    clipper = BookKeepingClipper(model, dp.max_grad_norm, grads, checked=dp.checked_mode == "bk")
    dp_loader = loader  # per unit: replaced by the caller's unit loader
    if per_record and dp.randomness is not None:
        q = poisson_rate(len(loader.dataset), loader.batch_size)
        dp_loader = poisson_loader(loader.dataset, q, dp.randomness.sampling)
    elif per_record:
        dp_loader = DPDataLoader.from_data_loader(loader, generator=engine.secure_rng)
    expected_batch = expected_batch_size(len(loader.dataset), loader.batch_size)
    dp_optimizer = BookKeepingDPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
        generator=noise_gen,
        grads=grads,
    )
    if dp.randomness is not None:
        use_site_noise(dp_optimizer, dp.randomness)
    if per_record:
        hook = engine.accountant.get_optimizer_hook_fn(dp_loader.sample_rate)
        dp_optimizer.attach_step_hook(hook)
    return clipper, dp_optimizer, dp_loader


def _batches(loader: DataLoader, tensors: list[torch.Tensor], steps: int, device: str):
    """``steps`` batches as iterating ``loader`` gives them, a pass after another:
    (x, y, each record's unit within the batch or None, the batch's number of units).

    The indices come from the loader's own batch sampler (Poisson sampling over
    records or units, or the shuffling of a plain loader), and each pass first
    makes the draw a loader's iterator makes for its workers' seed, so a seeded
    run gets the same batches as before; the records are then fetched by indexing
    the pool's tensors, one operation per tensor instead of a fetch and a collate
    per record. The unit labels are None when every unit of the batch drew one
    record (or without units): such a batch is clipped per record.
    """
    sampler = loader.batch_sampler
    by_unit = isinstance(sampler, UnitPoissonSampler)
    done = 0
    while done < steps:
        indices = sampler.batches() if by_unit else iter(sampler)
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        for index in indices:
            units, n_units = None, 0
            if by_unit:
                index, labels, n_units = index
                if labels is not None:
                    units = torch.from_numpy(labels).to(device)
            at = torch.as_tensor(index, dtype=torch.int64)
            yield tensors[0][at].to(device), tensors[1][at].to(device), units, n_units
            done += 1
            if done == steps:
                return


def train_steps(
    model: nn.Module,
    pool: Pool,
    *,
    loss_fn: nn.Module,
    steps: int,
    lr: float,
    batch_size: int,
    dp: DPSettings | None,
    device: str = "cpu",
    seed: int = 0,
) -> StepsResult:
    """Run ``steps`` optimizer steps on ``pool``; updates ``model`` in place.

    Under DP the model, loss and mode are validated first (``check_dp_model``)
    and the expected batch size must be at least one record.
    """
    torch.manual_seed(seed)
    model.to(device).train()
    mode = "none"
    unit_of, n_units = unit_index(pool.units, len(pool.x))
    # a pool whose units each hold one record is sampled and clipped per record: the same
    # mechanism (q = 1/ceil(n/B) over n = U units), without the per-unit bookkeeping
    per_unit = dp is not None and n_units < len(pool.x)
    if dp is not None and dp.checked_mode is not None:  # the caller checked this model
        mode = dp.checked_mode
    elif dp is not None:  # before anything is built: refusals are one-line errors
        mode = dp_mode(model, loss_fn, dp.grad_sample_mode, pool, device)
    if dp is not None:
        expected_batch_size(n_units, min(batch_size, n_units))
    tensors = [
        torch.from_numpy(np.ascontiguousarray(pool.x)),
        torch.from_numpy(np.ascontiguousarray(pool.y)),
    ]
    dataset = TensorDataset(*tensors)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), shuffle=dp is None, generator=gen
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    criterion = loss_fn
    engine = None
    clipper: BookKeepingClipper | None = None
    net: nn.Module = model
    if dp is not None:
        with warnings.catch_warnings():
            if dp.randomness is not None:  # Opacus's "secure RNG off" is about its own RNG
                warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            engine = PrivacyEngine(accountant=dp.accountant)
        noise_gen = None
        if dp.randomness is None:
            noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        if mode == "bk":
            clipper, optimizer, loader = _make_private_bookkeeping(
                engine, model, optimizer, loss_fn, loader, dp, noise_gen, not per_unit
            )
        else:
            net, optimizer, criterion, loader = _make_private_opacus(
                engine, model, optimizer, loss_fn, loader, dp, mode, noise_gen
            )
            if dp.randomness is not None:
                loader = poisson_loader(dataset, loader.sample_rate, dp.randomness.sampling)
                use_site_noise(optimizer, dp.randomness)
        if per_unit:
            loader = _unit_loader(
                engine, optimizer, dataset, unit_of, n_units, min(batch_size, n_units), dp, seed
            )
        expected_q = poisson_rate(n_units, min(batch_size, n_units))
        assert abs(loader.sample_rate - expected_q) < 1e-12, (loader.sample_rate, expected_q)

    used, loss_sum, n_loss = 0, 0.0, 0
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    trainable = [p for p in model.parameters() if p.requires_grad]
    # book-keeping's seeded DP step on its flat buffer: Opacus's noise and accountant
    # hook, without the per-tensor bookkeeping of Opacus's and torch's step; the noise
    # is drawn into the buffer first and the clipper adds the clipped sum to it
    flat = isinstance(optimizer, BookKeepingDPOptimizer) and optimizer.can_flat_step()
    try:
        for xb, yb, unit, batch_n_units in _batches(loader, tensors, steps, device):
            if flat:
                optimizer.begin_flat_step()
            else:
                optimizer.zero_grad(set_to_none=True)
            if len(xb):
                loss = criterion(net(xb), yb)
                if clipper is not None:  # criterion is a mean over the batch's samples
                    clipper.backward(loss, unit, batch_n_units, scale=len(xb))
                else:
                    loss.backward()
                    if unit is not None:  # Opacus clips the rows of grad_sample: units
                        sum_grad_samples(trainable, unit, batch_n_units)
                loss_sum += float(loss.detach())
                n_loss += 1
            elif clipper is not None and clipper.grads is not None:
                clipper.grads.empty_batch()  # an empty Poisson batch: noise only
            elif engine is not None:
                # an empty Poisson batch: Opacus still adds noise; no gradient to compute
                for p in (p for p in model.parameters() if p.requires_grad):
                    if mode in ("ghost", "bk"):
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = torch.zeros((0, *p.shape), device=device)
            if flat:
                optimizer.flat_step()
            else:
                optimizer.step()
            used += len(xb)
    finally:
        if engine is not None and not flat:  # the flat step sets no p.grad: none to drop
            optimizer.zero_grad(set_to_none=True)
        if engine is not None:
            net._close() if hasattr(net, "_close") else None
        if clipper is not None:
            clipper.close()
            if flat and clipper.grads is not None:  # no p.grad points into it
                clipper.grads.release()
    dp_step: Step | None = None
    if engine is not None:
        history = engine.accountant.history
        assert len(history) == 1, history
        sigma, q, n = history[0]
        dp_step = (float(sigma), float(q), int(n))
    return StepsResult(
        steps=steps, examples_used=used, mean_loss=loss_sum / max(1, n_loss), dp_step=dp_step
    )


def _unit_loader(
    engine: PrivacyEngine,
    optimizer,
    dataset: TensorDataset,
    unit_of: np.ndarray,
    n_units: int,
    batch_size: int,
    dp: DPSettings,
    seed: int,
):
    """Poisson sampling over units (all of a unit's records together), at q = 1/ceil(U/B).

    Replaces the per-record loader Opacus built; the optimizer's accountant hook
    and its divisor (expected units per batch) are set to the unit rate.
    """
    q = poisson_rate(n_units, batch_size)
    if dp.randomness is not None:
        draw = dp.randomness.sampling.uniforms
    else:
        draw = torch_draw(torch.Generator().manual_seed(seed + 2))
    sampler = UnitPoissonSampler(unit_of, n_units, q, draw)
    optimizer.expected_batch_size = expected_batch_size(n_units, batch_size)
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(q))
    return poisson_loader(dataset, q, batch_sampler=sampler)


def _make_private_opacus(
    engine: PrivacyEngine,
    model: nn.Module,
    optimizer,
    loss_fn,
    loader,
    dp: DPSettings,
    mode: str,
    noise_gen,
):
    """(module, optimizer, criterion, loader) from Opacus's own ``make_private``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=loss_fn,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_gen,
            grad_sample_mode=mode,
        )
    # E[B] by integer arithmetic (Opacus's int(n * q) can round 49 * (1/49) down to 0)
    wrapped[1].expected_batch_size = expected_batch_size(len(loader.dataset), loader.batch_size)
    if mode == "ghost":
        return wrapped
    net, optimizer, loader = wrapped
    return net, optimizer, loss_fn, loader
