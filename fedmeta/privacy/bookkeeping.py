"""Book-keeping per-sample clipping: DP-SGD's clipped gradient sum in one backward pass.

DP-SGD needs, per step, ``sum_i min(1, C / ||g_i||) g_i`` over the samples i of
a batch, where ``g_i`` is sample i's gradient over all parameters. Opacus's
modes either materialise every ``g_i`` (hooks, ew, functorch) or run two
backward passes (ghost). For models whose trainable layers are ``Linear`` and
``Conv2d`` (the site models here) the whole quantity follows from what one
backward pass already produces (Bu et al., 2022, "Differentially Private
Optimization on Large Model at Small Cost", book-keeping):

* forward: each layer's input ``a`` and output ``z`` are kept;
* backward: ``dL/dz`` for every layer, asking autograd for nothing else (so the
  weight gradients autograd would compute are never computed);
* per-sample norms: a Linear layer on a [B, in] input has rank-one per-sample
  gradients, ``||g_i|| = ||dz_i|| * ||a_i||``; conv layers (and Linear layers on
  sequences) form ``g_i = dz_i a_i^T`` from the unfolded input, small for the
  image sizes here;
* the clipped sum per layer: ``(f * dz)^T a`` with ``f_i = min(1, C/||g_i||)``,
  one matrix product, the cost of an ordinary weight gradient.

Only the clipping is done here. Poisson sampling, Gaussian noise, scaling and
the privacy accountant stay Opacus's: the clipped sum goes into ``p.grad`` and
Opacus's ``DPOptimizerFastGradientClipping`` (the optimizer its ghost mode
uses, which expects exactly that) adds noise and steps the accountant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv2d)


class BookKeepingError(ValueError):
    """The model has a layer book-keeping clipping cannot handle (one line)."""


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot use book-keeping clipping (structure only), or None when it can.

    Book-keeping derives every trainable tensor's per-sample gradient from a
    layer's input and output gradient, so every trainable tensor must be the
    ``weight`` or ``bias`` of a plain ``nn.Linear`` / ungrouped ``nn.Conv2d``
    (subclasses may change ``forward`` or add parameters), owned by one layer.
    What only a forward pass shows (a layer run twice, an in-place operation on
    a kept activation) is checked by ``fedmeta.privacy.model_check``'s probe and,
    at every step, by ``BookKeepingClipper``.
    """
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"layer {name!r} ({type(module).__name__}) mixes samples in a batch"
        if not own:
            continue
        label = f"layer {name or '<model>'!r} ({type(module).__name__})"
        if type(module) not in SUPPORTED:
            kind = "a subclass of Linear/Conv2d" if isinstance(module, SUPPORTED) else (
                "a module with child modules" if list(module.children()) else "a layer")
            return f"{label} is {kind} with trainable parameters"
        if any(n not in ("weight", "bias") for n, _ in own):
            return f"{label} has parameters other than weight and bias"
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"{label}: grouped Conv2d (groups={module.groups})"
        for _, p in own:
            if id(p) in seen:
                return f"{label} shares a parameter with another layer"
            seen.add(id(p))
    return None


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


class BookKeepingClipper:
    """Hooks on a model's Linear/Conv2d layers; ``backward`` writes clipped sums to p.grad.

    Only trainable tensors get a gradient and count in the per-sample norm: a
    frozen weight or bias is left untouched (``.grad`` stays None).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise BookKeepingError(f"book-keeping clipping: {reason}; use grad-sample-mode "
                                   "hooks or ew")
        self.max_grad_norm = float(max_grad_norm)
        self.layers = [m for m in model.modules() if isinstance(m, SUPPORTED) and _trainable(m)]
        self._seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self._handles = [m.register_forward_hook(self._keep) for m in self.layers]

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        if not torch.is_grad_enabled():
            return
        if module in self._seen:
            self._seen.clear()
            raise BookKeepingError("book-keeping clipping: a layer ran twice in one forward "
                                   "pass; use grad-sample-mode hooks")
        self._seen[module] = (inputs[0].detach(), output, inputs[0]._version, output._version)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen.clear()

    def backward(self, loss_sum: torch.Tensor, units: torch.Tensor | None = None,
                 n_units: int = 0) -> torch.Tensor | None:
        """Set ``p.grad`` = sum over samples (or units) of clipped gradients.

        ``loss_sum`` must be the *sum* of per-sample losses of the batch that
        was just forwarded (not the mean). With ``units`` (each sample's unit
        as 0..n_units-1) a unit's gradient is the sum of its samples' gradients
        and is clipped as a whole (fedmeta.privacy.units). Returns the
        per-sample (per-unit) gradient norms before clipping, or None when no
        trainable layer ran.
        """
        layers = [m for m in self.layers if m in self._seen]
        kept = [self._seen[m] for m in layers]
        self._seen.clear()
        for m, (a, z, va, vz) in zip(layers, kept, strict=True):
            if a._version != va or z._version != vz:
                raise BookKeepingError(
                    f"book-keeping clipping: an in-place operation changed the input or "
                    f"output of a {type(m).__name__} layer after it ran (e.g. "
                    "ReLU(inplace=True)); make it out-of-place or use grad-sample-mode hooks")
        grads_out = torch.autograd.grad(loss_sum, [z for _, z, _, _ in kept])
        sq_norms: torch.Tensor | None = None
        sums = []
        for module, (a, _, _, _), dz in zip(layers, kept, grads_out, strict=True):
            sq, clipped_sum = _layer_grads(module, a, dz, units, n_units)
            sq_norms = sq if sq_norms is None else sq_norms + sq
            sums.append((module, clipped_sum))
        for m in self.layers:  # a layer unused in this forward pass gets a zero gradient
            if m not in layers:
                for p in m.parameters(recurse=False):
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
        if sq_norms is None:
            return None
        norms = sq_norms.sqrt()
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for module, clipped_sum in sums:
            weight_grad, bias_grad = clipped_sum(factor)
            if weight_grad is not None:
                module.weight.grad = weight_grad.reshape(module.weight.shape)
            if bias_grad is not None:
                module.bias.grad = bias_grad
        return norms


class BookKeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for already-clipped gradients, minus its full-size copies.

    Opacus's version deep-copies each gradient into ``summed_grad`` and draws
    noise into a fresh tensor after allocating a zero tensor; at 1M parameters
    those copies cost a tenth of a step. Here the clipped sum (a fresh tensor
    every step, never accumulated: Poisson sampling forbids accumulation) is
    used as ``summed_grad`` and the noise is added in place. Noise, its scale
    (std = sigma * C, then / expected batch size) and the accountant hook are
    Opacus's; secure mode uses Opacus's own noise path unchanged.
    """

    def accumulate(self) -> None:
        for p in self.params:
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad + p.grad

    def add_noise(self) -> None:
        if self.secure_mode:
            super().add_noise()
            return
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std > 0:
                noise = torch.empty_like(p.summed_grad).normal_(0.0, std,
                                                                generator=self.generator)
                p.summed_grad.add_(noise)
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)


