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

The site models are small (a step is a fraction of a millisecond of arithmetic),
so a step's cost is mostly the number of tensor operations. ``FlatGrads`` keeps
every trainable tensor's gradient in one buffer. In the seeded step with plain
SGD the optimizer first draws the step's noise into it (per tensor, in Opacus's
order, so the same generator gives the same noise), the clipper adds each
layer's clipped sum to its slice, and the update applies lr / E[B] times the
buffer in one call; otherwise the clipper writes the sums and Opacus's step
adds the noise and divides by the expected batch size, one operation each.
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
            kind = (
                "a subclass of Linear/Conv2d"
                if isinstance(module, SUPPORTED)
                else ("a module with child modules" if list(module.children()) else "a layer")
            )
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


#: released buffers by layout (shapes, dtype, device), with their views and noise cut
_RELEASED: dict[tuple, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}


class FlatGrads:
    """One contiguous buffer for the gradients of ``params`` (in this order):
    ``grads[i]`` is a view shaped like ``params[i]``.

    The DP optimizer's per-step work on every tensor becomes one operation on the
    buffer. Two ways to fill it:

    * **noise first** (``start_noisy``, then the clipper *adds* the clipped sum, as
      ``BookKeepingDPOptimizer.flat_step`` uses it): the step's noise is drawn straight
      into the buffer before the forward pass, so no separate noise buffer is kept
      and the noise is never added in a pass of its own;
    * **clipped sum first** (the clipper writes it and sets ``p.grad`` to the views,
      Opacus's ``step`` then adds noise with ``add_noise``).
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        if not params:
            raise ValueError("no trainable parameters")
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            raise ValueError("parameters of several dtypes or devices")
        self.params = list(params)
        self.sizes = [p.numel() for p in params]
        self._layout = (tuple(p.shape for p in params), first.dtype, first.device)
        released = _RELEASED.pop(self._layout, None)
        if released is None:
            buffer = torch.empty(sum(self.sizes), dtype=first.dtype, device=first.device)
            parts = buffer.split(self.sizes)
            views = [part.view(p.shape) for part, p in zip(parts, params, strict=True)]
            # the buffer cut where one ``normal_`` call draws exactly what the calls for
            # each tensor would (``noise_groups``); fewer calls, the same numbers
            released = buffer, views, noise_groups(buffer, self.sizes)
        self.buffer: torch.Tensor = released[0]
        self.grads: list[torch.Tensor] = released[1]
        self.noise_draws: list[torch.Tensor] = released[2]
        self._index = {id(p): i for i, p in enumerate(params)}
        self._noise_buffer: torch.Tensor | None = None  # ``add_noise``'s, made on first use
        self._noise_apart: list[torch.Tensor] = []  # its cut, as ``noise_draws``
        #: the buffer holds this step's noise, and the clipped sum is to be added to it
        #: (set by ``start_noisy``, cleared by ``BookKeepingDPOptimizer.flat_step``)
        self.noised = False
        #: the step's clipped sum is in the buffer (set by the clipper and ``empty_batch``,
        #: cleared by ``flat_step``: one noisy step per clipped sum)
        self.filled = False

    def start_noisy(self, std: float, generator: torch.Generator | None) -> None:
        """Begin a step whose clipped sum is added to its noise: the buffer becomes
        N(0, std^2) noise, drawn tensor by tensor in order from ``generator`` as Opacus
        draws it (in ``noise_draws``' fewer calls, the same numbers); zeros when std is 0."""
        if std > 0:
            for noise in self.noise_draws:
                noise.normal_(0.0, std, generator=generator)
        else:
            self.buffer.zero_()
        self.noised, self.filled = True, False

    def add_noise(self, std: float, generator: torch.Generator | None) -> None:
        """Add N(0, std^2) noise to the clipped sum in the buffer, drawn as
        ``start_noisy`` draws it."""
        if self._noise_buffer is None:
            self._noise_buffer = torch.empty_like(self.buffer)
            self._noise_apart = noise_groups(self._noise_buffer, self.sizes)
        for noise in self._noise_apart:
            noise.normal_(0.0, std, generator=generator)
        self.buffer.add_(self._noise_buffer)

    def release(self) -> None:
        """Hand the buffer on to the next ``FlatGrads`` of the same layout (a site trains
        a model of the same shape every round): call it once nothing reads the buffer or
        its views any more. Its contents are not kept: every step overwrites them."""
        for view in self.grads:
            self.fresh(view)
        _RELEASED[self._layout] = (self.buffer, self.grads, self.noise_draws)

    def view(self, p: torch.Tensor) -> torch.Tensor | None:
        """``p``'s gradient view (None if the buffer does not hold ``p``)."""
        i = self._index.get(id(p))
        return None if i is None else self.grads[i]

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        """Whether ``tensors`` (one per parameter, in order) are the buffer's views."""
        return len(tensors) == len(self.grads) and all(
            t is v for t, v in zip(tensors, self.grads, strict=True)
        )

    @staticmethod
    def fresh(view: torch.Tensor) -> torch.Tensor:
        """A view about to receive a new gradient: Opacus's "already noised" mark of the
        previous step is taken off it (it stays on a view nobody refilled)."""
        if hasattr(view, "_processed"):
            del view._processed
        return view

    def empty_batch(self) -> None:
        """A step without records: its clipped sum is zero, so the step is noise only
        (after ``start_noisy`` the buffer already is; otherwise it is zeroed and
        ``p.grad`` set to the views for Opacus's step to noise)."""
        if not self.noised:
            self.buffer.zero_()
            for p, view in zip(self.params, self.grads, strict=True):
                p.grad = self.fresh(view)
        self.filled = True


class BookKeepingClipper:
    """Keeps each Linear/Conv2d layer's input and output as the model runs (a capturing
    ``forward`` on each layer, taken off by ``close``); ``backward`` writes clipped sums
    to p.grad.

    Only trainable tensors get a gradient and count in the per-sample norm: a
    frozen weight or bias is left untouched (``.grad`` stays None). With
    ``grads`` (a ``FlatGrads`` over the trainable tensors) the sums are written
    into its buffer and ``p.grad`` is the tensor's view of it.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        grads: FlatGrads | None = None,
        *,
        checked: bool = False,
    ) -> None:
        # ``checked``: the caller's check_dp_model chose book-keeping for this very model,
        # which includes these structural rules (and more); they are not walked again
        reason = None if checked else unsupported_reason(model)
        if reason:
            raise BookKeepingError(
                f"book-keeping clipping: {reason}; use grad-sample-mode hooks or ew"
            )
        self.max_grad_norm = float(max_grad_norm)
        self.grads = grads
        self.layers = [m for m in model.modules() if isinstance(m, SUPPORTED) and _trainable(m)]
        #: each layer's (weight, bias) gradient views in ``grads`` (None: frozen or not held)
        self._views = {m: (_held(grads, m.weight), _held(grads, m.bias)) for m in self.layers}
        self._seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        #: each layer's own ``forward`` attribute before the capture replaced it (None: the
        #: class's method), and the capture put in its place
        self._forwards: dict[nn.Module, tuple[object, object]] = {}
        self._open = True
        for m in self.layers:
            before, capture = m.__dict__.get("forward"), self._capturing(m)
            m.forward = capture
            self._forwards[m] = (before, capture)

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        if not self._open or not torch.is_grad_enabled():
            return
        if module in self._seen:
            self._seen.clear()
            raise BookKeepingError(
                "book-keeping clipping: a layer ran twice in one forward "
                "pass; use grad-sample-mode hooks"
            )
        # kept as is (``backward`` computes under no_grad): a detach would be one more op
        self._seen[module] = (inputs[0], output, inputs[0]._version, output._version)

    def _capturing(self, module: nn.Module):
        """``module``'s forward, keeping its input and output (``_keep``) as it returns.

        An instance attribute, not a forward hook: ``Module.__call__`` then stays on its
        fast path (a forward hook costs each layer call several microseconds more).
        """
        forward, keep = module.forward, self._keep

        def capture(*args, **kwargs):
            output = forward(*args, **kwargs)
            keep(module, args, output)
            return output

        return capture

    def close(self) -> None:
        """Stop keeping activations and give each layer its forward back. A layer whose
        forward was replaced again after ours (another wrapper around it) keeps that
        wrapper; our capture inside it no longer keeps anything."""
        self._open = False
        for m, (before, capture) in self._forwards.items():
            if m.__dict__.get("forward") is not capture:
                continue
            if before is None:
                del m.__dict__["forward"]
            else:
                m.forward = before
        self._forwards = {}
        self._seen.clear()

    def backward(
        self,
        loss_sum: torch.Tensor,
        units: torch.Tensor | None = None,
        n_units: int = 0,
        *,
        scale: float = 1.0,
    ) -> torch.Tensor | None:
        """Set ``p.grad`` = sum over samples (or units) of clipped gradients.

        ``scale * loss_sum`` must be the *sum* of per-sample losses of the batch that
        was just forwarded (not the mean): a batch mean with ``scale`` = the batch
        size (the scale enters as the gradient autograd starts from, the same numbers
        as a multiplied loss without its operation). With ``units`` (each sample's unit
        as 0..n_units-1) a unit's gradient is the sum of its samples' gradients
        and is clipped as a whole (fedmeta.privacy.units). Returns the
        per-sample (per-unit) gradient norms before clipping, or None when no
        trainable layer ran.
        """
        seen = self._seen
        layers = (
            self.layers if len(seen) == len(self.layers) else [m for m in self.layers if m in seen]
        )
        kept = [seen[m] for m in layers]
        seen.clear()
        for m, (a, z, va, vz) in zip(layers, kept, strict=True):
            if a._version != va or z._version != vz:
                raise BookKeepingError(
                    f"book-keeping clipping: an in-place operation changed the input or "
                    f"output of a {type(m).__name__} layer after it ran (e.g. "
                    "ReLU(inplace=True)); make it out-of-place or use grad-sample-mode hooks"
                )
        start = None if scale == 1.0 else (torch.full_like(loss_sum, scale),)
        grads_out = torch.autograd.grad(loss_sum, [z for _, z, _, _ in kept], start)
        # adding only into the noised flat buffer, the arithmetic runs in inference mode
        # (no autograd or version bookkeeping on its temporaries); a gradient tensor of
        # its own (``p.grad``) must stay an ordinary tensor, so that path keeps no_grad
        buffer_only = self.grads is not None and self.grads.noised
        with torch.inference_mode() if buffer_only else torch.no_grad():
            return self._clip(layers, kept, grads_out, units, n_units)

    def _clip(self, layers, kept, grads_out, units, n_units) -> torch.Tensor | None:
        members = None  # [U, B]: 1 where sample b belongs to unit u
        if units is not None and grads_out:
            members = F.one_hot(units, n_units).t().to(grads_out[0].dtype)
        parts: list[torch.Tensor] = []  # per-sample squared norms, tensor by tensor
        sums = []
        for module, (a, _, _, _), dz in zip(layers, kept, grads_out, strict=True):
            sq, clipped_sum = _layer_grads(module, a, dz, units, members)
            parts.extend(sq)
            sums.append((module, clipped_sum))
        # one sum over every part (instead of an addition per part)
        sq_norms = torch.stack(parts).sum(0) if len(parts) > 1 else (parts or [None])[0]
        # noise first: the clipped sums are added to the step's noise in the buffer, and
        # ``p.grad`` is not set (``BookKeepingDPOptimizer.flat_step`` reads the buffer)
        buffer_only = self.grads is not None and self.grads.noised
        unused = [] if layers is self.layers else [m for m in self.layers if m not in layers]
        for m in unused:  # a layer unused in this forward pass gets a zero gradient
            for p, view in zip((m.weight, m.bias), self._views[m], strict=True):
                if p is not None and p.requires_grad and not buffer_only:  # else: noise only
                    if view is None:
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad = self.grads.fresh(view).zero_()
        if sq_norms is None:
            if self.grads is not None:
                self.grads.filled = True
            return None
        norms = sq_norms.sqrt()
        # Opacus's min(1, C / (norm + 1e-6)) (``C / t`` is ``t.reciprocal() * C``), in place
        factor = (norms + 1e-6).reciprocal_().mul_(self.max_grad_norm).clamp_(max=1.0)
        if buffer_only:  # every trainable tensor has its view (FlatGrads holds them all)
            for module, clipped_sum in sums:
                weight_view, bias_view = self._views[module]
                clipped_sum(factor, weight_view, bias_view, add=True)
            self.grads.filled = True
            return norms
        for module, clipped_sum in sums:
            weight, bias = module.weight, module.bias
            weight_out = self._out(weight, self._views[module][0]) if weight.requires_grad else None
            bias_out = (
                self._out(bias, self._views[module][1])
                if bias is not None and bias.requires_grad
                else None
            )
            clipped_sum(factor, weight_out, bias_out)
            if weight_out is not None:
                weight.grad = weight_out
            if bias_out is not None:
                bias.grad = bias_out
        if self.grads is not None:
            self.grads.filled = True
        return norms

    @staticmethod
    def _out(p: torch.Tensor, view: torch.Tensor | None) -> torch.Tensor:
        """Where ``p``'s clipped sum goes: its view of the flat buffer, or a new tensor."""
        if view is not None:
            return FlatGrads.fresh(view)
        return torch.empty(p.shape, dtype=p.dtype, device=p.device)


#: torch's CPU ``normal_`` on a contiguous float tensor of n >= 16 values fills it with n
#: uniforms, then turns each aligned run of 16 into normals (Box-Muller within the run) and
#: redraws the last 16 when 16 does not divide n; below 16 values it draws one by one
NORMAL_RUN = 16


def noise_groups(buffer: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """``buffer`` (the tensors of ``sizes`` back to back) cut into views, each of which one
    ``normal_`` call fills exactly as one call per tensor would, in order, from the same
    generator state (and leaving the same state).

    On the CPU, consecutive tensors of at least 16 values draw as one when every one but
    the last holds a multiple of 16 values: the uniforms are drawn in the same order, the
    runs of 16 start at the same places, and only the last tensor's end can be redrawn,
    as it would be alone. Anything else (fewer than 16 values, another device, another
    dtype) keeps a call of its own.
    """
    if buffer.device.type != "cpu" or buffer.dtype not in (torch.float32, torch.float64):
        return list(buffer.split(sizes))
    groups: list[int] = []
    mergeable = False  # whether the open group may take the next tensor
    for n in sizes:
        if mergeable and n >= NORMAL_RUN:
            groups[-1] += n
        else:
            groups.append(n)
        mergeable = n >= NORMAL_RUN and groups[-1] % NORMAL_RUN == 0
    return list(buffer.split(groups))


def _held(grads: FlatGrads | None, p: torch.Tensor | None) -> torch.Tensor | None:
    return None if grads is None or p is None or not p.requires_grad else grads.view(p)


class BookKeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for already-clipped gradients, minus its full-size copies.

    Opacus's version deep-copies each gradient into ``summed_grad`` and draws
    noise into a fresh tensor after allocating a zero tensor; at 1M parameters
    those copies cost a tenth of a step. Here the clipped sum (a fresh tensor
    every step, never accumulated: Poisson sampling forbids accumulation) is
    used as ``summed_grad`` and the noise is added in place. With ``grads`` (the
    ``FlatGrads`` the clipper writes into) the noise is drawn per tensor in Opacus's
    order and with Opacus's ``normal_`` call (the same generator gives the same
    noise), and added and scaled in one operation each; ``begin_flat_step`` and
    ``flat_step`` draw it into the gradient buffer before the clipper adds the sum.
    Noise, its scale (std = sigma * C, then / expected batch size) and the
    accountant hook are Opacus's; secure mode uses Opacus's own noise path unchanged.
    """

    def __init__(self, optimizer, *, grads: FlatGrads | None = None, **kwargs) -> None:
        self._param_list: list[torch.Tensor] | None = None
        super().__init__(optimizer, **kwargs)
        self._param_list = super().params  # fixed for the optimizer's life: list it once
        self.grads = grads
        if grads is not None and (
            len(grads.params) != len(self._param_list)
            or any(a is not b for a, b in zip(grads.params, self._param_list, strict=False))
        ):
            raise ValueError("FlatGrads must hold the optimizer's parameters in its order")
        self._flat_step = False

    @property
    def params(self) -> list[torch.Tensor]:
        return self._param_list if self._param_list is not None else super().params

    def can_flat_step(self) -> bool:
        """Whether ``flat_step`` computes exactly what ``step`` would: the gradients are
        the flat buffer's, the noise is Opacus's seeded draw (not secure mode, not a
        site's CSPRNG, which replaces ``add_noise`` on the instance), and the wrapped
        optimizer is plain SGD (one group; no momentum, weight decay or maximize)."""
        if self.grads is None or self.secure_mode or "add_noise" in self.__dict__:
            return False
        opt = self.original_optimizer
        if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
            return False
        group = opt.param_groups[0]
        plain = {"momentum": 0, "weight_decay": 0, "maximize": False, "nesterov": False}
        return all(group.get(k, v) == v for k, v in plain.items()) and not group.get("fused")

    def begin_flat_step(self) -> None:
        """Draw this step's noise N(0, (sigma C)^2) into the flat buffer, before the forward
        pass (``can_flat_step`` only): per tensor in Opacus's order from the optimizer's
        generator, so the same generator gives the noise Opacus's ``step`` would add.
        The clipper then adds the step's clipped sum to it and ``flat_step`` applies it."""
        flat = self.grads
        assert flat is not None
        flat.start_noisy(self.noise_multiplier * self.max_grad_norm, self.generator)

    def flat_step(self) -> None:
        """One DP-SGD step on the noisy clipped sum in the flat buffer (``can_flat_step``
        only; the noise drawn by ``begin_flat_step``, the clipped sum added by the clipper
        or declared empty by ``FlatGrads.empty_batch``).

        What ``step`` does through Opacus's ``pre_step`` and ``torch.optim.SGD``,
        without their per-tensor bookkeeping: the accountant's step hook, then
        ``p -= lr / (expected batch size) * (clipped sum + noise)`` for every parameter
        in one call. Refuses a buffer without a new noisy sum (a sum is noised and
        applied once).
        """
        flat = self.grads
        assert flat is not None
        if not (flat.noised and flat.filled):
            raise RuntimeError(
                "flat_step: no new noisy clipped gradient sum since the last step "
                "(begin_flat_step, then the clipper's backward)"
            )
        flat.noised = flat.filled = False
        if self.step_hook:
            self.step_hook(self)
        lr = self.original_optimizer.param_groups[0]["lr"]
        scale = lr / (self.expected_batch_size * self.accumulated_iterations)
        with torch.no_grad():
            torch._foreach_add_(self.params, flat.grads, alpha=-scale)

    def accumulate(self) -> None:
        for p in self.params:
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad + p.grad

    def add_noise(self) -> None:
        self._flat_step = False
        if self.secure_mode:
            super().add_noise()
            return
        std = self.noise_multiplier * self.max_grad_norm
        flat = self.grads
        if flat is not None and flat.holds([p.summed_grad for p in self.params]):
            for p in self.params:
                _check_processed_flag(p.summed_grad)
            if std > 0:
                flat.add_noise(std, self.generator)
            for p in self.params:
                p.grad = p.summed_grad
                _mark_as_processed(p.summed_grad)
            self._flat_step = True
            return
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if std > 0:
                noise = torch.empty_like(p.summed_grad).normal_(0.0, std, generator=self.generator)
                p.summed_grad.add_(noise)
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Opacus's ``p.grad /= expected_batch_size * accumulated_iterations``, on the whole
        buffer at once when the gradients are its views."""
        flat, self._flat_step = self._flat_step, False
        if (
            flat
            and self.loss_reduction == "mean"
            and self.grads is not None
            and self.grads.holds([p.grad for p in self.params])
        ):
            self.grads.buffer /= self.expected_batch_size * self.accumulated_iterations
            return
        super().scale_grad()


def _unfold(conv: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """``F.unfold`` of the input as ``conv`` pads it ([B, in*k*k, P]), by one copy of a
    strided view of the padded input (faster than unfold's im2col on the CPU)."""
    pads = conv._reversed_padding_repeated_twice  # what Conv2d applies, 'same' included
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, pads, mode=mode)
    batch, channels, height, width = a.shape
    s_b, s_c, s_h, s_w = a.stride()
    (kh, kw), (dh, dw), (th, tw) = conv.kernel_size, conv.dilation, conv.stride
    out_h = (height - dh * (kh - 1) - 1) // th + 1
    out_w = (width - dw * (kw - 1) - 1) // tw + 1
    windows = a.as_strided(
        (batch, channels, kh, kw, out_h, out_w),
        (s_b, s_c, s_h * dh, s_w * dw, s_h * th, s_w * tw),
        a.storage_offset(),
    )
    return windows.reshape(batch, channels * kh * kw, out_h * out_w)


def _unfold_wide(
    conv: nn.Conv2d, a: torch.Tensor, dz: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unfolded input [B, in*k*k, L], output gradient [B, out, L]) of a stride-1 conv
    whose product over L is the per-sample weight gradient, as ``_unfold`` gives it.

    The output rows are taken as wide as the padded input (W_p columns instead of
    W_out: L = H_out * W_p), so that each kernel offset's window is one contiguous
    run of the padded input's memory and the unfold copies runs of L values
    instead of W_out; the extra columns' gradients are zero (``dz`` is padded with
    zeros), so they add exactly nothing. One zero row under the input keeps the
    last window inside it.
    """
    pads = conv._reversed_padding_repeated_twice  # what Conv2d applies, 'same' included
    if conv.padding_mode == "zeros":
        a = torch.constant_pad_nd(a, (pads[0], pads[1], pads[2], pads[3] + 1))
    else:
        a = F.pad(F.pad(a, pads, mode=conv.padding_mode), (0, 0, 0, 1))
    batch, channels, height, width = a.shape
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    out_h, out_w = dz.shape[2], dz.shape[3]
    length = out_h * width
    s_b, s_c = a.stride(0), a.stride(1)
    windows = a.as_strided(
        (batch, channels, kh, kw, length), (s_b, s_c, dh * width, dw, 1), a.storage_offset()
    )
    unfolded = windows.reshape(batch, channels * kh * kw, length)
    dz_wide = torch.constant_pad_nd(dz, (0, width - out_w)).reshape(batch, dz.shape[1], length)
    return unfolded, dz_wide


def _layer_grads(
    module: nn.Module,
    a: torch.Tensor,
    dz: torch.Tensor,
    units: torch.Tensor | None = None,
    members: torch.Tensor | None = None,
):
    """(per-sample squared gradient norms [B] of its trainable tensors, summed over a list
    (empty when none is trainable), (factor, weight_out, bias_out) -> None).

    The second writes the clipped weight and bias sums into ``weight_out`` /
    ``bias_out`` (None for a frozen tensor). Only trainable tensors enter the
    norm. With ``units`` ([B] ids 0..U-1) and ``members`` ([U, B], 1 where a
    sample belongs to a unit) the norms and clipping factors are per unit ([U])
    and a unit's gradient is the sum of its samples'.
    """
    batch = a.shape[0]
    bias = module.bias
    w_on = module.weight.requires_grad
    b_on = bias is not None and bias.requires_grad
    if isinstance(module, nn.Linear) and a.dim() == 2 and units is None:
        dz_sq = torch.linalg.vecdot(dz, dz)  # rank-one per-sample gradients
        if w_on:
            a_sq = torch.linalg.vecdot(a, a)
            sq = [torch.addcmul(dz_sq, dz_sq, a_sq) if b_on else dz_sq * a_sq]
        else:
            sq = [dz_sq] if b_on else []

        def rank_one_sum(factor: torch.Tensor, weight_out, bias_out, add: bool = False) -> None:
            _clipped_outer_sum(dz.t(), factor, a, weight_out, bias_out, add)

        return sq, rank_one_sum
    if isinstance(module, nn.Linear) and a.dim() == 2:
        # a unit's gradient (sum_i dz_i a_i^T, sum_i dz_i) has squared norm
        # sum_{i,j in unit} (dz_i . dz_j)(a_i . a_j + 1): a [B, B] Gram product, never [B, out, in]
        assert members is not None
        gram = dz @ dz.t()
        if w_on:
            inputs = a @ a.t()
            # (dz . dz)(a . a + 1) with a bias, (dz . dz)(a . a) without
            gram = torch.addcmul(gram, gram, inputs) if b_on else gram * inputs
        sq = [torch.linalg.vecdot(members @ gram, members)] if (w_on or b_on) else []

        def unit_rank_one_sum(
            factor: torch.Tensor, weight_out, bias_out, add: bool = False
        ) -> None:
            _clipped_outer_sum(dz.t(), factor[units], a, weight_out, bias_out, add)

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
            if module.stride == (1, 1) and a.is_contiguous():
                unfolded, dz_wide = _unfold_wide(module, a, dz)  # [B, in*k*k, L], [B, out, L]
            else:
                unfolded, dz_wide = _unfold(module, a), dz3  # [B, in*k*k, P], [B, out, P]
            per_sample = torch.bmm(dz_wide, unfolded.transpose(1, 2))  # [B, out, in*k*k]
        bias_rows = dz3.sum(2) if b_on else None
    rows = per_sample.reshape(batch, -1) if w_on else None
    if members is not None:  # a unit's gradient: the sum of its samples'
        rows = members @ rows if w_on else None
        bias_rows = members @ bias_rows if b_on else None
    sq = [torch.linalg.vecdot(rows, rows)] if w_on else []
    if b_on:
        sq.append(torch.linalg.vecdot(bias_rows, bias_rows))

    def materialised_sum(factor: torch.Tensor, weight_out, bias_out, add: bool = False) -> None:
        if weight_out is not None:
            _weighted_rows(rows, factor, weight_out.view(-1), add)
        if bias_out is not None:
            _weighted_rows(bias_rows, factor, bias_out, add)

    return sq, materialised_sum


def _clipped_outer_sum(
    dz_t: torch.Tensor, factor: torch.Tensor, a: torch.Tensor, weight_out, bias_out, add: bool
) -> None:
    """A Linear layer's clipped sums from its output gradients ([out, B]) and each
    sample's clipping factor ([B]): ``weight_out`` = (or +=, with ``add``)
    ``(dz_t * factor) @ a``, ``bias_out`` = (or +=) ``dz_t @ factor``."""
    if weight_out is not None:
        scaled_t = dz_t * factor
        if add:
            weight_out.addmm_(scaled_t, a)
        else:
            torch.mm(scaled_t, a, out=weight_out)
    if bias_out is not None:
        if add:
            bias_out.addmv_(dz_t, factor)
        else:
            torch.mv(dz_t, factor, out=bias_out)


def _weighted_rows(rows: torch.Tensor, factor: torch.Tensor, out: torch.Tensor, add: bool) -> None:
    """``out`` = (or +=, with ``add``) the per-sample (per-unit) gradient rows ([B, n])
    weighted by their clipping factors and summed."""
    if add:
        out.addmv_(rows.t(), factor)
    else:
        torch.mv(rows.t(), factor, out=out)
