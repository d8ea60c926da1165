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
    """Why ``model`` cannot use book-keeping clipping, or None when it can."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return f"layer {name!r} ({type(module).__name__}) mixes samples in a batch"
            continue
        if not isinstance(module, SUPPORTED):
            return f"layer {name!r} ({type(module).__name__}) has trainable parameters"
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or
                                              module.padding_mode != "zeros"):
            return f"layer {name!r}: grouped or non-zero-padded Conv2d"
        for p in own:
            if id(p) in seen:
                return f"layer {name!r} shares a parameter with another layer"
            seen.add(id(p))
    return None


class BookKeepingClipper:
    """Hooks on a model's Linear/Conv2d layers; ``backward`` writes clipped sums to p.grad."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        reason = unsupported_reason(model)
        if reason:
            raise BookKeepingError(f"book-keeping clipping: {reason}; use grad-sample-mode "
                                   "hooks or ew")
        self.max_grad_norm = float(max_grad_norm)
        self.layers = [m for m in model.modules() if isinstance(m, SUPPORTED)
                       and any(p.requires_grad for p in m.parameters(recurse=False))]
        self._seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._keep) for m in self.layers]

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        if not torch.is_grad_enabled():
            return
        if module in self._seen:
            self._seen.clear()
            raise BookKeepingError("book-keeping clipping: a layer ran twice in one forward "
                                   "pass; use grad-sample-mode hooks")
        self._seen[module] = (inputs[0].detach(), output)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen.clear()

    def backward(self, loss_sum: torch.Tensor) -> None:
        """Set ``p.grad`` = sum over samples of clipped per-sample gradients.

        ``loss_sum`` must be the *sum* of per-sample losses of the batch that
        was just forwarded (not the mean).
        """
        layers = [m for m in self.layers if m in self._seen]
        kept = [self._seen[m] for m in layers]
        self._seen.clear()
        grads_out = torch.autograd.grad(loss_sum, [z for _, z in kept])
        sq_norms: torch.Tensor | None = None
        sums = []
        for module, (a, _), dz in zip(layers, kept, grads_out, strict=True):
            sq, clipped_sum = _layer_grads(module, a, dz)
            sq_norms = sq if sq_norms is None else sq_norms + sq
            sums.append((module, clipped_sum))
        for m in self.layers:  # a layer unused in this forward pass gets a zero gradient
            if m not in layers:
                for p in m.parameters(recurse=False):
                    p.grad = torch.zeros_like(p)
        if sq_norms is None:
            return
        factor = (self.max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)
        for module, clipped_sum in sums:
            weight_grad, bias_grad = clipped_sum(factor)
            module.weight.grad = weight_grad.reshape(module.weight.shape)
            if module.bias is not None:
                module.bias.grad = bias_grad


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


def _layer_grads(module: nn.Module, a: torch.Tensor, dz: torch.Tensor):
    """(per-sample squared gradient norms [B], factor -> (clipped weight sum, bias sum))."""
    batch = a.shape[0]
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear) and a.dim() == 2:  # rank-one per-sample gradients
        dz_sq = (dz * dz).sum(1)
        sq = dz_sq * (a * a).sum(1) + (dz_sq if has_bias else 0.0)

        def rank_one_sum(factor: torch.Tensor):
            scaled = dz * factor[:, None]
            return scaled.t() @ a, scaled.sum(0)

        return sq, rank_one_sum
    if isinstance(module, nn.Linear):
        a3 = a.reshape(batch, -1, a.shape[-1])  # [B, T, in]
        dz3 = dz.reshape(batch, -1, dz.shape[-1])  # [B, T, out]
        per_sample = torch.bmm(dz3.transpose(1, 2), a3)  # [B, out, in]
        bias_rows = dz3.sum(1)
    else:
        unfolded = F.unfold(a, module.kernel_size, module.dilation, module.padding,
                            module.stride)  # [B, in*k*k, P]
        dz3 = dz.reshape(batch, dz.shape[1], -1)  # [B, out, P]
        per_sample = torch.bmm(dz3, unfolded.transpose(1, 2))  # [B, out, in*k*k]
        bias_rows = dz3.sum(2)
    sq = per_sample.reshape(batch, -1).pow(2).sum(1)
    if has_bias:
        sq = sq + (bias_rows * bias_rows).sum(1)

    def materialised_sum(factor: torch.Tensor):
        return torch.einsum("b,bok->ok", factor, per_sample), factor @ bias_rows

    return sq, materialised_sum