def _layer_grads(module: nn.Module, a: torch.Tensor, dz: torch.Tensor,
                 units: torch.Tensor | None = None, n_units: int = 0):
    """(per-sample squared gradient norms [B], factor -> (clipped weight sum, bias sum)).

    Only trainable tensors enter the norm; a frozen one's sum is None. With
    ``units`` ([B] ids 0..n_units-1) the norms and clipping factors are per
    unit ([n_units]) and a unit's gradient is the sum of its samples'.
    """
    batch = a.shape[0]
    w_on = module.weight.requires_grad
    b_on = module.bias is not None and module.bias.requires_grad
    if isinstance(module, nn.Linear) and a.dim() == 2 and units is None:
        dz_sq = (dz * dz).sum(1)  # rank-one per-sample gradients
        sq = (dz_sq * (a * a).sum(1) if w_on else torch.zeros_like(dz_sq)) + (
            dz_sq if b_on else 0.0)

        def rank_one_sum(factor: torch.Tensor):
            scaled = dz * factor[:, None]
            return (scaled.t() @ a if w_on else None), (scaled.sum(0) if b_on else None)

        return sq, rank_one_sum
    if isinstance(module, nn.Linear) and a.dim() == 2:
        # a unit's weight gradient sum_i dz_i a_i^T has squared norm
        # sum_{i,j in unit} (dz_i . dz_j)(a_i . a_j): a [B, B] Gram product, never [B, out, in]
        one_hot = F.one_hot(units, n_units).to(dz.dtype)  # [B, U]
        sq = dz.new_zeros(n_units)
        if w_on:
            gram = (dz @ dz.t()) * (a @ a.t())
            sq = sq + ((one_hot.t() @ gram) * one_hot.t()).sum(1)
        if b_on:
            unit_bias = one_hot.t() @ dz  # [U, out]
            sq = sq + (unit_bias * unit_bias).sum(1)

        def unit_rank_one_sum(factor: torch.Tensor):
            scaled = dz * factor[units][:, None]
            return (scaled.t() @ a if w_on else None), (scaled.sum(0) if b_on else None)

        return sq, unit_rank_one_sum
    if isinstance(module, nn.Linear):
        a3 = a.reshape(batch, -1, a.shape[-1])  # [B, T, in]
        dz3 = dz.reshape(batch, -1, dz.shape[-1])  # [B, T, out]
        per_sample = torch.bmm(dz3.transpose(1, 2), a3) if w_on else None  # [B, out, in]
        bias_rows = dz3.sum(1)
    else:
        dz3 = dz.reshape(batch, dz.shape[1], -1)  # [B, out, P]
        per_sample = None
        if w_on:
            if module.padding_mode == "zeros" and not isinstance(module.padding, str):
                padded, pad = a, module.padding  # unfold pads symmetrically, no copy
            else:  # what Conv2d itself applies: 'same' (maybe asymmetric), other modes
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                padded = F.pad(a, module._reversed_padding_repeated_twice, mode=mode)
                pad = 0
            unfolded = F.unfold(padded, module.kernel_size, module.dilation, pad,
                                module.stride)  # [B, in*k*k, P]
            per_sample = torch.bmm(dz3, unfolded.transpose(1, 2))  # [B, out, in*k*k]
        bias_rows = dz3.sum(2)
    if units is not None:  # a unit's gradient: the sum of its samples'
        batch = n_units
        if w_on:
            per_sample = per_sample.new_zeros((n_units, *per_sample.shape[1:])).index_add_(
                0, units, per_sample)
        bias_rows = bias_rows.new_zeros((n_units, bias_rows.shape[1])).index_add_(
            0, units, bias_rows)
    sq = per_sample.reshape(batch, -1).pow(2).sum(1) if w_on else dz.new_zeros(batch)
    if b_on:
        sq = sq + (bias_rows * bias_rows).sum(1)

    def materialised_sum(factor: torch.Tensor):
        weight = (factor @ per_sample.reshape(batch, -1)).reshape(per_sample.shape[1:]) \
            if w_on else None
        return weight, (factor @ bias_rows if b_on else None)

    return sq, materialised_sum
